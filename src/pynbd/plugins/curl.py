"""curl: a disk image on a web server (HTTP or HTTPS), read with byte-range requests.

    pynbd serve curl https://example.com/disk.img
    pynbd serve curl url=http://host/disk.img user=me password=+pwfile
    pynbd serve curl https://host/disk.img cainfo=ca.pem timeout=20
    pynbd serve curl https://service/disk.img \\
        header-script='printf "Authorization: Bearer "; get-token' header-script-renew=50
    pynbd serve curl https://host/disk.img.xz --filter=xz --run 'nbdinfo $uri'

Every read is one ``GET`` with ``Range: bytes=FIRST-LAST``, made with libcurl
(through pycurl) on kept-alive connections that all clients share: up to
``connections=`` requests are in flight at once, so a client that queues
many reads (or several clients) get them served in parallel. The reads of
a client (when no filter above changes them, and without header-script= or
cookie-script=) are answered later: one thread drives a libcurl multi
handle over all of them and sends each reply as its transfer ends. Other
reads (under a filter such as xz) each wait on a handle of their own.

Parameters (nbdkit's names)
    url=URL                 the image (the magic parameter: ``pynbd serve curl URL``)
    user=USER               HTTP authentication (the user may also be in the URL)
    password=PASSWORD       its password; ``password=+FILE`` reads it from FILE,
                            ``password=-`` from the terminal or stdin,
                            ``password=-FD`` from a file descriptor
    header='NAME: VALUE'    an extra request header (repeatable); ``NAME:`` removes
                            one curl would send, ``NAME;`` sends it empty
    cookie='a=b; c=d'       cookies to send (the same +FILE / - / -FD forms)
    header-script=SCRIPT    a shell command printing headers, one a line, instead
                            of header=; run again when header-script-renew=SECS
                            seconds have passed since it last ran
    cookie-script=SCRIPT    a shell command printing the cookie line, instead of
                            cookie=; cookie-script-renew=SECS as above. Both
                            scripts see $url and $iteration (0 the first time);
                            a script that fails fails the requests waiting for
                            it, and its stderr is logged
    timeout=SECS            no read takes longer than this, retries included
                            (0, the default: libcurl's own limits only)
    sslverify=false         do not check the server's certificate
    cainfo=FILE             the CA certificates to check it with (``cainfo=``:
                            none of the system's); capath=DIR a directory of them
    followlocation=false    do not follow redirects (followed by default)
    connections=N           the most requests in flight at once (default 16)
    user-agent=TEXT         the User-Agent header (none by default)
    proxy=URL               a proxy; proxy-user= and proxy-password= for it
    protocols=http,https    the protocols the URL, and redirects, may use
    unix-socket-path=PATH   connect to the web server over a Unix socket
    tcp-keepalive=true      TCP keepalives on the connections
    tcp-nodelay=false       Nagle's algorithm back on

Behaviour
    - The size comes from ``HEAD`` (Content-Length), or, where HEAD says
      nothing useful, from the Content-Range of ``GET bytes=0-0``. It is asked
      when the server starts and again whenever a client connects, so a new
      client sees a new size. A server that does not answer with byte ranges
      is refused at start with a message saying so.
    - An object that changes while it is served fails the reads of the
      clients that connected before with EIO: where the server gives a strong
      ETag (nginx, Apache, S3 do), every read carries ``If-Match`` with it and
      the server answers 412; otherwise a Content-Range with another total
      size is noticed. (Reads with If-Match leave the response headers
      unparsed, which saves a fifth of the plugin's CPU per read.)
    - HTTP errors (404, 403, 5xx) fail the read with EIO; the status is logged.
      Transient failures (5xx, 429, connections refused or reset, short
      bodies) are tried again, at most 3 times in all, never past timeout=.
    - The export is read-only (web servers do not take PUT of byte ranges),
      and multi-conn is advertised: every connection reads the same object.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import pycurl

from ..backend import ConfigError, Connection, OpenContext, Param, Plugin
from ..backend.connection import Completions

log = logging.getLogger("pynbd.plugins.curl")

ATTEMPTS = 3
_BACKOFF = 0.2  # seconds before the second attempt, doubled for each next one
# libcurl errors worth another try: the connection or the transfer broke.
_TRANSIENT_CURL = frozenset({
    pycurl.E_COULDNT_CONNECT, pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR,
    pycurl.E_GOT_NOTHING, pycurl.E_PARTIAL_FILE,
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_SCRIPT_TIMEOUT = 60.0


def redact(url: str) -> str:
    """``url`` without a password in it, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def protocol_mask(names: str) -> int:
    """libcurl's bit mask for ``protocols=http,https``."""
    mask = 0
    for name in names.split(","):
        bit = getattr(pycurl, f"PROTO_{name.strip().upper()}", None)
        if not isinstance(bit, int):
            raise ConfigError(f"curl: protocols: unknown protocol {name.strip()!r}")
        mask |= bit
    return mask


