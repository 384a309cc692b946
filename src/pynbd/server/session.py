"""One client connection: the handshake, then the transmission phase.

``Session`` drives the sans-IO handshake (``proto.server_handshake``) over
the socket, then hands the connection to a ``RequestLoop`` (see
``requests.py``), which runs requests inline or on worker threads. This
module holds what every request needs whichever way it runs: validation
against the export's flags, the calls into the stack, and the replies —
each one ``sendmsg`` of the header and the data memoryview, under
``send_lock`` so that worker threads never interleave their replies.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    FUA_EMULATE,
    ZERO_BUFFER,
    Buffer,
    Extent,
    OpenContext,
    clip_extents,
)
from ..backend.connection import Connection
from ..backend.stack import Stack
from ..proto import wire
from ..proto.constants import (
    Cmd,
    CmdFlag,
)
from ..proto.constants import (
    TransmissionFlag as TF,
)
from ..proto.errors import ProtocolError
from ..proto.server_handshake import Closed, NeedData, Ready, Send, ServerHandshake, StartTLS
from .catalog import StackCatalog
from .requests import RequestLoop

log = logging.getLogger("pynbd.server")

# Hot-path constants as plain ints.
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _ZERO, _BLOCK_STATUS = (
    Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS)
_F_FUA, _F_NO_HOLE, _F_DF, _F_REQ_ONE, _F_FAST_ZERO, _F_PAYLOAD_LEN = (
    int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF), int(CmdFlag.REQ_ONE),
    int(CmdFlag.FAST_ZERO), int(CmdFlag.PAYLOAD_LEN))
_ALLOWED_FLAGS = {
    _READ: _F_DF, _WRITE: _F_FUA, _FLUSH: 0, _TRIM: _F_FUA, _CACHE: 0,
    _ZERO: _F_FUA | _F_NO_HOLE | _F_FAST_ZERO, _BLOCK_STATUS: _F_REQ_ONE, _DISC: 0,
}


def allowed_flags(extended: bool, df: bool) -> dict[int, int]:
    """Command flags a client may set, per command, for what was negotiated.

    With extended headers a write carries NBD_CMD_FLAG_PAYLOAD_LEN; DF is
    valid only when the export advertised it (structured replies).
    """
    table = dict(_ALLOWED_FLAGS)
    if extended:
        table[_WRITE] |= _F_PAYLOAD_LEN
    if not df:
        table[_READ] &= ~_F_DF
    return table
_TF_READ_ONLY, _TF_SEND_TRIM, _TF_SEND_WRITE_ZEROES, _TF_SEND_FAST_ZERO, _TF_SEND_CACHE = (
    int(TF.READ_ONLY), int(TF.SEND_TRIM), int(TF.SEND_WRITE_ZEROES), int(TF.SEND_FAST_ZERO),
    int(TF.SEND_CACHE))
_WIRE_ERRNO = {errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
               errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN}
_ERRNO_ALIASES = {errno.EROFS: errno.EPERM, errno.EACCES: errno.EPERM,
                  errno.EFBIG: errno.ENOSPC, errno.EDQUOT: errno.ENOSPC,
                  errno.ERANGE: errno.EINVAL}
IOV_MAX = 1024  # buffers one sendmsg takes (Linux UIO_MAXIOV)
HOLE_SCAN_MIN = 64 * 1024  # reads at least this long look for holes to skip
MAX_EXTENTS_PER_REPLY = 128 * 1024


Piece = tuple[int, int, "list[Buffer] | None"]  # (offset, length, data buffers or None for a hole)


def _pieces_of_buffers(offset: int, buffers: Sequence[Buffer]) -> list[Piece]:
    """Group a plugin's read buffers into data runs and hole runs (views of ZERO_BUFFER)."""
    pieces: list[Piece] = []
    pos = offset
    for buf in buffers:
        hole = type(buf) is memoryview and buf.obj is ZERO_BUFFER
        if pieces and (pieces[-1][2] is None) == hole:
            start, size, bufs = pieces[-1]
            if bufs is not None:
                bufs.append(buf)
            pieces[-1] = (start, size + len(buf), bufs)
        else:
            pieces.append((pos, len(buf), None if hole else [buf]))
        pos += len(buf)
    return pieces


def _pieces_around_holes(conn: Connection, offset: int, length: int, holes: list[Extent]) -> list[Piece]:
    """Data read with pread between the holes the extents reported."""
    pieces: list[Piece] = []
    pos = offset
    for hole in [*holes, Extent(offset + length, 0)]:
        if hole.offset > pos:
            view = memoryview(bytearray(hole.offset - pos))
            conn.pread(view, pos, 0)
            pieces.append((pos, len(view), [view]))
        if hole.length:
            pieces.append((hole.offset, hole.length, None))
        pos = hole.offset + hole.length
    return pieces


