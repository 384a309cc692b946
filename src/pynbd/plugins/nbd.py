"""nbd: a proxy to another NBD server, so pynbd's filters apply to any NBD server.

    pynbd serve nbd nbd://otherhost/export
    pynbd serve nbd socket=/run/qemu.sock
    pynbd serve nbd hostname=otherhost port=10809 export=disk tls=require
    pynbd serve --filter=cow nbd uri='nbd+unix:///?socket=/tmp/qemu.sock'
    pynbd serve --filter=partition nbd command=qemu-nbd arg=-f arg=qcow2 arg=$PWD/disk.qcow2 partition=1

It is built on pynbd's own client (``pynbd.client``): every request of a
client is passed on as the same NBD command, with its flags (FUA, fast zero,
may-trim as the absence of NO_HOLE, req-one), and the answer (data, extents,
the server's errno, the status in any meta context) comes back as it was.

Parameters (nbdkit's names; give one of uri=, socket=, hostname=, vsock=, command=)
    uri=URI               nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH,
                          nbd+vsock://CID[:PORT]/EXPORT (the magic parameter)
    socket=PATH           a Unix socket
    hostname=HOST         a TCP server; port=PORT (default 10809)
    vsock=CID             an AF_VSOCK server; port=PORT (default 10809)
    command=PROGRAM       run the server (usually qemu-nbd) with arg=ARG for each of
                          its arguments, handed a listening socket as systemd does;
                          it is stopped when pynbd exits (implies shared=true)
    export=NAME           the export to ask for (default ""; with uri=, the URI's)
    dynamic-export=true   ask the server for the export the client asked for
    tls=off|on|require    TLS to the server: off (the default, unless an nbds URI or
                          tls-certificates= is given), on (if the server offers it),
                          require
    tls-certificates=DIR  ca-cert.pem (and client-cert.pem, client-key.pem) for TLS
    tls-verify=false      do not check the server's certificate
    shared=true           one upstream connection set, opened when pynbd starts,
                          for every client (default: a new one for each client)
    retry=N               if connecting fails, try N more times, a second apart
    connections=N         upstream connections per client when the server
                          advertises multi-conn; requests are spread over them
                          (default: 4 over TCP or vsock, 1 over a Unix socket)

Behaviour
    - The export's size, flags (read-only, flush, FUA, trim, zero, fast zero,
      cache, multi-conn, rotational) and block sizes are the server's.
    - Meta contexts: base:allocation and every context the server lists
      (qemu-nbd's ``qemu:dirty-bitmap:NAME`` with -B, ``qemu:allocation-depth``
      with -A, ...) are offered to clients and answered by the server, so
      ``nbdinfo --map=qemu:dirty-bitmap:b0`` and backup tools work through the
      proxy. (Listing them costs one short connection in option mode when a
      client connects; not with command=, whose one server has none of them.)
    - When the server goes away, the requests in flight and the next ones fail
      with EIO; each later request tries to connect again (with retry=), and
      once the server is back, requests succeed again (the size must not have
      changed). A new client always gets a new connection (unless shared=true).
    - Speed: a server on a Unix socket (or a captive command) answers in
      microseconds, so each client's requests are passed on one at a time from
      the thread that reads them, without handing them to worker threads
      (``short_requests``); that is about twice as fast as a pool of threads
      waiting on the answers. A server over TCP gets the worker pool (-t) and
      several connections instead.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..backend import (
    CACHE_NATIVE,
    CACHE_NONE,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    FUA_NATIVE,
    FUA_NONE,
    ConfigError,
    Connection,
    ContextExtent,
    Extent,
    OpenContext,
    Param,
    Plugin,
)
from ..client import (
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CONTEXT_BASE_ALLOCATION,
    NBD,
    NBDURI,
    SIZE_MAXIMUM,
    SIZE_MINIMUM,
    SIZE_PREFERRED,
    STATE_HOLE,
    STATE_ZERO,
    TLS_ALLOW,
    TLS_DISABLE,
    TLS_REQUIRE,
    NBDError,
    ProtocolError,
    parse_uri,
)

log = logging.getLogger("pynbd.plugins.nbd")

T = TypeVar("T")

NBD_PORT = 10809
_TLS_MODES = {"off": TLS_DISABLE, "on": TLS_ALLOW, "require": TLS_REQUIRE}
# Errors that mean the connection, not the request, failed.
_LOST = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED,
                   errno.ESHUTDOWN, errno.ETIMEDOUT, errno.ECONNREFUSED})
_MAX_STATUS = 1 << 31  # the most one block-status request asks about


def command_flags(flags: int) -> int:
    """NBD command flags for the Connection contract's request flags."""
    out = 0
    if flags & FLAG_FUA:
        out |= CMD_FLAG_FUA
    if flags & FLAG_FAST_ZERO:
        out |= CMD_FLAG_FAST_ZERO
    if flags & FLAG_REQ_ONE:
        out |= CMD_FLAG_REQ_ONE
    return out