class Seen(NamedTuple):
    """What a client was told about the object when it connected."""

    size: int
    etag: str | None  # a strong ETag, which later reads require (If-Match)


class RequestFailed(Exception):
    """One attempt failed; ``transient`` says whether another may succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class ScriptOutput:
    """What header-script / cookie-script print, run again every ``renew`` seconds."""

    def __init__(self, what: str, script: str, renew: float, url: str) -> None:
        self.what = what
        self.script = script
        self.renew = renew
        self.url = url
        self.iteration = 0
        self.lines: list[str] = []
        self.expires = 0.0  # monotonic time after which the script runs again
        self.lock = threading.Lock()

    def due(self) -> bool:
        return self.iteration == 0 or (self.renew > 0 and time.monotonic() >= self.expires)

    def run(self) -> bool:
        """Run the script if it is due (one thread at a time); whether it ran."""
        with self.lock:
            if not self.due():
                return False
            env = {**os.environ, "iteration": str(self.iteration), "url": self.url}
            try:
                result = subprocess.run(["/bin/sh", "-c", self.script], env=env, capture_output=True,
                                        stdin=subprocess.DEVNULL, timeout=_SCRIPT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RequestFailed(f"{self.what} did not finish in {_SCRIPT_TIMEOUT:g} s",
                                    False) from None
            if result.returncode != 0:
                stderr = "; ".join(result.stderr.decode(errors="replace").split("\n")).strip("; ")
                raise RequestFailed(f"{self.what} failed with exit status {result.returncode}: "
                                    f"{stderr}", False)
            self.lines = [line for line in result.stdout.decode().splitlines() if line.strip()]
            log.debug("curl: %s (iteration %d) printed %d lines", self.what, self.iteration,
                      len(self.lines))
            self.iteration += 1
            self.expires = time.monotonic() + self.renew
            return True


class Transfer:
    """One libcurl handle (one kept-alive connection) and the read it is doing."""

    def __init__(self, plugin: CurlPlugin) -> None:
        self.curl = pycurl.Curl()
        self.plugin = plugin
        self.view = memoryview(bytearray())
        self.pos = 0
        self.content_range = b""
        self.accept_ranges = False
        self.etag = ""
        # What the handle sends now: the script headers' generation, and the
        # If-Match validator (None: none, and response headers are watched).
        self.generation = -1
        self.validator: str | None = ""
        plugin.configure(self.curl)
        self.curl.setopt(pycurl.WRITEFUNCTION, self.write)

    def write(self, data: bytes) -> int | None:
        pos = self.pos
        end = pos + len(data)
        if end > len(self.view):
            return 0  # more than asked for: libcurl aborts the transfer
        self.view[pos:end] = data
        self.pos = end
        return None

    def header(self, line: bytes) -> None:
        name = line[:14].lower()
        if name == b"content-range:":
            self.content_range = line[14:].strip()
        elif name[:5] == b"http/":  # a new response (after a redirect): forget the last one
            self.content_range = b""
            self.accept_ranges = False
            self.etag = ""
        elif name == b"accept-ranges:":
            self.accept_ranges = b"bytes" in line[14:].lower()
        elif name[:5] == b"etag:":
            self.etag = line[5:].strip().decode("latin-1")

    def prepare(self, timeout: float, validator: str | None) -> None:
        """Set the handle up for its next request (see ``perform``)."""
        if self.plugin.scripts or self.validator != validator:
            self.plugin.refresh_headers(self, validator)
        if timeout:
            self.curl.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
        self.pos = 0
        self.content_range = b""

    def perform(self, timeout: float, what: str, validator: str | None = None) -> int:
        """Run the request set up on the handle; the HTTP status. RequestFailed on failure.

        With a ``validator`` (an ETag) the request is conditional (If-Match) and
        the response's headers are not looked at; without, they are.
        """
        self.prepare(timeout, validator)
        code, text = 0, ""
        try:
            self.curl.perform()
        except pycurl.error as exc:
            code, text = int(exc.args[0]), str(exc.args[-1])
        return self.outcome(what, validator, code, text)

    def outcome(self, what: str, validator: str | None, code: int, text: str) -> int:
        """The HTTP status of a request that ended with libcurl's ``code`` (0: done) and
        ``text``; RequestFailed if it failed."""
        status = int(self.curl.getinfo(pycurl.RESPONSE_CODE))
        if not code:
            return status
        if code == pycurl.E_HTTP_RETURNED_ERROR and status == 412:
            raise RequestFailed(f"{what}: the object changed while it was served (HTTP 412: "
                                f"its ETag is no longer {validator})", False)
        if code == pycurl.E_HTTP_RETURNED_ERROR:
            raise RequestFailed(f"{what}: HTTP {status}", status in _TRANSIENT_STATUS)
        if code == pycurl.E_WRITE_ERROR and status == 200:
            raise RequestFailed(f"{what}: the server ignored the Range header (HTTP 200 with "
                                "the whole object): it does not serve byte ranges", False)
        if code == pycurl.E_WRITE_ERROR and 300 <= status < 400:
            raise RequestFailed(f"{what}: HTTP {status} (a redirect, and followlocation=false)",
                                False)
        raise RequestFailed(f"{what}: {text}", code in _TRANSIENT_CURL)

    def get_range(self, buf: memoryview, offset: int, seen: Seen, timeout: float) -> None:
        """Fill ``buf`` with the bytes at ``offset`` of the object as ``seen`` when probed.

        A strong ETag makes the server check that the object has not changed
        (If-Match); without one, the total size in Content-Range is checked.
        """
        what = self.set_range(buf, offset)
        self.check_range(what, self.perform(timeout, what, seen.etag), offset, seen)

    def set_range(self, buf: memoryview, offset: int) -> str:
        """Ask for the bytes at ``offset`` into ``buf``; what the request is, for messages."""
        last = offset + len(buf) - 1
        self.view = buf
        self.curl.setopt(pycurl.RANGE, f"{offset}-{last}")
        return f"GET bytes={offset}-{last}"

    def check_range(self, what: str, status: int, offset: int, seen: Seen) -> None:
        """RequestFailed unless the answer to ``set_range`` is the whole range of that object."""
        length = len(self.view)
        if status == 200 and offset == 0 and length == seen.size == self.pos:
            return  # the whole object, as asked
        if status != 206:
            raise RequestFailed(f"{what}: HTTP {status} instead of 206 Partial Content", False)
        total = self.content_range.rpartition(b"/")[2]
        if total.isdigit() and int(total) != seen.size:
            raise RequestFailed(f"{what}: the object's size changed from {seen.size} to "
                                f"{int(total)} bytes while it was served", False)
        if self.pos != length:
            raise RequestFailed(f"{what}: {self.pos} of {length} bytes received", True)

    def probe(self, timeout: float) -> Seen:
        """The object's size and strong ETag (if any), from HEAD or GET bytes=0-0."""
        size = self.probe_size(timeout)
        strong = self.etag if self.etag and not self.etag.startswith("W/") else None
        return Seen(size, strong)

    def probe_size(self, timeout: float) -> int:
        """The object's size, from HEAD or from GET bytes=0-0; checks that ranges work."""
        curl = self.curl
        curl.setopt(pycurl.NOBODY, True)
        try:
            status = self.perform(timeout, "HEAD")
        except RequestFailed as exc:
            if exc.transient:
                raise
            log.debug("curl: %s; asking with GET", exc)  # some servers refuse HEAD, not GET
            status = 0
        finally:
            curl.setopt(pycurl.NOBODY, False)
            curl.setopt(pycurl.HTTPGET, True)
        length = int(curl.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T)) if status == 200 else -1
        if length >= 0 and self.accept_ranges:
            return length
        one = memoryview(bytearray(1))
        self.view = one
        curl.setopt(pycurl.RANGE, "0-0")
        status = self.perform(timeout, "GET bytes=0-0")
        total = self.content_range.rpartition(b"/")[2]
        if status == 206 and total.isdigit():
            return int(total)
        if status == 200 and self.pos == int(curl.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T)) <= 1:
            return self.pos  # an object of 0 or 1 bytes comes whole
        raise RequestFailed(f"GET bytes=0-0: HTTP {status} without a Content-Range: the server "
                            "does not serve byte ranges", False)

    def close(self) -> None:
        self.curl.close()


