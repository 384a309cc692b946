"""The client side of the transmission phase, as a sans-IO reply parser.

``Transmission`` turns commands into request headers and reply bytes into
completed commands, matching replies to commands by cookie in any order. It
understands simple replies, structured replies (OFFSET_DATA, OFFSET_HOLE,
BLOCK_STATUS, ERROR, ERROR_OFFSET, NONE) and extended headers
(BLOCK_STATUS_EXT, 64-bit lengths).

It follows asyncio's ``BufferedProtocol`` shape so a driver can receive with
``recv_into`` and no copy of read data is ever made when it can be avoided:

    t = Transmission(structured=True, extended=False, contexts={1: "base:allocation"})
    cmd, header = t.request(Cmd.READ, offset, len(buf), buf=memoryview(buf))
    send(header)                            # for WRITE: header, then the data
    while not cmd.done:
        n = sock.recv_into(t.get_buffer())  # a slice of buf itself for large data
        if n == 0: raise t.connection_lost()
        for finished in t.buffer_updated(n): ...

A finished ``Command`` carries ``error`` (an errno, 0 on success),
``message`` (the server's text, if any) and, for BLOCK_STATUS, ``extents``:
``(context id, [length, flags, length, flags, ...])`` per chunk.

Errors, the h11 way (``proto.errors``): a reply that breaks the protocol
(bad magic, a cookie nobody asked for, a chunk outside the request, a chunk
type the command cannot have, a wrong payload length) raises
``RemoteProtocolError``, and ``connection_lost()`` builds one for a server
that hung up. Any exception raised while taking in replies (``get_buffer``,
``buffer_updated``) breaks the parser for good: every later call, and every
``request``, raises ``LocalProtocolError`` naming that first failure (its
``__cause__``). A ``request`` after ``disconnect()`` is refused the same way.
"""

from __future__ import annotations

import array
import enum
import errno
import itertools
import sys
from dataclasses import dataclass, field

from . import wire
from .constants import (
    EXTENDED_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyType,
    is_error_reply_type,
)
from .errors import LocalProtocolError, RemoteProtocolError

DEFAULT_BUFFER = 256 * 1024
DIRECT_MIN = 64 * 1024  # data this large is received straight into the caller's buffer
MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024  # non-data chunk payloads larger than this are refused
_ZEROS = memoryview(bytes(1 << 20))
_SWAP = sys.byteorder == "little"


@dataclass(eq=False)
class Command:
    """One request in flight and, once ``done``, its outcome."""

    cookie: int
    cmd: int
    offset: int
    count: int
    buf: memoryview | None = None  # READ: filled in place
    error: int = 0
    message: str = ""
    covered: int = 0  # READ: bytes delivered as data or holes
    extents: list[tuple[int, list[int]]] = field(default_factory=list)
    done: bool = False
    token: object = None  # the driver's own handle (a future, say)

    def fail(self, err: int, message: str) -> None:
        """Record the first error of this command."""
        if not self.error:
            self.error, self.message = err, message


class _Rx(enum.Enum):
    HEADER = "reading a reply header"
    PAYLOAD = "reading a chunk payload"
    DATA_OFFSET = "reading a data chunk offset"
    DATA = "reading read data"