class Upstream:
    """The connections to the server that one client (or all, when shared) uses.

    Requests go round the handles; a handle that failed is replaced by the
    next request that needs it (``connect`` again, with retry=).
    """

    def __init__(self, plugin: NbdPlugin, export: str) -> None:
        self.plugin = plugin
        self.export = export
        self.lock = threading.Lock()
        self.contexts = plugin.upstream_contexts(export)
        self.handles: list[NBD | None] = [plugin.connect(export, self.contexts)]
        first = self.handles[0]
        assert first is not None
        self.size = first.get_size()
        if first.can_multi_conn() and plugin.command is None:
            self.handles += [plugin.connect(export, self.contexts)
                             for _ in range((plugin.connections or 1) - 1)]
        self.turn = itertools.cycle(range(len(self.handles)))

    def facts(self) -> NBD:
        """A connected handle to ask the export's flags of (they are the same on all)."""
        handle = self.handles[0]
        assert handle is not None
        return handle

    def handle(self) -> tuple[int, NBD]:
        index = next(self.turn)
        handle = self.handles[index]
        if handle is None:
            with self.lock:
                handle = self.handles[index]
                if handle is None:
                    handle = self.reconnect(index)
        return index, handle

    def reconnect(self, index: int) -> NBD:
        try:
            handle = self.plugin.connect(self.export, self.contexts)
        except OSError as exc:
            raise OSError(errno.EIO, f"nbd: the server is gone and reconnecting failed: "
                          f"{exc.strerror or exc}") from None
        if handle.get_size() != self.size:
            size = handle.get_size()
            handle.close()
            raise OSError(errno.EIO, f"nbd: the server came back with another size ({size} "
                          f"bytes instead of {self.size})")
        log.warning("nbd: reconnected to %s", self.plugin.where)
        self.handles[index] = handle
        return handle

    def failed(self, index: int, handle: NBD, exc: Exception) -> OSError:
        """The error a request that raised ``exc`` reports; a lost connection is dropped."""
        code = exc.errno if isinstance(exc, OSError) else None
        if code and code not in _LOST and isinstance(exc, NBDError) and handle.is_ready():
            return OSError(code, exc.strerror or str(exc))  # the server's answer to the request
        with self.lock:
            if self.handles[index] is handle:
                self.handles[index] = None
                log.error("nbd: lost the connection to %s: %s", self.plugin.where, exc)
        try:
            handle.close()
        except (OSError, ProtocolError):
            log.debug("nbd: closing a broken connection failed", exc_info=True)
        return OSError(errno.EIO, f"nbd: connection to the server lost: {exc}")

    def close(self) -> None:
        for handle in self.handles:
            if handle is not None:
                try:
                    handle.close()
                except (OSError, ProtocolError) as exc:
                    log.debug("nbd: closing: %s", exc)
        self.handles = []