class TransferPool:
    """At most ``size`` transfers at once, on kept-alive handles made when first needed."""

    def __init__(self, make: Callable[[], Transfer], size: int) -> None:
        self.make = make
        self.free: list[Transfer] = []
        self.all: list[Transfer] = []
        self.slots = threading.BoundedSemaphore(size)

    def take(self, deadline: float | None) -> Transfer:
        """A free handle (made if none is free), waiting for one at most until ``deadline``."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.slots.acquire(timeout=wait):
            raise RequestFailed("no connection to the server became free in time", False)
        try:
            return self.free.pop()
        except IndexError:
            handle = self.make()
            self.all.append(handle)
            return handle

    def give(self, handle: Transfer) -> None:
        """Put back a handle ``take`` gave."""
        self.free.append(handle)
        self.slots.release()

    def close(self) -> None:
        for handle in self.all:
            handle.close()
        self.all.clear()
        self.free.clear()


class CurlConnection(Connection):
    """One client's view: the size when it connected; reads go to the shared pool."""

    def __init__(self, plugin: CurlPlugin, seen: Seen) -> None:
        self.plugin = plugin
        self.seen = seen

    def get_size(self) -> int:
        return self.seen.size

    def can_multi_conn(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.plugin.request(lambda t, remaining: t.get_range(buf, offset, self.seen, remaining))


class Read:
    """One client read on the multi handle (``MultiDriver``): where the data goes, the
    object as the client saw it, where to report, and how far its attempts got."""

    __slots__ = ("buf", "deadline", "number", "offset", "seen", "sink", "tag", "what")

    def __init__(self, buf: memoryview, offset: int, seen: Seen, tag: object, sink: Completions,
                 deadline: float | None) -> None:
        self.buf = buf
        self.offset = offset
        self.seen = seen
        self.tag = tag
        self.sink = sink
        self.deadline = deadline
        self.number = 1  # the attempt under way
        self.what = ""


class MultiDriver:
    """Reads answered later: one thread runs a libcurl multi handle over all of them.

    ``start`` queues a read; ``wake`` (the server's ``send_started``) tells the
    thread, which gives each read a handle of its own pool (at most
    ``connections=`` transfers at once; the rest wait their turn) and lets
    libcurl run every transfer on its kept-alive connections, driven by
    ``socket_action`` from one epoll set. Each finished read is checked as a
    synchronous one is (``Transfer.outcome``, ``check_range``) and reported
    to the server; after each round the servers' ``burst_done`` sends their
    replies together. A transient failure is tried again after the same
    pause and within the same limits (``retry_pause``, timeout=) as a
    synchronous read, without holding a handle meanwhile.
    """

    def __init__(self, plugin: CurlPlugin) -> None:
        self.plugin = plugin
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self.on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self.on_timer)
        self.epoll = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.wake_fd, select.EPOLLIN)
        self.watched: set[int] = set()
        self.timer_at: float | None = None  # when libcurl wants socket_action(SOCKET_TIMEOUT)
        self.incoming: collections.deque[Read] = collections.deque()  # started, not yet seen
        self.waiting: collections.deque[Read] = collections.deque()  # seen, no handle free yet
        self.retries: list[tuple[float, int, Read]] = []  # (when, order, read), a heap
        self.order = itertools.count()
        self.active: dict[pycurl.Curl, tuple[Transfer, Read]] = {}
        self.free: list[Transfer] = []
        self.made: list[Transfer] = []
        self.touched: list[Completions] = []
        self.signalled = False
        self.closing = False
        self.thread = threading.Thread(target=self.run, daemon=True, name="curl-multi")
        self.thread.start()

    # ---- any thread
    def start(self, read: Read) -> None:
        self.incoming.append(read)

    def wake(self) -> None:
        if self.incoming and not self.signalled:
            self.signalled = True
            os.eventfd_write(self.wake_fd, 1)

    def close(self) -> None:
        self.closing = True
        os.eventfd_write(self.wake_fd, 1)
        self.thread.join()
        gone = OSError(errno.EIO, "curl: the server is shutting down")
        for curl, (_transfer, read) in self.active.items():
            self.multi.remove_handle(curl)
            read.sink.read_done(read.tag, gone)
            read.sink.burst_done()
        for transfer in self.made:
            transfer.close()
        self.multi.close()
        self.epoll.close()
        os.close(self.wake_fd)

    # ---- libcurl's callbacks (on the thread)
    def on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        if what == pycurl.POLL_REMOVE:
            if fd in self.watched:
                self.watched.discard(fd)
                with contextlib.suppress(OSError):  # libcurl may have closed it
                    self.epoll.unregister(fd)
            return
        mask = (select.EPOLLIN if what & pycurl.POLL_IN else 0) | \
            (select.EPOLLOUT if what & pycurl.POLL_OUT else 0)
        if fd in self.watched:
            try:
                self.epoll.modify(fd, mask)
            except FileNotFoundError:  # closed without POLL_REMOVE, and the number reused
                self.epoll.register(fd, mask)
        else:
            try:
                self.epoll.register(fd, mask)
            except FileExistsError:
                self.epoll.modify(fd, mask)
            self.watched.add(fd)

    def on_timer(self, ms: int) -> None:
        self.timer_at = None if ms < 0 else time.monotonic() + ms / 1000

    # ---- the thread
    def run(self) -> None:
        while not self.closing:
            try:
                self.round()
            except Exception:  # noqa: BLE001 (a bug here must not stop every later read)
                log.exception("curl: the transfers' thread failed")
                time.sleep(0.1)

    def round(self) -> None:
        """Wait for sockets, libcurl's timer, a retry or new reads; move every transfer on."""
        multi = self.multi
        wake_fd = self.wake_fd
        events = self.epoll.poll(self.wait())
        for fd, event in events:
            if fd == wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(wake_fd)
                self.signalled = False  # (after the read: a wake that came meanwhile is not lost)
                continue
            multi.socket_action(fd, (pycurl.CSELECT_IN if event & select.EPOLLIN else 0)
                                | (pycurl.CSELECT_OUT if event & select.EPOLLOUT else 0)
                                | (pycurl.CSELECT_ERR if event & (select.EPOLLERR | select.EPOLLHUP)
                                   else 0))
        if self.timer_at is not None and time.monotonic() >= self.timer_at:
            self.timer_at = None
            multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self.collect()
        self.admit()

    def wait(self) -> float:
        """Seconds epoll may wait: until libcurl's timer or the next retry (-1: no limit)."""
        due = [t for t in (self.timer_at, self.retries[0][0] if self.retries else None) if t is not None]
        return max(0.0, min(due) - time.monotonic()) if due else -1

    def admit(self) -> None:
        """Give the reads that came (and retries now due) a handle each, while there are any."""
        retries = self.retries
        while retries and retries[0][0] <= time.monotonic():
            self.waiting.append(heapq.heappop(retries)[2])
        incoming, waiting = self.incoming, self.waiting
        while incoming:
            waiting.append(incoming.popleft())
        while True:
            added = False
            while waiting and (self.free or len(self.made) < self.plugin.connections):
                added = self.begin(waiting.popleft()) or added
            if added:
                self.multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
            if not added and not self.touched:
                return
            self.collect()
            if not (waiting and self.free):  # (transfers that just ended free handles for more)
                return

    def begin(self, read: Read) -> bool:
        """Put ``read`` on a handle; whether it is on its way (False: it failed at once)."""
        remaining = 0.0
        if read.deadline is not None:
            remaining = read.deadline - time.monotonic()
            if remaining <= 0:
                self.report(read, self.plugin.failure(
                    RequestFailed(f"timed out after {self.plugin.timeout:g} s", False), read.number))
                return False
        if self.free:
            transfer = self.free.pop()
        else:
            transfer = Transfer(self.plugin)
            self.made.append(transfer)
        read.what = transfer.set_range(read.buf, read.offset)
        transfer.prepare(remaining, read.seen.etag)
        self.active[transfer.curl] = (transfer, read)
        self.multi.add_handle(transfer.curl)
        return True

    def collect(self) -> None:
        """Report the transfers libcurl finished; then each server's ``burst_done``."""
        multi = self.multi
        while True:
            queued, ok, failed = multi.info_read()
            for curl in ok:
                self.finish(curl, 0, "")
            for curl, code, text in failed:
                self.finish(curl, code, text)
            if not queued:
                break
        touched, self.touched = self.touched, []
        for sink in touched:
            sink.burst_done()

    def finish(self, curl: pycurl.Curl, code: int, text: str) -> None:
        transfer, read = self.active.pop(curl)
        self.multi.remove_handle(curl)
        self.free.append(transfer)
        etag = read.seen.etag
        try:
            transfer.check_range(read.what, transfer.outcome(read.what, etag, code, text),
                                 read.offset, read.seen)
        except RequestFailed as exc:
            pause = self.plugin.retry_pause(exc, read.number, read.deadline)
            if pause is not None:
                read.number += 1
                heapq.heappush(self.retries, (time.monotonic() + pause, next(self.order), read))
                return
            self.report(read, self.plugin.failure(exc, read.number))
            return
        self.report(read, None)

    def report(self, read: Read, error: OSError | None) -> None:
        sink = read.sink
        sink.read_done(read.tag, error)
        if sink not in self.touched:
            self.touched.append(sink)


