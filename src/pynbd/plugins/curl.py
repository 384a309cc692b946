"""curl: a disk image on a web server (HTTP or HTTPS), read with byte-range requests.

    pynbd serve curl https://example.com/disk.img
    pynbd serve curl url=http://host/disk.img user=me password=+pwfile
    pynbd serve curl https://host/disk.img cainfo=ca.pem timeout=20
    pynbd serve curl https://service/disk.img \\
        header-script='printf "Authorization: Bearer "; get-token' header-script-renew=50
    pynbd serve curl https://host/disk.img.xz --filter=xz --run 'nbdinfo $uri'

Every read is one ``GET`` with ``Range: bytes=FIRST-LAST``, made with libcurl
(through pycurl) on a pool of kept-alive connections that all clients share:
up to ``connections=`` requests are in flight at once, so a client that
queues many reads (or several clients) get them served in parallel.

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

import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import pycurl

from ..backend import ConfigError, Connection, OpenContext, Param, Plugin

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

    def perform(self, timeout: float, what: str, validator: str | None = None) -> int:
        """Run the request set up on the handle; the HTTP status. RequestFailed on failure.

        With a ``validator`` (an ETag) the request is conditional (If-Match) and
        the response's headers are not looked at; without, they are.
        """
        curl = self.curl
        plugin = self.plugin
        if plugin.scripts or self.validator != validator:
            plugin.refresh_headers(self, validator)
        if timeout:
            curl.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
        self.pos = 0
        self.content_range = b""
        try:
            curl.perform()
        except pycurl.error as exc:
            code, text = exc.args[0], str(exc.args[-1])
            status = int(curl.getinfo(pycurl.RESPONSE_CODE))
            if code == pycurl.E_HTTP_RETURNED_ERROR and status == 412:
                raise RequestFailed(f"{what}: the object changed while it was served (HTTP 412: "
                                    f"its ETag is no longer {validator})", False) from None
            if code == pycurl.E_HTTP_RETURNED_ERROR:
                raise RequestFailed(f"{what}: HTTP {status}", status in _TRANSIENT_STATUS) from None
            if code == pycurl.E_WRITE_ERROR and status == 200:
                raise RequestFailed(f"{what}: the server ignored the Range header (HTTP 200 with "
                                    "the whole object): it does not serve byte ranges", False) from None
            if code == pycurl.E_WRITE_ERROR and 300 <= status < 400:
                raise RequestFailed(f"{what}: HTTP {status} (a redirect, and followlocation=false)",
                                    False) from None
            raise RequestFailed(f"{what}: {text}", code in _TRANSIENT_CURL) from None
        return int(curl.getinfo(pycurl.RESPONSE_CODE))

    def get_range(self, buf: memoryview, offset: int, seen: Seen, timeout: float) -> None:
        """Fill ``buf`` with the bytes at ``offset`` of the object as ``seen`` when probed.

        A strong ETag makes the server check that the object has not changed
        (If-Match); without one, the total size in Content-Range is checked.
        """
        last = offset + len(buf) - 1
        what = f"GET bytes={offset}-{last}"
        size = seen.size
        self.view = buf
        self.curl.setopt(pycurl.RANGE, f"{offset}-{last}")
        status = self.perform(timeout, what, seen.etag)
        if status == 200 and offset == 0 and len(buf) == size == self.pos:
            return  # the whole object, as asked
        if status != 206:
            raise RequestFailed(f"{what}: HTTP {status} instead of 206 Partial Content", False)
        total = self.content_range.rpartition(b"/")[2]
        if total.isdigit() and int(total) != size:
            raise RequestFailed(f"{what}: the object's size changed from {size} to {int(total)} "
                                "bytes while it was served", False)
        if self.pos != len(buf):
            raise RequestFailed(f"{what}: {self.pos} of {len(buf)} bytes received", True)

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
        deadline = time.monotonic() + self.timeout if self.timeout else None
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
                pause = _BACKOFF * 2 ** (number - 1)
                again = exc.transient and number < ATTEMPTS and (
                    deadline is None or time.monotonic() + pause < deadline)
                if not again:
                    tries = f" (after {number} attempts)" if number > 1 else ""
                    if not quiet:
                        log.error("curl: %s: %s%s", redact(self.url), exc, tries)
                    raise OSError(errno.EIO, f"curl: {redact(self.url)}: {exc}{tries}") from None
                log.log(logging.DEBUG if quiet else logging.WARNING, "curl: %s: %s; trying again",
                        redact(self.url), exc)
                time.sleep(pause)

    def probe(self, quiet: bool = False) -> Seen:
        """The object's size and ETag now (see ``Transfer.probe``)."""
        seen: list[Seen] = []
        self.request(lambda t, remaining: seen.append(t.probe(remaining)), quiet)
        return seen[-1]

    def open(self, ctx: OpenContext) -> Connection:
        return CurlConnection(self, self.probe())

    def unload(self) -> None:
        self.pool.close()