class NbdConnection(Connection):
    """One client's view: its upstream connections (or the shared ones)."""

    def __init__(self, upstream: Upstream, owned: bool) -> None:
        self.upstream = upstream
        self.owned = owned
        self.h = upstream.facts()

    # ------------------------------------------------------ what it can do
    def get_size(self) -> int:
        return self.upstream.size

    def can_write(self) -> bool:
        return not self.h.is_read_only()

    def can_flush(self) -> bool:
        return self.h.can_flush()

    def can_trim(self) -> bool:
        return self.h.can_trim()

    def can_zero(self) -> bool:
        return self.h.can_zero()

    def can_fast_zero(self) -> bool:
        return self.h.can_fast_zero()

    def can_fua(self) -> int:
        return FUA_NATIVE if self.h.can_fua() else FUA_NONE

    def can_multi_conn(self) -> bool:
        return self.h.can_multi_conn()

    def can_cache(self) -> int:
        return CACHE_NATIVE if self.h.can_cache() else CACHE_NONE

    def can_extents(self) -> bool:
        return self.h.can_meta_context(CONTEXT_BASE_ALLOCATION)

    def is_rotational(self) -> bool:
        return self.h.is_rotational()

    def block_size(self) -> tuple[int, int, int]:
        sizes = tuple(self.h.get_block_size(which)
                      for which in (SIZE_MINIMUM, SIZE_PREFERRED, SIZE_MAXIMUM))
        return (sizes[0], sizes[1], sizes[2]) if all(sizes) else (0, 0, 0)

    # ------------------------------------------------------------ requests
    def call(self, command: Callable[[NBD], T]) -> T:
        """Run ``command`` on the next upstream handle; a failure as Upstream.failed says."""
        index, h = self.upstream.handle()
        try:
            return command(h)
        except (OSError, ProtocolError) as exc:
            raise self.upstream.failed(index, h, exc) from None

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.call(lambda h: h.pread_into(buf, offset))

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.call(lambda h: h.pwrite(buf, offset, command_flags(flags)))

    def zero(self, count: int, offset: int, flags: int) -> None:
        wire = command_flags(flags) | (0 if flags & FLAG_MAY_TRIM else CMD_FLAG_NO_HOLE)
        self.call(lambda h: h.zero(count, offset, wire))

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.call(lambda h: h.trim(count, offset, command_flags(flags)))

    def flush(self, flags: int) -> None:
        self.call(lambda h: h.flush())

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.call(lambda h: h.cache(count, offset))

    def status(self, context: str, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) runs the server reports in ``context`` from ``offset``."""
        answer = self.call(lambda h: h.block_status(min(count, _MAX_STATUS), offset,
                                                     flags=command_flags(flags)))
        entries = answer.get(context, [])
        runs = []
        pos = offset
        for length, state in zip(entries[0::2], entries[1::2], strict=True):
            runs.append((pos, length, state))
            pos += length
        return runs

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        return [Extent(pos, length, bool(state & STATE_HOLE), bool(state & STATE_ZERO))
                for pos, length, state in self.status(CONTEXT_BASE_ALLOCATION, count, offset, flags)]

    def block_status(self, context: str, count: int, offset: int, flags: int) -> list[ContextExtent]:
        return [ContextExtent(pos, length, state)
                for pos, length, state in self.status(context, count, offset, flags)]

    def close(self) -> None:
        if self.owned:
            self.upstream.close()


class NbdPlugin(Plugin):
    name = "nbd"
    magic_param = "uri"
    params = (
        Param("uri", "str", "NBD URI of the server"),
        Param("socket", "path", "Unix socket of the server"),
        Param("hostname", "str", "TCP host of the server"),
        Param("port", "str", "TCP or vsock port (default 10809)"),
        Param("vsock", "int", "vsock CID of the server"),
        Param("command", "str", "run this server (with arg=) on a private socket"),
        Param("arg", "str", "an argument of command=", repeat=True),
        Param("export", "str", "export name to ask for"),
        Param("dynamic-export", "bool", "ask for the export the client asked for", default=False),
        Param("tls", "str", "TLS to the server", choices=tuple(_TLS_MODES)),
        Param("tls-certificates", "path", "directory of the CA (and client) certificates"),
        Param("tls-verify", "bool", "check the server's certificate", default=True),
        Param("shared", "bool", "one upstream connection for all clients"),
        Param("retry", "int", "more tries when connecting fails, a second apart", default=0),
        Param("connections", "int", "upstream connections per client with multi-conn "
              "(default: 1 over a Unix socket, 4 over TCP)"),
    )
    uri: str | None
    socket: str | None
    hostname: str | None
    port: str | None
    vsock: int | None
    command: str | None
    arg: list[str]
    export: str | None
    dynamic_export: bool
    tls: str | None
    tls_certificates: str | None
    tls_verify: bool
    shared: bool | None
    retry: int
    connections: int | None

    def config_complete(self) -> None:
        given = [k for k in ("uri", "socket", "hostname", "vsock", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("nbd: give exactly one of uri=, socket=, hostname=, vsock= and command= "
                              f"(given: {', '.join(given) or 'none'})")
        if self.retry < 0 or (self.connections is not None and self.connections < 1):
            raise ConfigError("nbd: retry must be 0 or more and connections 1 or more")
        port = self.port_number()
        tls_from_uri = False
        default_export = ""
        if self.uri is not None:
            try:
                parsed = parse_uri(self.uri)
            except NBDError as exc:
                raise ConfigError(f"nbd: {exc.strerror or exc}") from None
            if self.export is not None:
                raise ConfigError("nbd: export= cannot be used with uri= (put the export in the URI)")
            self.address = parsed
            tls_from_uri = parsed.tls
            default_export = parsed.export_name
        elif self.socket is not None:
            self.address = NBDURI("unix", False, socket=self.socket)
        elif self.hostname is not None:
            self.address = NBDURI("tcp", False, host=self.hostname, port=port)
        elif self.vsock is not None:
            self.address = NBDURI("vsock", False, host=str(self.vsock), port=port)
        else:
            self.address = NBDURI("unix", False, socket="(the command's socket)")
            if self.shared is False:
                raise ConfigError("nbd: command= needs shared=true (one server for all clients)")
            if self.dynamic_export:
                raise ConfigError("nbd: dynamic-export cannot be used with command=")
            self.shared = True
        if self.dynamic_export and self.shared:
            raise ConfigError("nbd: dynamic-export cannot be used with shared=true")
        self.export_name = self.export if self.export is not None else default_export
        if self.tls is not None:
            self.tls_mode = _TLS_MODES[self.tls]
            if tls_from_uri and self.tls_mode != TLS_REQUIRE:
                raise ConfigError(f"nbd: an nbds URI requires TLS; tls={self.tls} contradicts it")
        else:
            self.tls_mode = TLS_REQUIRE if tls_from_uri else (
                TLS_ALLOW if self.tls_certificates else TLS_DISABLE)
        self.where = self.command or str(self.address)
        if self.connections is None:
            self.connections = 1 if self.address.transport == "unix" else 4
        self.shared_upstream: Upstream | None = None

    def port_number(self) -> int:
        if self.port is None:
            return NBD_PORT
        if self.port.isdigit():
            return int(self.port)
        try:
            return socket.getservbyname(self.port, "tcp")
        except OSError:
            raise ConfigError(f"nbd: port: unknown service {self.port!r}") from None

    def get_ready(self) -> None:
        if self.shared:
            try:
                self.shared_upstream = Upstream(self, self.export_name)
            except OSError as exc:
                raise ConfigError(exc.strerror or str(exc)) from None

    def list_meta_contexts(self, ctx: OpenContext) -> list[str]:
        """The server's meta contexts (qemu:dirty-bitmap:NAME, qemu:allocation-depth, ...)."""
        if self.shared_upstream is not None:
            return self.shared_upstream.contexts
        try:
            return self.upstream_contexts(ctx.export_name if self.dynamic_export else self.export_name)
        except OSError as exc:
            log.warning("nbd: cannot list the server's meta contexts: %s", exc.strerror or exc)
            return []

    def upstream_contexts(self, export: str) -> list[str]:
        """Ask the server (in option mode) which meta contexts ``export`` has, but
        base:allocation. A captive server (command=) is not asked: it is started once."""
        if self.command is not None:
            return []
        h = self.connect(export, (), listing=True)
        try:
            names = h.opt_list_meta_context()
            h.opt_abort()
        except (OSError, ProtocolError) as exc:
            h.close()
            raise OSError(errno.EIO, f"nbd: listing the meta contexts of {self.where}: {exc}") from None
        return [name for name in names if name != CONTEXT_BASE_ALLOCATION]

    def connect(self, export: str, contexts: Sequence[str], listing: bool = False) -> NBD:
        """A new connection to the server (tried 1 + retry= times); OSError if none.

        It asks for base:allocation and ``contexts``; ``listing`` leaves it in
        option mode instead (to ask which contexts there are).
        """
        attempt = 0
        while True:
            h = NBD()
            h.set_export_name(export)
            h.set_opt_mode(listing)
            if not listing:
                for context in (CONTEXT_BASE_ALLOCATION, *contexts):
                    h.add_meta_context(context)
            h.set_tls(self.tls_mode)
            if self.tls_certificates:
                h.set_tls_certificates(self.tls_certificates)
            h.set_tls_verify_peer(self.tls_verify)
            try:
                if self.command is not None:
                    h.connect_systemd_socket_activation([self.command, *self.arg])
                elif self.address.transport == "unix":
                    h.connect_unix(self.address.socket)
                elif self.address.transport == "vsock":
                    h.connect_vsock(int(self.address.host), self.address.port)
                else:
                    h.connect_tcp(self.address.host, self.address.port)
                return h
            except (OSError, ProtocolError) as exc:
                h.close()
                attempt += 1
                if attempt > self.retry:
                    tries = f" (after {attempt} tries)" if attempt > 1 else ""
                    raise OSError(errno.EIO, f"nbd: cannot connect to {self.where}{tries}: "
                                  f"{exc.strerror if isinstance(exc, OSError) else exc}") from None
                log.debug("nbd: connecting to %s failed (%s); trying again", self.where, exc)
                time.sleep(1)

    def open(self, ctx: OpenContext) -> Connection:
        if self.shared_upstream is not None:
            return NbdConnection(self.shared_upstream, owned=False)
        export = ctx.export_name if self.dynamic_export else self.export_name
        return NbdConnection(Upstream(self, export), owned=True)

    def unload(self) -> None:
        if self.shared_upstream is not None:
            self.shared_upstream.close()

    def requests_are_short(self) -> bool:
        """Short when the server is local (a Unix socket, a captive command): see the manual."""
        return self.address.transport == "unix"