class MultiCurlConnection(CurlConnection):
    """A client's view whose reads the server may start and have answered later
    (``AsyncReads``), on the plugin's ``MultiDriver``."""

    def __init__(self, plugin: CurlPlugin, seen: Seen, driver: MultiDriver) -> None:
        super().__init__(plugin, seen)
        self.driver = driver
        self.send_started = driver.wake

    def start_pread(self, buf: memoryview, offset: int, flags: int, tag: object,
                    completions: Completions) -> None:
        self.driver.start(Read(buf, offset, self.seen, tag, completions, self.plugin.deadline()))


class CurlPlugin(Plugin):
    name = "curl"
    magic_param = "url"
    params = (
        Param("url", "str", "the URL of the disk image", required=True),
        Param("user", "str", "user name for HTTP authentication"),
        Param("password", "secret", "password (+FILE, - or -FD to read it)"),
        Param("header", "str", "an extra request header", repeat=True),
        Param("cookie", "secret", "cookies to send (+FILE, - or -FD to read them)"),
        Param("header-script", "str", "shell command printing the headers"),
        Param("header-script-renew", "int", "seconds before header-script runs again", default=0),
        Param("cookie-script", "str", "shell command printing the cookie"),
        Param("cookie-script-renew", "int", "seconds before cookie-script runs again", default=0),
        Param("timeout", "duration", "seconds a read may take, retries included (0: no limit)",
              default=0.0),
        Param("sslverify", "bool", "check the server's certificate", default=True),
        Param("cainfo", "str", "file of CA certificates"),
        Param("capath", "path", "directory of CA certificates"),
        Param("followlocation", "bool", "follow redirects", default=True),
        Param("connections", "int", "requests in flight at once", default=16),
        Param("user-agent", "str", "User-Agent header"),
        Param("proxy", "str", "proxy URL"),
        Param("proxy-user", "str", "proxy user name"),
        Param("proxy-password", "secret", "proxy password"),
        Param("protocols", "str", "comma-separated protocols allowed"),
        Param("unix-socket-path", "path", "connect over this Unix socket"),
        Param("tcp-keepalive", "bool", "TCP keepalives", default=False),
        Param("tcp-nodelay", "bool", "disable Nagle's algorithm", default=True),
    )
    url: str
    user: str | None
    password: str | None
    header: list[str]
    cookie: str | None
    header_script: str | None
    header_script_renew: int
    cookie_script: str | None
    cookie_script_renew: int
    timeout: float
    sslverify: bool
    cainfo: str | None
    capath: str | None
    followlocation: bool
    connections: int
    user_agent: str | None
    proxy: str | None
    proxy_user: str | None
    proxy_password: str | None
    protocols: str | None
    unix_socket_path: str | None
    tcp_keepalive: bool
    tcp_nodelay: bool

    def config_complete(self) -> None:
        if self.header and self.header_script:
            raise ConfigError("curl: header-script cannot be used with header")
        if self.cookie is not None and self.cookie_script:
            raise ConfigError("curl: cookie-script cannot be used with cookie")
        if self.connections < 1:
            raise ConfigError("curl: connections must be at least 1")
        if "://" not in self.url:
            raise ConfigError(f"curl: {self.url!r} is not a URL")
        self.protocol_mask = protocol_mask(self.protocols) if self.protocols else 0
        self.scripts = [ScriptOutput(what, script, renew, self.url) for what, script, renew in (
            ("header-script", self.header_script, self.header_script_renew),
            ("cookie-script", self.cookie_script, self.cookie_script_renew)) if script]
        self.generation = 0
        self.pool = TransferPool(lambda: Transfer(self), self.connections)
        self.driver: MultiDriver | None = None  # the reads answered later, once a client came
        self.driver_lock = threading.Lock()

    def get_ready(self) -> None:
        try:
            seen = self.probe(quiet=True)
        except OSError as exc:
            raise ConfigError(exc.strerror or str(exc)) from None
        log.debug("curl: %s: %d bytes, ETag %s", redact(self.url), seen.size, seen.etag)

    def configure(self, curl: pycurl.Curl) -> None:
        """Set the options every request of a new handle shares."""
        options: list[tuple[int, object]] = [
            (pycurl.URL, self.url), (pycurl.FAILONERROR, True), (pycurl.NOSIGNAL, True),
            (pycurl.FOLLOWLOCATION, self.followlocation), (pycurl.MAXREDIRS, 20),
            (pycurl.BUFFERSIZE, 512 * 1024), (pycurl.TCP_NODELAY, self.tcp_nodelay),
            (pycurl.TCP_KEEPALIVE, self.tcp_keepalive),
        ]
        if not self.sslverify:
            options += [(pycurl.SSL_VERIFYPEER, False), (pycurl.SSL_VERIFYHOST, 0)]
        for option, value in ((pycurl.USERNAME, self.user), (pycurl.PASSWORD, self.password),
                              (pycurl.CAINFO, self.cainfo), (pycurl.CAPATH, self.capath),
                              (pycurl.USERAGENT, self.user_agent), (pycurl.PROXY, self.proxy),
                              (pycurl.PROXYUSERNAME, self.proxy_user),
                              (pycurl.PROXYPASSWORD, self.proxy_password),
                              (pycurl.UNIX_SOCKET_PATH, self.unix_socket_path)):
            if value is not None:
                options.append((option, value))
        if self.protocol_mask:
            options += [(pycurl.PROTOCOLS, self.protocol_mask),
                        (pycurl.REDIR_PROTOCOLS, self.protocol_mask)]
        if self.header:
            options.append((pycurl.HTTPHEADER, self.header))
        if self.cookie is not None:
            options.append((pycurl.COOKIE, self.cookie))
        try:
            for option, setting in options:
                curl.setopt(option, setting)
        except pycurl.error as exc:
            raise ConfigError(f"curl: {exc.args[-1]}") from None

    def refresh_headers(self, transfer: Transfer, validator: str | None) -> None:
        """Run the header and cookie scripts if due; give the handle their output, the
        If-Match ``validator`` and, without one, the header callback."""
        for script in self.scripts:
            if script.due() and script.run():
                self.generation += 1
        if transfer.generation == self.generation and transfer.validator == validator:
            return
        headers = list(self.header)
        for script in self.scripts:
            if script.what == "header-script":
                headers = list(script.lines)
            else:
                transfer.curl.setopt(pycurl.COOKIE, script.lines[0] if script.lines else "")
        if validator is not None:
            headers.append(f"If-Match: {validator}")
        if headers:
            transfer.curl.setopt(pycurl.HTTPHEADER, headers)
        else:
            transfer.curl.unsetopt(pycurl.HTTPHEADER)  # (pycurl ignores an empty list)
        if validator is None:
            transfer.curl.setopt(pycurl.HEADERFUNCTION, transfer.header)
        elif transfer.validator is None or transfer.validator == "":
            transfer.curl.unsetopt(pycurl.HEADERFUNCTION)
        transfer.generation = self.generation
        transfer.validator = validator

    def request(self, attempt: Callable[[Transfer, float], None], quiet: bool = False) -> None:
        """Run ``attempt`` on a pooled handle, again for transient failures; EIO at the end.

        Failures are logged (the last as an error), unless ``quiet``: at start
        the error message is the whole story.
        """
        deadline = self.deadline()
        for number in range(1, ATTEMPTS + 1):
            remaining = 0.0 if deadline is None else deadline - time.monotonic()
            try:
                if deadline is not None and remaining <= 0:
                    raise RequestFailed(f"timed out after {self.timeout:g} s", False)
                transfer = self.pool.take(deadline)
                try:
                    attempt(transfer, remaining)
                finally:
                    self.pool.give(transfer)
                return
            except RequestFailed as exc:
                pause = self.retry_pause(exc, number, deadline, quiet)
                if pause is None:
                    raise self.failure(exc, number, quiet) from None
                time.sleep(pause)

    def deadline(self) -> float | None:
        """When a read starting now must be over (timeout=), or None."""
        return time.monotonic() + self.timeout if self.timeout else None

    def retry_pause(self, exc: RequestFailed, number: int, deadline: float | None,
                    quiet: bool = False) -> float | None:
        """Seconds to wait before trying attempt ``number`` + 1 after ``exc``; None: give up."""
        pause = _BACKOFF * (1 << (number - 1))
        if not exc.transient or number >= ATTEMPTS or (
                deadline is not None and time.monotonic() + pause >= deadline):
            return None
        log.log(logging.DEBUG if quiet else logging.WARNING, "curl: %s: %s; trying again",
                redact(self.url), exc)
        return pause

    def failure(self, exc: RequestFailed, number: int, quiet: bool = False) -> OSError:
        """The EIO a read fails with after attempt ``number`` failed with ``exc`` (logged)."""
        tries = f" (after {number} attempts)" if number > 1 else ""
        if not quiet:
            log.error("curl: %s: %s%s", redact(self.url), exc, tries)
        return OSError(errno.EIO, f"curl: {redact(self.url)}: {exc}{tries}")

    def probe(self, quiet: bool = False) -> Seen:
        """The object's size and ETag now (see ``Transfer.probe``)."""
        seen: list[Seen] = []
        self.request(lambda t, remaining: seen.append(t.probe(remaining)), quiet)
        return seen[-1]

    def open(self, ctx: OpenContext) -> Connection:
        seen = self.probe()
        if self.scripts:  # (their renewal must not stall the other reads' thread)
            return CurlConnection(self, seen)
        with self.driver_lock:
            if self.driver is None:
                self.driver = MultiDriver(self)  # (made in the serving process, after any fork)
        return MultiCurlConnection(self, seen, self.driver)

    def unload(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.pool.close()
