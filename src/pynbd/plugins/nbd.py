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
    - Speed: the proxy answers reads later (``AsyncReads``): each read a
      client sends is passed on as soon as it is read, many in flight on one
      upstream connection, the requests read together sent in one ``sendmsg``;
      a thread per upstream connection receives the answers and the replies
      to the client leave from it, those of one receive in one send. Writes,
      zeroes, trims, flushes, block status and cache wait for their answer,
      so a FLUSH still covers every write answered before it. (Only when
      every filter above passes reads through unchanged; otherwise reads
      wait for their answer too.) Over TLS one command runs at a time per
      upstream connection. With a server on a Unix socket (or a captive
      command) the other commands run on the thread that reads them
      (``short_requests``); over TCP on the worker pool (-t), with several
      connections.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

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
from ..backend.connection import Completions
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
from ..client.common import command_error, extents_by_name
from ..client.stream_sync import sendmsg_all
from ..client.sync import widen_send_buffer
from ..proto.client_transmission import Command
from ..proto.constants import Cmd

log = logging.getLogger("pynbd.plugins.nbd")

NBD_PORT = 10809
_TLS_MODES = {"off": TLS_DISABLE, "on": TLS_ALLOW, "require": TLS_REQUIRE}
_MAX_STATUS = 1 << 31  # the most one block-status request asks about
READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = (
    int(c) for c in (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                     Cmd.BLOCK_STATUS))


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


