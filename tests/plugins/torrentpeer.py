"""A BitTorrent seeder on 127.0.0.1 for the torrent plugin's tests (a second libtorrent session).

    from torrentpeer import make_torrent, magnet, seeder

    torrent = make_torrent(directory / "disk.img", tmp / "disk.torrent")
    with seeder(torrent, directory, upload_limit=256 * 1024) as port:
        ... pynbd serve torrent disk.torrent peer=127.0.0.1:{port} ...

The seeder has no tracker, no DHT, no local service discovery, no UPnP or
NAT-PMP: peers find it only by the address the test gives them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libtorrent as lt

from nbdtest import WAIT

# Everything but the listening address: no way to find peers beyond the ones named.
QUIET = {"enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
         "alert_mask": 0}
# libtorrent's uTP moves about 6 MiB/s on loopback, TCP ten times that; a peer
# that tries uTP first falls back to TCP after a few seconds.
TCP_ONLY = {"enable_incoming_utp": False, "enable_outgoing_utp": False}
PLUGIN_QUIET = ("listen-interfaces=127.0.0.1:0", "dht=false", "lsd=false", "upnp=false")


def make_torrent(content: Path, out: Path, piece_size: int = 16384) -> Path:
    """Write ``out``, a .torrent of the file or directory ``content`` (no tracker)."""
    creator = lt.create_torrent(lt.list_files(str(content)), piece_size)
    lt.set_piece_hashes(creator, str(content.parent))
    out.write_bytes(lt.bencode(creator.generate()))
    return out


def magnet(torrent: Path, *peers: int) -> str:
    """A magnet link for ``torrent`` naming peers on 127.0.0.1 (x.pe=)."""
    link = lt.make_magnet_uri(lt.torrent_info(str(torrent)))
    return link + "".join(f"&x.pe=127.0.0.1:{port}" for port in peers)


@contextmanager
def seeder(torrent: Path, directory: Path, upload_limit: int = 0, tcp_only: bool = False) -> Iterator[int]:
    """Seed ``torrent`` from ``directory`` on 127.0.0.1; yields the port it listens on.

    ``upload_limit`` (bytes per second) slows it down: a torrent's own limit
    applies to loopback peers, which a session's global limits leave alone.
    ``tcp_only`` (for benchmarks of large files) refuses uTP.
    """
    session = lt.session({**QUIET, **(TCP_ONLY if tcp_only else {}), "listen_interfaces": "127.0.0.1:0"})
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(str(torrent))
    params.save_path = str(directory)
    handle = session.add_torrent(params)
    if upload_limit:
        handle.set_upload_limit(upload_limit)
    deadline = time.monotonic() + WAIT
    while not (session.listen_port() and handle.status().is_seeding):
        assert time.monotonic() < deadline, f"seeder not ready: {handle.status().state}"
        time.sleep(0.02)
    try:
        yield session.listen_port()
    finally:
        session.remove_torrent(handle)
        session.pause()
        del session