class Transmission:
    """Requests out, replies in, for one connection."""

    def __init__(self, structured: bool, extended: bool,
                 contexts: dict[int, str] | None = None,
                 buffer_size: int = DEFAULT_BUFFER) -> None:
        self.structured = structured or extended
        self.extended = extended
        self.contexts = dict(contexts or {})
        self.in_flight: dict[int, Command] = {}
        self._cookies = itertools.count(1)
        self._magics = ({EXTENDED_REPLY_MAGIC} if extended else
                        {SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC} if self.structured else
                        {SIMPLE_REPLY_MAGIC})
        self._rbuf = bytearray(buffer_size)
        self._view = memoryview(self._rbuf)
        self._start = self._end = 0
        self._rx = _Rx.HEADER
        self._need = 0  # bytes the current PAYLOAD / DATA_OFFSET step needs
        self._cmd: Command | None = None  # command whose reply is being read
        self._chunk: wire.ReplyHeader | None = None
        self._dest: memoryview = _ZEROS[:0]  # where DATA goes
        self._direct = False
        self._completed: list[Command] = []
        self._failure: BaseException | None = None  # what broke the parser, once
        self._disconnected = False
        # Set by a driver whose reads are large: receive reply headers (and a data chunk's
        # offset) on their own, so that read data never passes through the receive buffer.
        self.direct_reads = False
        header = (wire.EXTENDED_REPLY if extended else
                  wire.STRUCTURED_REPLY if self.structured else wire.SIMPLE_REPLY).size
        self._header_read = header + (wire.U64.size if self.structured else 0)

    # ----------------------------------------------------------- requests
    def request(self, cmd: int, offset: int = 0, count: int = 0, flags: int = 0,
                buf: memoryview | None = None) -> tuple[Command, bytes]:
        """Register a command; return it and the header bytes to send.

        READ fills ``buf`` (``count`` bytes); WRITE sends ``buf`` after the
        header, so ``count`` is its length.
        """
        if self._failure is not None or self._disconnected:
            raise self._refusal("request")
        if not self.extended and count > 0xFFFFFFFF:
            raise ValueError(f"request of {count} bytes needs extended headers")
        if cmd == Cmd.READ and (buf is None or len(buf) != count):
            raise ValueError("READ needs a buffer of exactly count bytes")
        if cmd == Cmd.WRITE and self.extended:
            flags |= CmdFlag.PAYLOAD_LEN  # the length is the payload's (libnbd does the same)
        command = Command(next(self._cookies), cmd, offset, count, buf)
        self.in_flight[command.cookie] = command
        return command, wire.request(flags, cmd, command.cookie, offset, count, self.extended)

    def disconnect(self) -> bytes:
        """The NBD_CMD_DISC header (it gets no reply); no request may follow it."""
        if self._disconnected:
            raise self._refusal("disconnect")
        self._disconnected = True
        return wire.request(0, Cmd.DISC, next(self._cookies), 0, 0, self.extended)

    def forget(self, command: Command) -> None:
        """Drop a command that could not be sent."""
        self.in_flight.pop(command.cookie, None)

    # ------------------------------------------------------------ replies
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the driver must put the next received bytes."""
        if self._failure is not None:
            raise self._refusal("get_buffer")
        try:
            return self._next_buffer()
        except BaseException as exc:
            self._failure = exc
            raise

    def _next_buffer(self) -> memoryview:
        if self._rx is _Rx.DATA and self._start == self._end and len(self._dest) >= DIRECT_MIN:
            self._direct = True
            return self._dest
        self._direct = False
        if self._start == self._end:
            self._start = self._end = 0
        if len(self._rbuf) - self._end < 4096 or self._need > len(self._rbuf) - self._start:
            self._compact()
        if self.direct_reads:
            return self._view[self._end:self._end + self._exact_read()]
        return self._view[self._end:]

    def _exact_read(self) -> int:
        """Bytes to ask for so as to stop at the next reply's data (``direct_reads``)."""
        if self._rx is _Rx.HEADER:
            return self._header_read
        if self._rx is _Rx.DATA:
            return len(self._dest) or self._header_read
        return max(1, self._need - (self._end - self._start))

    def buffer_updated(self, nbytes: int) -> list[Command]:
        """``nbytes`` arrived in the last buffer; return the commands finished."""
        if self._failure is not None:
            raise self._refusal("buffer_updated")
        try:
            if self._direct:
                self._dest = self._dest[nbytes:]
                self._cmd_or_fail().covered += nbytes
                if not self._dest:
                    self._data_done()
            else:
                self._end += nbytes
            self._drain()
        except BaseException as exc:
            self._failure = exc
            raise
        done, self._completed = self._completed, []
        return done

    def connection_lost(self) -> RemoteProtocolError:
        """The error for a server that hung up; every command in flight fails."""
        pending = len(self.in_flight)
        middle = self._rx is not _Rx.HEADER or self._start != self._end
        if middle:
            return RemoteProtocolError(f"server closed the connection in the middle of a reply "
                                       f"({self._rx.value})")
        return RemoteProtocolError(f"server closed the connection with {pending} command(s) "
                                   f"in flight")

    def _refusal(self, what: str) -> LocalProtocolError:
        """The error for a call the parser can no longer take."""
        failure = self._failure
        if failure is None:
            return LocalProtocolError(f"{what}: NBD_CMD_DISC was already sent")
        error = LocalProtocolError(f"{what}: the connection is unusable after an earlier error: "
                                   f"{type(failure).__name__}: {failure}")
        error.__cause__ = failure
        return error

    # ------------------------------------------------------------ parsing
    def _compact(self) -> None:
        pending = self._end - self._start
        size = max(len(self._rbuf), self._need + 4096)
        if size > len(self._rbuf):
            fresh = bytearray(size)
            fresh[:pending] = self._view[self._start:self._end]
            self._view.release()
            self._rbuf, self._view = fresh, memoryview(fresh)
        else:
            self._view[:pending] = self._view[self._start:self._end]
        self._start, self._end = 0, pending

    def _drain(self) -> None:
        while self._start < self._end:
            if self._rx is _Rx.DATA:
                self._copy_data()
                continue
            if self._rx is _Rx.HEADER:
                if not self._header():
                    return
                continue
            if self._end - self._start < self._need:
                return
            chunk = self._view[self._start:self._start + self._need]
            self._start += self._need
            if self._rx is _Rx.DATA_OFFSET:
                self._data_offset(chunk)
            else:
                self._payload(chunk)
        self._start = self._end = 0

    def _copy_data(self) -> None:
        k = min(self._end - self._start, len(self._dest))
        self._dest[:k] = self._view[self._start:self._start + k]
        self._start += k
        self._dest = self._dest[k:]
        self._cmd_or_fail().covered += k
        if not self._dest:
            self._data_done()

    def _header(self) -> bool:
        avail = self._view[self._start:self._end]
        if len(avail) < 4:
            return False
        magic = wire.U32.unpack_from(avail)[0]
        if magic not in self._magics:
            kind = "extended" if self.extended else "structured" if self.structured else "simple"
            raise RemoteProtocolError(f"bad reply magic {magic:#x} (expected {kind} replies)")
        size, header = wire.parse_reply_header(avail)
        if header is None:
            if size > len(self._rbuf):
                raise RemoteProtocolError("reply header larger than the receive buffer")
            return False
        self._start += size
        command = self.in_flight.get(header.cookie)
        if command is None:
            raise RemoteProtocolError(f"server replied to unknown cookie {header.cookie:#x}")
        self._cmd = command
        if header.type == -1:
            self._simple(command, header.error)
        else:
            self._chunk_header(command, header)
        return True

    def _simple(self, command: Command, error: int) -> None:
        if error:
            command.fail(error, "")
            self._complete(command)
        elif command.cmd == Cmd.READ and command.count:
            assert command.buf is not None
            self._dest, self._rx = command.buf, _Rx.DATA
            self._chunk = wire.ReplyHeader(REPLY_FLAG_DONE, -1, command.cookie, command.count, 0)
        else:
            self._complete(command)

    def _chunk_header(self, command: Command, header: wire.ReplyHeader) -> None:
        self._chunk = header
        rtype, length = header.type, header.length
        self._check_chunk(command, rtype, length)
        if rtype == ReplyType.OFFSET_DATA:
            self._rx, self._need = _Rx.DATA_OFFSET, 8
        elif length == 0:
            self._payload(_ZEROS[:0])
        else:
            self._rx, self._need = _Rx.PAYLOAD, length

    def _check_chunk(self, command: Command, rtype: int, length: int) -> None:
        what = f"chunk type {rtype} of {length} bytes for command {command.cmd}"
        if is_error_reply_type(rtype):
            ok = 6 <= length <= MAX_CHUNK_PAYLOAD
        elif rtype == ReplyType.NONE:
            ok = length == 0 and bool(self._chunk and self._chunk.flags & REPLY_FLAG_DONE)
        elif rtype == ReplyType.OFFSET_DATA:
            ok = command.cmd == Cmd.READ and length > 8
        elif rtype == ReplyType.OFFSET_HOLE:
            ok = command.cmd == Cmd.READ and length == wire.HOLE_PAYLOAD.size
        elif rtype == ReplyType.BLOCK_STATUS:
            ok = (command.cmd == Cmd.BLOCK_STATUS and not self.extended and length >= 12
                  and (length - 4) % 8 == 0 and length <= MAX_CHUNK_PAYLOAD)
        elif rtype == ReplyType.BLOCK_STATUS_EXT:
            ok = (command.cmd == Cmd.BLOCK_STATUS and self.extended and length >= 24
                  and (length - 8) % 16 == 0 and length <= MAX_CHUNK_PAYLOAD)
        else:
            ok = False
        if not ok:
            raise RemoteProtocolError(f"server sent an invalid reply: {what}")

    def _payload(self, chunk: memoryview) -> None:
        command, header = self._cmd_or_fail(), self._chunk
        assert header is not None
        rtype = header.type
        if is_error_reply_type(rtype):
            self._error_chunk(command, rtype, chunk)
        elif rtype == ReplyType.OFFSET_HOLE:
            self._hole(command, chunk)
        elif rtype in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            self._block_status(command, rtype, chunk)
        self._rx = _Rx.HEADER
        self._chunk_finished(command, header)

    def _chunk_finished(self, command: Command, header: wire.ReplyHeader) -> None:
        if header.flags & REPLY_FLAG_DONE:
            self._complete(command)

    def _error_chunk(self, command: Command, rtype: int, chunk: memoryview) -> None:
        err, msglen = wire.ERROR_PAYLOAD.unpack_from(chunk)
        extra = 8 if rtype == ReplyType.ERROR_OFFSET else 0
        if 6 + msglen + extra > len(chunk):
            raise RemoteProtocolError("error chunk message is longer than the chunk")
        message = bytes(chunk[6:6 + msglen]).decode("utf-8", errors="replace")
        command.fail(err or errno.EIO, message)

    def _range(self, command: Command, offset: int, length: int) -> memoryview:
        start = offset - command.offset
        if start < 0 or start + length > command.count:
            raise RemoteProtocolError(f"server sent data for {offset}+{length}, outside the request "
                                f"{command.offset}+{command.count}")
        assert command.buf is not None
        return command.buf[start:start + length]

    def _hole(self, command: Command, chunk: memoryview) -> None:
        offset, length = wire.HOLE_PAYLOAD.unpack_from(chunk)
        if length == 0:
            raise RemoteProtocolError("server sent a hole of length 0")
        zero_fill(self._range(command, offset, length))
        command.covered += length

    def _data_offset(self, chunk: memoryview) -> None:
        command, header = self._cmd_or_fail(), self._chunk
        assert header is not None
        (offset,) = wire.U64.unpack_from(chunk)
        self._dest = self._range(command, offset, header.length - 8)
        self._rx = _Rx.DATA

    def _data_done(self) -> None:
        command, header = self._cmd_or_fail(), self._chunk
        assert header is not None
        self._rx = _Rx.HEADER
        self._chunk_finished(command, header)

    def _block_status(self, command: Command, rtype: int, chunk: memoryview) -> None:
        context_id = wire.U32.unpack_from(chunk)[0]
        if self.contexts and context_id not in self.contexts:
            raise RemoteProtocolError(f"block status for meta context id {context_id} never negotiated")
        if rtype == ReplyType.BLOCK_STATUS_EXT:
            count = wire.U32.unpack_from(chunk, 4)[0]
            entries = _be_array("Q", chunk[8:])
            if count != len(entries) // 2:
                raise RemoteProtocolError("extended block status descriptor count does not match")
        else:
            entries = _be_array("I", chunk[4:])
        command.extents.append((context_id, entries.tolist()))

    def _complete(self, command: Command) -> None:
        self._rx = _Rx.HEADER
        self._cmd = None
        del self.in_flight[command.cookie]
        if command.cmd == Cmd.READ and not command.error and command.covered != command.count:
            command.fail(errno.EIO, f"server sent {command.covered} of {command.count} bytes")
        command.done = True
        self._completed.append(command)

    def _cmd_or_fail(self) -> Command:
        if self._cmd is None:  # only a driver that skipped get_buffer gets here
            raise LocalProtocolError("reply data without a reply header")
        return self._cmd


def _be_array(code: str, data: memoryview) -> array.array[int]:
    values = array.array(code)  # "I" is 32 and "Q" 64 bits on every platform pynbd runs on
    values.frombytes(data)
    if _SWAP:
        values.byteswap()
    return values


def zero_fill(view: memoryview) -> None:
    """Fill ``view`` with zero bytes, a megabyte at a time."""
    for start in range(0, len(view), len(_ZEROS)):
        piece = view[start:start + len(_ZEROS)]
        piece[:] = _ZEROS[:len(piece)]
