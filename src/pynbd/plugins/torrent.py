"""torrent: one file of a BitTorrent torrent (a .torrent file or a magnet link), read-only.

    pynbd serve torrent debian.iso.torrent
    pynbd serve -U - torrent x.torrent --run 'qemu-system-x86_64 -cdrom $nbd -boot d'
    pynbd serve torrent 'magnet:?xt=urn:btih:…' cache=/var/cache/isos
    pynbd serve torrent disks.torrent file=images/disk.img peer=192.0.2.7:6881

The plugin is a full BitTorrent client (libtorrent): it downloads the
torrent in the background and uploads what it has to other peers while it
serves, so the more machines boot from the torrent, the less each one
downloads from the original seeders. A read does not wait for the whole
download: the pieces it covers are asked for first (libtorrent's piece
deadlines), the read waits for just those, and the pieces after it
(``readahead=``) are asked for next, so a client reading sequentially (a
boot, ``nbdcopy``) finds its next pieces on their way.

Parameters (nbdkit's names)
    torrent=FILE.torrent    the torrent (the magic parameter: ``pynbd serve torrent
                            x.torrent``); ``torrent=magnet:?xt=…`` a magnet link,
                            whose metadata is fetched from the peers first
    file=PATH               the file of the torrent to serve, a path inside the
                            torrent (``SUBDIR/disk.img``); by default the largest
                            file. The files are listed in the ``-v`` log. Other
                            files are not downloaded
    cache=DIR               keep the download in DIR (made if missing) between runs:
                            a restart checks what is there and downloads only the
                            rest. By default a temporary directory in $TMPDIR,
                            removed when the server exits
    timeout=SECS            how long a read waits for its pieces (60 by default;
                            0: forever). A read that times out fails with EIO and
                            a log line saying how many peers were connected
                            (for a magnet link, the first client waits as long
                            for the metadata, and is refused after that)
    peer=HOST:PORT          a peer to connect to, besides those the trackers,
                            DHT and local discovery find (repeatable; pynbd's
                            own; a magnet link may carry them as ``x.pe=``)
    readahead=SIZE          bytes after each read asked for next (4M by default)
    connections-limit=N     most connections to peers (libtorrent's default: 200)
    download-rate-limit=BPS, upload-rate-limit=BPS
                            limits in bits per second (``1M``: a megabit); 0,
                            the default, is no limit. libtorrent does not limit
                            peers on the local network
    listen-interfaces=IP:PORT[,IP:PORT…]
                            where to accept peers (libtorrent's default:
                            0.0.0.0:6881,[::]:6881; port 0 picks a free one)
    outgoing-interfaces=IP[,IP…]
                            addresses to connect to peers from
    user-agent=TEXT         the client name told to trackers and peers
    dht=false, lsd=false, upnp=false
                            no DHT, no local service discovery, no UPnP and
                            NAT-PMP port mapping (all on by default, as in nbdkit):
                            with all three off, and a torrent without trackers,
                            the only peers are those given with peer= or x.pe=

Behaviour
    - The export is read-only, can be read from several connections at once
      (multi-conn), and reports all its extents as data. ``NBD_CMD_CACHE``
      waits for the pieces of its range like a read, without the copy.
    - A torrent that cannot be read (a missing or damaged .torrent, a magnet
      link without an info-hash, a file= the torrent does not hold) is
      refused at start with one line; for a magnet link, file= is checked
      when the metadata arrives, and clients are refused with the reason.
    - ``http:`` and ``https:`` URLs of .torrent files are not fetched:
      download the .torrent first (``pynbd serve curl`` serves disks, not
      torrents).
    - Pieces are checked against the torrent's hashes before a read sees
      them; a piece that fails the check is downloaded again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any

from ..backend import ConfigError, Connection, OpenContext, Param, Plugin

log = logging.getLogger("pynbd.plugins.torrent")

_URL_SCHEMES = ("http:", "https:", "ftp:", "ftps:")
_ALERT_WAIT_MS = 500  # the alert thread looks at its stop flag this often
_WAKE = 1.0  # a waiting read checks its deadline at least this often (seconds)
_READAHEAD_DEADLINE_MS = 1000  # pieces read ahead are due this long after the read's own
_PAD_FILE = 1  # file_storage.flag_pad_file: BEP 47 padding, never served


def load_libtorrent() -> Any:
    try:
        import libtorrent  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError("torrent: needs libtorrent (pip install 'pynbd[torrent]')") from None
    return libtorrent


def libtorrent_message(exc: Exception) -> str:
    """libtorrent's error text without its ``[category:code]`` suffix."""
    return re.sub(r"\s*\[[\w ]+:-?\d+\]$", "", str(exc))