class Waiter:
    """The ``Completions`` of one command whose caller waits for it (``Link.run``)."""

    __slots__ = ("error", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.error: OSError | None = None

    def read_done(self, tag: object, error: OSError | None) -> None:
        self.error = error
        self.lock.release()

    write_done = read_done  # (the same for any command)

    def burst_done(self) -> None:
        """Nothing to gather: the caller was woken by ``read_done``."""

    def wait(self) -> None:
        self.lock.acquire()
        if self.error is not None:
            raise self.error


LostCallback = Callable[["Link | LockstepLink", BaseException], None]


def deliver(commands: Sequence[Command], failure: OSError | None = None) -> None:
    """Report finished commands to their ``Completions`` (``command.token``: (sink, tag)),
    then tell each sink that got one that this burst is over."""
    touched: list[Completions] = []
    for command in commands:
        sink, tag = cast("tuple[Completions, object]", command.token)
        sink.read_done(tag, failure or (command_error(command) if command.error else None))
        if not touched or touched[-1] is not sink and sink not in touched:
            touched.append(sink)
    for sink in touched:
        sink.burst_done()


class Link:
    """One connection to the server with many commands in flight.

    ``start`` registers a command and queues its request (a READ's data will
    land in the caller's buffer); ``push`` sends every request queued since
    the last push in one ``sendmsg`` (write payloads included, not copied).
    A receiving thread takes the replies in any order, reports each command
    to its ``Completions`` and, after each receive, calls ``burst_done``
    on those it reported to, so a burst of answers leaves as one burst.
    ``run`` is start, push and wait, raising the command's error.

    When the connection fails, every command in flight fails with EIO, the
    link is dead (later commands raise at once) and ``on_lost`` tells the
    ``Upstream``, which connects again for the next request. (Over TLS,
    where one SSL connection cannot be read and written by two threads at
    once, ``LockstepLink`` serves instead.)
    """

    def __init__(self, handle: NBD, where: str, on_lost: LostCallback) -> None:
        self.handle = handle
        self.where = where
        self.on_lost = on_lost
        self.contexts = handle.negotiated.meta_contexts
        self.lock = threading.Lock()  # queueing and sending
        self.queued: list[memoryview] = []
        self.dead: OSError | None = None
        self.closing = False
        self.sock, self.tx = handle.stream().hand_over()
        widen_send_buffer(self.sock)
        self.thread = threading.Thread(target=self.receive, daemon=True, name=f"nbd-upstream {where}")
        self.thread.start()

    def start(self, cmd: int, offset: int, count: int, flags: int, buf: memoryview | None,
              sink: Completions, tag: object) -> Command:
        with self.lock:
            if self.dead is not None:
                raise self.dead
            command, header = self.tx.request(cmd, offset, count, flags, buf if cmd == READ else None)
            command.token = (sink, tag)
            self.queued.append(memoryview(header))
            if cmd == WRITE and buf is not None:
                self.queued.append(buf)
        return command

    def push(self) -> None:
        if not self.queued:
            return
        with self.lock:
            parts, self.queued = self.queued, []
            try:
                sendmsg_all(self.sock, parts)
            except OSError as exc:
                self._shut(exc)  # the receiver fails what is in flight

    def run(self, cmd: int, offset: int, count: int, flags: int,
            buf: memoryview | None = None) -> Command:
        waiter = Waiter()
        command = self.start(cmd, offset, count, flags, buf, waiter, None)
        self.push()
        waiter.wait()
        return command

    def receive(self) -> None:
        sock, tx = self.sock, self.tx
        try:
            while True:
                n = sock.recv_into(tx.get_buffer())
                if n == 0:
                    if self.closing and not tx.in_flight:
                        return
                    raise tx.connection_lost()
                finished = tx.buffer_updated(n)
                if finished:
                    deliver(finished)
        except Exception as exc:  # noqa: BLE001 (whatever ends the receiver fails the commands)
            if not isinstance(exc, (OSError, ProtocolError)):
                log.exception("nbd: receiving from %s failed", self.where)
            self.lost(exc)

    def _shut(self, exc: BaseException) -> None:
        """Record why the link died (the lock is held) and wake the receiver."""
        if self.dead is None:
            self.dead = OSError(errno.EIO, f"nbd: connection to the server lost: {exc}")
        with contextlib.suppress(OSError):  # the socket may be gone already
            self.sock.shutdown(socket.SHUT_RDWR)

    def lost(self, exc: BaseException) -> None:
        """On the receiver: fail every command in flight, tell the Upstream, let go."""
        with self.lock:
            self._shut(exc)
            failed = list(self.tx.in_flight.values())
            for command in failed:
                self.tx.forget(command)
        if not self.closing:
            self.on_lost(self, exc)
        deliver(failed, self.dead)
        if not self.closing:
            close_quietly(self.handle)

    def close(self) -> None:
        """Stop the receiver (commands still in flight fail) and close the connection."""
        self.closing = True
        with contextlib.suppress(OSError):  # already gone is as good as shut
            self.sock.shutdown(socket.SHUT_RD)
        if self.thread is not threading.current_thread():
            self.thread.join()
        close_quietly(self.handle)


class LockstepLink:
    """``Link``'s face over TLS: each command runs to its answer on the caller's thread."""

    def __init__(self, handle: NBD, where: str, on_lost: LostCallback) -> None:
        self.handle = handle
        self.where = where
        self.on_lost = on_lost
        self.contexts = handle.negotiated.meta_contexts
        self.stream = handle.stream()
        self.dead: OSError | None = None

    def run(self, cmd: int, offset: int, count: int, flags: int,
            buf: memoryview | None = None) -> Command:
        if self.dead is not None:
            raise self.dead
        try:
            command = self.stream.run(cmd, offset, count, flags, buf)
        except (OSError, ProtocolError) as exc:
            self.dead = OSError(errno.EIO, f"nbd: connection to the server lost: {exc}")
            self.on_lost(self, exc)
            close_quietly(self.handle)
            raise self.dead from None
        error = command_error(command)
        if error is not None:
            raise error
        return command

    def start(self, cmd: int, offset: int, count: int, flags: int, buf: memoryview | None,
              sink: Completions, tag: object) -> None:
        try:
            self.run(cmd, offset, count, flags, buf)
        except OSError as exc:
            sink.read_done(tag, exc)
        else:
            sink.read_done(tag, None)
        sink.burst_done()

    def push(self) -> None:
        """Nothing is ever queued."""

    def close(self) -> None:
        close_quietly(self.handle)


def close_quietly(handle: NBD) -> None:
    try:
        handle.close()
    except (OSError, ProtocolError) as exc:
        log.debug("nbd: closing a connection: %s", exc)


class Upstream:
    """The connections to the server that one client (or all, when shared) uses.

    Requests go round the links; a link that failed is replaced by the next
    request that needs it (``connect`` again, with retry=).
    """

    def __init__(self, plugin: NbdPlugin, export: str) -> None:
        self.plugin = plugin
        self.export = export
        self.lock = threading.Lock()
        self.contexts = plugin.upstream_contexts(export)
        first = plugin.connect(export, self.contexts)
        self.first = first
        self.size = first.get_size()
        self.links: list[Link | LockstepLink | None] = [self.link(first)]
        if first.can_multi_conn() and plugin.command is None:
            self.links += [self.link(plugin.connect(export, self.contexts))
                           for _ in range((plugin.connections or 1) - 1)]
        self.turn = itertools.cycle(range(len(self.links)))

    def link(self, handle: NBD) -> Link | LockstepLink:
        kind = LockstepLink if handle.get_tls_negotiated() else Link
        return kind(handle, self.plugin.where, self.lost)

    def facts(self) -> NBD:
        """A connected handle to ask the export's flags of (they are the same on all)."""
        return self.first

    def next_link(self) -> Link | LockstepLink:
        index = next(self.turn)
        link = self.links[index]
        if link is None:
            with self.lock:
                link = self.links[index]
                if link is None:
                    link = self.reconnect(index)
        return link

    def reconnect(self, index: int) -> Link | LockstepLink:
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
        link = self.links[index] = self.link(handle)
        return link

    def lost(self, link: Link | LockstepLink, exc: BaseException) -> None:
        """A link's connection failed: drop it (the next request reconnects)."""
        with self.lock:
            if link in self.links:
                self.links[self.links.index(link)] = None
                log.error("nbd: lost the connection to %s: %s", self.plugin.where, exc)

    def push(self) -> None:
        for link in self.links:
            if link is not None:
                link.push()

    def close(self) -> None:
        links, self.links = self.links, []
        for link in links:
            if link is not None:
                link.close()


class NbdConnection(Connection):
    """One client's view: its upstream connections (or the shared ones).

    It offers ``AsyncReads``: the server starts reads (``start_pread``) and
    they are answered from the links' receiving threads.
    """

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
    def run(self, cmd: int, offset: int, count: int, flags: int,
            buf: memoryview | None = None) -> Command:
        return self.upstream.next_link().run(cmd, offset, count, flags, buf)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.run(READ, offset, len(buf), 0, buf)

    def start_pread(self, buf: memoryview, offset: int, flags: int, tag: object,
                    completions: Completions) -> None:
        self.upstream.next_link().start(READ, offset, len(buf), 0, buf, completions, tag)

    def send_started(self) -> None:
        self.upstream.push()

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.run(WRITE, offset, len(buf), command_flags(flags), buf)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.run(WRITE_ZEROES, offset, count,
                 command_flags(flags) | (0 if flags & FLAG_MAY_TRIM else CMD_FLAG_NO_HOLE))

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.run(TRIM, offset, count, command_flags(flags))

    def flush(self, flags: int) -> None:
        self.run(FLUSH, 0, 0, 0)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.run(CACHE, offset, count, 0)

    def status(self, context: str, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) runs the server reports in ``context`` from ``offset``."""
        link = self.upstream.next_link()
        command = link.run(BLOCK_STATUS, offset, min(count, _MAX_STATUS), command_flags(flags))
        entries = extents_by_name(link.contexts, command).get(context, [])
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