def wire_errno(err: int) -> int:
    """The NBD error value for a local errno."""
    err = _ERRNO_ALIASES.get(err, err)
    return err if err in _WIRE_ERRNO else errno.EIO


class ClientGone(Exception):
    """The client closed the connection or the socket failed."""


@dataclass
class SessionConfig:
    """What every session of one server shares."""

    stack: Stack
    readonly: bool = False
    tls: str = "off"
    ssl_context: ssl.SSLContext | None = None
    threads: int = 16
    exportname: str | None = None  # -e: the only name served
    description: str = ""
    request_lock: threading.Lock | None = None  # serialize_all_requests
    inline: bool = False  # serve requests on the reading thread (non-blocking stacks)


class Session:
    """Serves one connected client until it disconnects."""

    def __init__(self, sock: socket.socket, config: SessionConfig, address: object = None) -> None:
        self.sock = sock
        self.config = config
        self.address = address
        self.send_lock = threading.Lock()
        self.conn: Connection | None = None
        self.size = 0
        self.flags = 0
        self.max_payload = 0
        self.structured = False
        self.extended = False
        self.contexts: dict[int, str] = {}
        self.fua_emulated = False
        self.fua_native = FLAG_FUA
        self.allowed = _ALLOWED_FLAGS
        self.refused: dict[int, int] = {}
        self._use_sendmsg = True

    # ------------------------------------------------------------- lifecycle
    def run(self) -> None:
        """Handshake, serve, clean up. Never raises."""
        try:
            if self._handshake():
                self._transmission()
        except ClientGone as exc:
            log.debug("client %s went away: %s", self.address, exc)
        except ProtocolError as exc:
            log.warning("client %s: protocol error: %s", self.address, exc)
        except Exception:  # noqa: BLE001 (a session never takes the server down)
            log.exception("client %s: unexpected error", self.address)
        finally:
            self._close()

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the plugin connection failed")
        with contextlib.suppress(OSError):  # closing is all that is left to do with it
            self.sock.close()

    # ------------------------------------------------------------- socket I/O
    def _recv_exact(self, view: memoryview) -> None:
        sock = self.sock
        flags = socket.MSG_WAITALL if self._use_sendmsg else 0
        got = 0
        need = len(view)
        while got < need:
            try:
                n = sock.recv_into(view[got:], need - got, flags)
            except (OSError, ValueError) as exc:
                raise ClientGone(str(exc)) from None
            if n == 0:
                raise ClientGone("end of stream" if got == 0 else "connection closed mid-message")
            got += n

    def _recv_bytes(self, size: int) -> bytes:
        buf = bytearray(size)
        self._recv_exact(memoryview(buf))
        return bytes(buf)

    def _send_now(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send all parts, in one sendmsg when the socket allows it."""
        with self.send_lock:
            try:
                if not self._use_sendmsg:
                    self.sock.sendall(b"".join(parts))
                    return
                for first in range(0, len(parts), IOV_MAX):
                    group = parts[first:first + IOV_MAX] if len(parts) > IOV_MAX else parts
                    sent = self.sock.sendmsg(group)
                    if sent < sum(len(p) for p in group):
                        self._send_rest(group, sent)
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    # Replies go through _send; the inline loop points it at its batching arena.
    _send = _send_now

    def _send_rest(self, parts: Sequence[bytes | memoryview], sent: int) -> None:
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            self.sock.sendall(memoryview(part)[sent:])
            sent = 0

    # ------------------------------------------------------------- handshake
    def _handshake(self) -> bool:
        cfg = self.config
        ctx = OpenContext(readonly=cfg.readonly, client_address=self.address,
                          extra={"disconnect": self._stop})  # plugins may drop their client
        catalog = StackCatalog(cfg.stack, ctx, cfg.description)
        hs = ServerHandshake(catalog, tls=cfg.tls, forced_export=cfg.exportname)
        try:
            self._send([hs.greeting()])
            while True:
                event = hs.next_event()
                if isinstance(event, NeedData):
                    hs.receive_data(self._recv_bytes(event.size))
                elif isinstance(event, Send):
                    self._send([event.data])
                elif isinstance(event, StartTLS):
                    self._send([event.data])
                    self._start_tls()
                    ctx.tls = True
                    hs.tls_established()
                elif isinstance(event, Ready):
                    self._enter_transmission(event)
                    if event.reply:
                        self._send([event.reply])
                    return True
                elif isinstance(event, Closed):
                    log.debug("client %s: handshake ended: %s", self.address, event.reason)
                    if event.reply:
                        self._send([event.reply])
                    return False
        except BaseException:
            hs.abandon()
            raise

    def _start_tls(self) -> None:
        context = self.config.ssl_context
        assert context is not None, "STARTTLS accepted without a TLS context"
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise ClientGone(f"TLS handshake failed: {exc}") from None
        self._use_sendmsg = False

    def _enter_transmission(self, ready: Ready) -> None:
        info = ready.export
        self.conn = info.handle  # type: ignore[assignment]
        self.size = info.size
        self.flags = int(info.flags)
        self.max_payload = info.block_size[2]
        self.structured = ready.structured_replies
        self.extended = ready.extended_headers
        self.contexts = ready.meta_contexts
        self.refused = self._refusals()
        self.allowed = allowed_flags(self.extended, bool(info.flags & TF.SEND_DF))
        self.fua_emulated = bool(info.flags & TF.SEND_FUA) and self.conn.can_fua() == FUA_EMULATE
        self.fua_native = 0 if self.fua_emulated else FLAG_FUA  # what a FUA request passes down
        log.debug("client %s: serving export %r, %d bytes", self.address, info.name, info.size)

    # ------------------------------------------------------------- transmission
    def _transmission(self) -> None:
        cfg = self.config
        workers = 0 if cfg.inline or cfg.threads <= 1 else cfg.threads
        loop = RequestLoop(self, workers, cfg.request_lock)
        try:
            loop.run()
        except ClientGone as exc:
            log.debug("client %s: %s", self.address, exc)
        except ProtocolError as exc:
            log.warning("client %s: %s; disconnecting", self.address, exc)
        except OSError as exc:
            log.debug("client %s: %s", self.address, exc)
        finally:
            with contextlib.suppress(ClientGone):  # replies still queued have nobody to go to
                loop.close()
            self._stop()

    def _stop(self) -> None:
        """Stop reading requests: the request loop's next receive sees the end."""
        with contextlib.suppress(OSError):  # the client may have closed it already
            self.sock.shutdown(socket.SHUT_RD)

    # ------------------------------------------------------------- requests
    def _execute(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                 payload: memoryview | None, scratch: bytearray) -> None:
        err = self._check(flags, cmd, offset, length, payload)
        if err:
            self._reply_error(cookie, cmd, err, offset, "invalid request")
            return
        conn = self.conn
        try:
            if cmd == _READ:
                self._read(conn, cookie, offset, length, flags, scratch)
                return
            fua = self.fua_native if flags & _F_FUA else 0
            if cmd == _WRITE:
                conn.pwrite(payload, offset, fua)
            elif cmd == _ZERO:
                zflags = fua | (0 if flags & _F_NO_HOLE else FLAG_MAY_TRIM)
                if flags & _F_FAST_ZERO:
                    zflags |= FLAG_FAST_ZERO
                conn.zero(length, offset, zflags)
            elif cmd == _TRIM:
                conn.trim(length, offset, fua)
            elif cmd == _FLUSH:
                conn.flush(0)
            elif cmd == _CACHE:
                conn.cache(length, offset, 0)
            elif cmd == _BLOCK_STATUS:
                self._block_status(conn, cookie, offset, length, flags)
                return
            if flags & _F_FUA and self.fua_emulated:
                conn.flush(0)  # FUA is only allowed on writes, trims and zeroes
        except ClientGone:
            raise
        except OSError as exc:
            log.debug("client %s: command %d failed: %s", self.address, cmd, exc)
            self._reply_error(cookie, cmd, wire_errno(exc.errno or errno.EIO), offset,
                              exc.strerror or str(exc))
            return
        except Exception as exc:  # noqa: BLE001 (a plugin bug fails one request)
            log.exception("client %s: command %d at %d+%d raised", self.address, cmd, offset, length)
            self._reply_error(cookie, cmd, errno.EIO, offset, f"{type(exc).__name__}: {exc}")
            return
        if self.extended:
            self._send((wire.done_chunk(cookie, True, offset),))
        else:
            self._send((wire.simple_reply(cookie),))

    def _check(self, flags: int, cmd: int, offset: int, length: int,
               payload: memoryview | None) -> int:
        """The errno a request is refused with before it reaches the stack, or 0."""
        allowed = self.allowed.get(cmd)
        if allowed is None or flags & ~allowed:
            return errno.EINVAL
        refused = self.refused[cmd]
        if refused or cmd == _FLUSH:
            return refused
        if cmd == _WRITE and payload is None:
            return errno.EINVAL  # larger than the advertised maximum
        if cmd == _READ and length > self.max_payload:
            return errno.EINVAL
        if cmd == _ZERO and flags & _F_FAST_ZERO and not self.flags & _TF_SEND_FAST_ZERO:
            return errno.EINVAL
        if length == 0 and cmd != _BLOCK_STATUS:
            return errno.EINVAL
        if offset + length > self.size:
            return errno.ENOSPC if cmd == _WRITE or cmd == _ZERO else errno.EINVAL
        return 0

    def _refusals(self) -> dict[int, int]:
        """Per command, the errno it always gets on this export (0: allowed)."""
        flags = self.flags
        read_only = errno.EPERM if flags & _TF_READ_ONLY else 0
        return {
            _READ: 0, _FLUSH: 0, _DISC: 0,
            _WRITE: read_only,
            _TRIM: read_only or (0 if flags & _TF_SEND_TRIM else errno.EINVAL),
            _ZERO: read_only or (0 if flags & _TF_SEND_WRITE_ZEROES else errno.EINVAL),
            _CACHE: 0 if flags & _TF_SEND_CACHE else errno.EINVAL,
            _BLOCK_STATUS: 0 if self.contexts else errno.EINVAL,
        }

    def _read(self, conn: Connection, cookie: int, offset: int, length: int, flags: int,
              scratch: bytearray) -> None:
        # Long reads with structured replies send runs of zeroes as OFFSET_HOLE.
        scan = self.structured and length >= HOLE_SCAN_MIN and not flags & _F_DF
        header = (wire.read_data_header(cookie, offset, length, True, self.extended)
                  if self.structured else wire.simple_reply(cookie))
        buffers = conn.pread_buffers(length, offset, 0)
        if buffers is not None:
            if scan and any(type(b) is memoryview and b.obj is ZERO_BUFFER for b in buffers):
                self._send_pieces(cookie, offset, _pieces_of_buffers(offset, buffers))
            else:
                self._send([header, *buffers])
            return
        if scan and conn.can_extents():
            holes = [e for e in clip_extents(conn.extents(length, offset, 0), offset, length) if e.zero]
            if holes:
                self._send_pieces(cookie, offset, _pieces_around_holes(conn, offset, length, holes))
                return
        if len(scratch) >= length:
            view = memoryview(scratch)[:length]
        else:
            view = memoryview(bytearray(length))
        conn.pread(view, offset, 0)
        self._send([header, view])

    def _send_pieces(self, cookie: int, offset: int, pieces: list[Piece]) -> None:
        """OFFSET_DATA and OFFSET_HOLE chunks of one read; the last one is DONE."""
        ext = self.extended
        last = len(pieces) - 1
        for index, (start, size, buffers) in enumerate(pieces):
            if buffers is None:
                self._send([wire.hole_chunk(cookie, start, size, index == last, ext, offset)])
            else:
                self._send([wire.read_data_header(cookie, start, size, index == last, ext, offset),
                            *buffers])

    def _block_status(self, conn: Connection, cookie: int, offset: int, length: int,
                      flags: int) -> None:
        length = max(0, min(length, self.size - offset))
        req_one = bool(flags & _F_REQ_ONE)
        if length == 0:
            raise OSError(errno.EINVAL, "block status past the end of the export")
        if conn.can_extents():
            found = conn.extents(length, offset, FLAG_REQ_ONE if req_one else 0)
        else:
            found = (Extent(offset, length),)
        descriptors = []
        for ext in clip_extents(found, offset, length, req_one):
            descriptors.append((ext.length, ext.state))
            if len(descriptors) >= MAX_EXTENTS_PER_REPLY:
                break
        if not descriptors:
            raise OSError(errno.EIO, "the plugin returned no extent at the requested offset")
        ids = list(self.contexts)
        for index, context_id in enumerate(ids):
            self._send([wire.block_status_chunk(cookie, context_id, descriptors,
                                                index == len(ids) - 1, self.extended, offset)])

    def _reply_error(self, cookie: int, cmd: int, err: int, offset: int, message: str) -> None:
        if self.extended or (self.structured and cmd in (_READ, _BLOCK_STATUS)):
            self._send([wire.error_chunk(cookie, err, message, self.extended, offset)])
        else:
            self._send([wire.simple_reply(cookie, err)])