def parse_peer(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); ConfigError if it is neither."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"torrent: peer: {text!r} is not HOST:PORT")
    return host, int(port)


def pick_file(layout: Any, wanted: str | None) -> int:
    """The index of ``wanted`` in a torrent's files, or of the largest file."""
    files = [(layout.file_path(i), layout.file_size(i)) for i in range(layout.num_files())
             if not layout.file_flags(i) & _PAD_FILE]
    for i, (path, size) in enumerate(files):
        log.debug("torrent: file[%d]: %s (%d bytes)", i, path, size)
    if not files:
        raise ConfigError("torrent: the torrent has no files")
    if wanted is None:
        wanted = max(files, key=lambda entry: entry[1])[0]
    for i in range(layout.num_files()):
        if layout.file_path(i) == wanted and not layout.file_flags(i) & _PAD_FILE:
            return i
    raise ConfigError(f"torrent: file={wanted}: no such file in the torrent (it has "
                      f"{', '.join(path for path, _ in files)})")


class Served:
    """The file being served, once the torrent's metadata is known."""

    def __init__(self, info: Any, wanted: str | None) -> None:
        layout = info.layout()
        self.index = pick_file(layout, wanted)
        self.path = layout.file_path(self.index)
        self.size: int = layout.file_size(self.index)
        self.start: int = layout.file_offset(self.index)  # its offset in the torrent
        self.piece_length: int = info.piece_length()
        self.num_pieces: int = info.num_pieces()
        self.files = layout.num_files()

    def pieces(self, offset: int, count: int) -> tuple[int, int]:
        """The first piece and one past the last covering ``count`` bytes at ``offset``."""
        start = self.start + offset
        return start // self.piece_length, (start + max(count, 1) - 1) // self.piece_length + 1


class TorrentConnection(Connection):
    def __init__(self, plugin: TorrentPlugin, served: Served) -> None:
        self.plugin = plugin
        self.size = served.size

    def get_size(self) -> int:
        return self.size

    def can_multi_conn(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        fd = self.plugin.fetch(offset, len(buf))
        done = os.preadv(fd, (buf,), offset)
        while done < len(buf):
            got = os.preadv(fd, (buf[done:],), offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"torrent: the downloaded file ends at {offset + done}")
            done += got

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.plugin.fetch(offset, count)


class TorrentPlugin(Plugin):
    name = "torrent"
    magic_param = "torrent"
    params = (
        Param("torrent", "str", "a .torrent file or a magnet: link", required=True),
        Param("file", "str", "the file of the torrent to serve (default: the largest)"),
        Param("cache", "path", "directory keeping the download (default: a temporary one)"),
        Param("timeout", "duration", "seconds a read waits for its pieces (0: forever)", default=60.0),
        Param("peer", "str", "HOST:PORT of a peer to connect to", repeat=True),
        Param("readahead", "size", "bytes after each read asked for next", default=4 << 20),
        Param("connections-limit", "int", "most connections to peers"),
        Param("download-rate-limit", "size", "bits per second (0: no limit)", default=0),
        Param("upload-rate-limit", "size", "bits per second (0: no limit)", default=0),
        Param("listen-interfaces", "str", "IP:PORT[,IP:PORT…] to accept peers on"),
        Param("outgoing-interfaces", "str", "IP[,IP…] to connect to peers from"),
        Param("user-agent", "str", "the client name told to trackers and peers"),
        Param("dht", "bool", "find peers through the DHT", default=True),
        Param("lsd", "bool", "find peers on the local network", default=True),
        Param("upnp", "bool", "map the listening port with UPnP and NAT-PMP", default=True),
    )
    torrent: str
    file: str | None
    cache: str | None
    timeout: float
    peer: list[str]
    readahead: int
    connections_limit: int | None
    download_rate_limit: int
    upload_rate_limit: int
    listen_interfaces: str | None
    outgoing_interfaces: str | None
    user_agent: str | None
    dht: bool
    lsd: bool
    upnp: bool

    def config_complete(self) -> None:
        self.lt = load_libtorrent()
        if self.torrent.startswith(_URL_SCHEMES):
            raise ConfigError(f"torrent: {self.torrent}: .torrent files are not downloaded from URLs: "
                              "download it first")
        if self.timeout < 0 or self.readahead < 0:
            raise ConfigError("torrent: timeout and readahead cannot be negative")
        self.peers = [parse_peer(text) for text in self.peer]
        self.served: Served | None = None
        if self.torrent.startswith("magnet:"):
            try:
                self.add_params = self.lt.parse_magnet_uri(self.torrent)
            except RuntimeError as exc:
                raise ConfigError(f"torrent: {self.torrent}: not a usable magnet link: "
                                  f"{libtorrent_message(exc)}") from None
        else:
            path = self.torrent.removeprefix("file:")
            try:
                info = self.lt.torrent_info(path)
            except RuntimeError as exc:
                raise ConfigError(f"torrent: {path}: cannot read the torrent: "
                                  f"{libtorrent_message(exc)}") from None
            self.served = Served(info, self.file)
            self.add_params = self.lt.add_torrent_params()
            self.add_params.ti = info
        if self.cache is not None:
            try:
                os.makedirs(self.cache, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"torrent: cache={self.cache}: {exc.strerror}") from None
        self.cond = threading.Condition()
        self.have = bytearray()  # one byte per piece: 1 once downloaded and checked
        self.wanted: set[int] = set()  # pieces given a deadline
        self.pending: list[int] = []  # pieces finished, to be flushed to the file
        self.flushing: list[int] = []  # pieces the flush under way writes
        self.failure: str | None = None  # why nothing can be served
        self.last_error = ""  # libtorrent's last error, for the timeout message
        self.fd = -1
        self.session: Any = None
        self.handle: Any = None
        self.stopping = threading.Event()
        self.directory = ""

    def settings(self) -> dict[str, Any]:
        category = self.lt.alert_category
        settings: dict[str, Any] = {
            "alert_mask": category.error | category.status | category.storage | category.piece_progress,
            "enable_dht": self.dht, "enable_lsd": self.lsd,
            "enable_upnp": self.upnp, "enable_natpmp": self.upnp,
            "download_rate_limit": self.download_rate_limit // 8,
            "upload_rate_limit": self.upload_rate_limit // 8,
            "strict_end_game_mode": False, "announce_to_all_trackers": True,
            "announce_to_all_tiers": True, "stop_tracker_timeout": 1,
            "alert_queue_size": 100000,
        }
        for key, value in (("connections_limit", self.connections_limit),
                           ("listen_interfaces", self.listen_interfaces),
                           ("outgoing_interfaces", self.outgoing_interfaces),
                           ("user_agent", self.user_agent)):
            if value is not None:
                settings[key] = value
        return settings

    def after_fork(self) -> None:
        """Start the libtorrent session (its threads) and the thread reading its alerts."""
        self.directory = self.cache or tempfile.mkdtemp(prefix="pynbd-torrent-")
        log.debug("torrent: downloading to %s%s", self.directory,
                  "" if self.cache else " (removed at exit)")
        self.session = self.lt.session(self.settings())
        self.add_params.save_path = self.directory
        if self.served is not None:
            self.add_params.file_priorities = [
                int(i == self.served.index) for i in range(self.served.files)]
        self.handle = self.session.add_torrent(self.add_params)
        for peer in self.peers:
            self.handle.connect_peer(peer)
        self.thread = threading.Thread(target=self.read_alerts, name="torrent-alerts", daemon=True)
        self.thread.start()

    def read_alerts(self) -> None:
        lt = self.lt
        while not self.stopping.is_set():
            if not self.session.wait_for_alert(_ALERT_WAIT_MS):
                continue
            for alert in self.session.pop_alerts():
                log.debug("torrent: %s", alert.message())
                if isinstance(alert, lt.piece_finished_alert):
                    with self.cond:
                        self.pending.append(alert.piece_index)
                        self.flush()
                elif isinstance(alert, lt.cache_flushed_alert):
                    with self.cond:
                        for piece in self.flushing:
                            if piece < len(self.have):
                                self.have[piece] = 1
                        self.flushing = []
                        self.cond.notify_all()
                        self.flush()
                elif isinstance(alert, (lt.metadata_received_alert, lt.add_torrent_alert)):
                    self.got_metadata()
                elif isinstance(alert, lt.torrent_checked_alert):
                    self.refresh()
                elif alert.category() & lt.alert_category.error:
                    self.last_error = alert.message()
                    log.warning("torrent: %s", self.last_error)

    def flush(self) -> None:
        """Have libtorrent write the pieces it finished to the file, unless it is already at it.

        A piece passes its hash check before it is written, so a read may use
        it only once a flush that started after it has finished.
        """
        if self.pending and not self.flushing:
            self.flushing, self.pending = self.pending, []
            self.handle.flush_cache()

    def got_metadata(self) -> None:
        """Note the served file once the torrent's metadata is there (a magnet link's later)."""
        info = self.handle.torrent_file()
        if info is None:
            return
        with self.cond:
            try:
                if self.served is None:
                    self.served = Served(info, self.file)
                    self.handle.prioritize_files(
                        [int(i == self.served.index) for i in range(self.served.files)])
            except ConfigError as exc:
                self.failure = str(exc)
                log.error("%s", exc)
            self.cond.notify_all()
        self.refresh()

    def refresh(self) -> None:
        """Take the pieces libtorrent has (when it has checked what the cache holds), through
        a flush like any other: one may have just passed its hash check."""
        pieces = self.handle.status().pieces
        with self.cond:
            if self.served is None or not pieces:
                return
            if len(self.have) != len(pieces):
                self.have = bytearray(len(pieces))
            self.pending += [piece for piece, had in enumerate(pieces) if had and not self.have[piece]]
            self.flush()
            self.cond.notify_all()

    def wait_for_metadata(self) -> Served:
        deadline = time.monotonic() + self.timeout if self.timeout else None
        with self.cond:
            while self.served is None or not self.have:
                if self.failure:
                    raise OSError(errno.EIO, self.failure)
                self.check_deadline(deadline, "the torrent's metadata")
                if not self.cond.wait(_WAKE) and self.served is not None:
                    self.refresh()  # (the lock is an RLock: refresh takes it again)
            return self.served

    def check_deadline(self, deadline: float | None, what: str) -> None:
        """EIO, logged with the number of peers, once ``deadline`` has passed."""
        if deadline is None or time.monotonic() < deadline:
            return
        status = self.handle.status()
        peers = (f"{status.num_peers} peers connected, {status.num_seeds} of them seeds"
                 if status.num_peers else "no peers to download from")
        error = f"; last error: {self.last_error}" if self.last_error else ""
        message = f"torrent: timed out after {self.timeout:g} s waiting for {what} ({peers}{error})"
        log.error("%s", message)
        raise OSError(errno.EIO, message)

    def fetch(self, offset: int, count: int) -> int:
        """Wait until the pieces under ``count`` bytes at ``offset`` are on disk; the file's fd."""
        served = self.served
        assert served is not None
        first, end = served.pieces(offset, count)
        have = self.have
        if have.find(0, first, end) == -1 and self.fd >= 0:
            self.read_ahead(served, end)
            return self.fd
        deadline = time.monotonic() + self.timeout if self.timeout else None
        with self.cond:
            self.ask(range(first, end), 0)
            self.read_ahead(served, end)
            while (missing := self.have.find(0, first, end)) != -1:
                self.check_deadline(deadline, f"piece {missing} of {served.path}")
                if not self.cond.wait(_WAKE) and self.flushing:
                    self.handle.flush_cache()  # (again: its alert is what marks the pieces)
            if self.fd < 0:
                self.fd = self.open_file(served)
            return self.fd

    def ask(self, pieces: range, due_ms: int) -> None:
        """Give the missing ``pieces`` deadlines from ``due_ms`` on (under the lock)."""
        for piece in pieces:
            if not self.have[piece] and piece not in self.wanted:
                self.wanted.add(piece)
                self.handle.set_piece_deadline(piece, due_ms)
                due_ms += 1

    def read_ahead(self, served: Served, end: int) -> None:
        """Ask for the pieces of ``readahead=`` bytes after piece ``end``, if some are missing."""
        stop = min(served.num_pieces, end + -(-self.readahead // served.piece_length))
        if self.have.find(0, end, stop) != -1:
            with self.cond:
                self.ask(range(end, stop), _READAHEAD_DEADLINE_MS)

    def open_file(self, served: Served) -> int:
        path = os.path.join(self.directory, served.path)
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"torrent: {path}: {exc.strerror}") from None

    def open(self, ctx: OpenContext) -> Connection:
        return TorrentConnection(self, self.wait_for_metadata())

    def unload(self) -> None:
        self.stopping.set()
        if self.session is not None:
            self.thread.join()
            self.session.remove_torrent(self.handle)
            self.session.pause()
            self.session = None
        if self.fd >= 0:
            os.close(self.fd)
        if self.directory and self.cache is None:
            shutil.rmtree(self.directory, ignore_errors=True)
