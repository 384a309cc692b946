"""The server side of the transmission phase, as pure code: no socket, no thread.

What the server's request loop needs from the protocol, in three parts, each
tested with byte strings alone (``tests/proto/test_server_transmission.py``):

1. **Parsing.** ``parse_request(data, pos)`` reads the request header at
   ``pos`` (compact: 28 bytes, extended: 32), checks its magic and says how
   many payload bytes follow it (a write's data; with extended headers, any
   command flagged ``PAYLOAD_LEN``). A bad magic or an extended payload over
   the limit is a ``RemoteProtocolError``: the stream can no longer be framed.
2. **Validation** against what the client was told (``Terms``): ``check``
   returns ``None`` for a request the stack may run, else a ``Refusal``
   (errno and message): an unknown command or flag, a flag not negotiated
   (DF without structured replies, FAST_ZERO not advertised…), a write on a
   read-only export, a range past the end, an offset or length not aligned
   to the advertised minimum block size, a read or write over the maximum.
3. **Replies.** ``ok``, ``error``, ``read_header``, ``read_chunks`` (data and
   hole chunks of one read, holes being views of ``zero_buffer``) and
   ``block_status``, as simple replies, structured chunks or extended
   chunks — whichever was negotiated — with 32- or 64-bit descriptors.

The server (``pynbd.server``) owns the socket and the stack; it feeds bytes
here and sends what comes back. There is one request parser in the package,
this one.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from . import wire
from .constants import (
    EXTENDED_REQUEST_MAGIC,
    EXTENDED_REQUEST_SIZE,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    Cmd,
    CmdFlag,
)
from .constants import TransmissionFlag as TF
from .errors import RemoteProtocolError

READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, BLOCK_STATUS = (
    int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.CACHE),
    int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS))
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO, F_PAYLOAD_LEN = (
    int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF), int(CmdFlag.REQ_ONE),
    int(CmdFlag.FAST_ZERO), int(CmdFlag.PAYLOAD_LEN))

COMMAND_NAMES = {READ: "read", WRITE: "write", DISC: "disconnect", FLUSH: "flush", TRIM: "trim",
                 CACHE: "cache", ZERO: "write zeroes", BLOCK_STATUS: "block status"}

# The flags each command takes at most (the protocol's table); what the
# export negotiated narrows it further (``Terms.allowed_flags``).
COMMAND_FLAGS = {READ: F_DF, WRITE: F_FUA | F_PAYLOAD_LEN, DISC: 0, FLUSH: 0, TRIM: F_FUA, CACHE: 0,
                 ZERO: F_FUA | F_NO_HOLE | F_FAST_ZERO, BLOCK_STATUS: F_REQ_ONE}

_WIRE_ERRNO = frozenset({errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                         errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN})
_ERRNO_ALIASES = {errno.EROFS: errno.EPERM, errno.EACCES: errno.EPERM,
                  errno.EFBIG: errno.ENOSPC, errno.EDQUOT: errno.ENOSPC,
                  errno.ERANGE: errno.EINVAL}

MAX_EXTENTS_PER_REPLY = 128 * 1024

Buffer = bytes | bytearray | memoryview


def wire_errno(err: int) -> int:
    """The NBD error value for a local errno (the protocol allows a few)."""
    err = _ERRNO_ALIASES.get(err, err)
    return err if err in _WIRE_ERRNO else errno.EIO


class Refusal(NamedTuple):
    """Why a request is refused before it reaches the stack."""

    errno: int
    message: str


@dataclass(frozen=True)
class Terms:
    """What the handshake told the client: the rules its requests must keep."""

    size: int
    flags: int  # transmission flags as sent
    block_size: tuple[int, int, int] = (1, 4096, 32 * 1024 * 1024)  # minimum, preferred, maximum
    structured: bool = False
    extended: bool = False
    contexts: dict[int, str] = field(default_factory=dict)  # negotiated meta context ids


class ServerTransmission:
    """Parses, checks and answers one client's requests under ``terms``."""

    def __init__(self, terms: Terms) -> None:
        self.terms = terms
        self.size = terms.size
        self.extended = terms.extended
        self.structured = terms.structured
        self.max_payload = terms.block_size[2]
        minimum = terms.block_size[0]
        self.alignment = minimum if minimum > 1 else 0
        self.header_size = EXTENDED_REQUEST_SIZE if terms.extended else REQUEST_SIZE
        self._unpack = (wire.EXTENDED_REQUEST if terms.extended else wire.REQUEST).unpack_from
        self._magic = EXTENDED_REQUEST_MAGIC if terms.extended else REQUEST_MAGIC
        self.allowed_flags = self._allowed_flags()
        self.refusals = self._refusals()

    # ------------------------------------------------------------- parsing
    def parse_request(self, data: bytes | bytearray | memoryview, pos: int = 0
                      ) -> tuple[int, int, int, int, int, int]:
        """(flags, command, cookie, offset, length, payload) of the header at ``pos``.

        ``payload`` is how many payload bytes follow the header: a compact
        write carries ``length`` bytes; with extended headers any command
        flagged PAYLOAD_LEN does, and one over the maximum cannot be skipped
        safely, so it ends the connection. (A compact write over the maximum
        is read and dropped by the caller, then refused by ``check``.)
        """
        magic, flags, cmd, cookie, offset, length = self._unpack(data, pos)
        if magic != self._magic:
            raise RemoteProtocolError(f"bad request magic {magic:#x}, expected {self._magic:#x}")
        if not self.extended:
            return flags, cmd, cookie, offset, length, length if cmd == WRITE else 0
        if not flags & F_PAYLOAD_LEN:
            return flags, cmd, cookie, offset, length, 0
        if length > self.max_payload:
            raise RemoteProtocolError(f"payload of {length} bytes is over the maximum "
                                      f"{self.max_payload}")
        return flags, cmd, cookie, offset, length, length

    # ------------------------------------------------------------- validation
    def _allowed_flags(self) -> dict[int, int]:
        table = dict(COMMAND_FLAGS)
        if not self.extended:
            table[WRITE] &= ~F_PAYLOAD_LEN
        if self.extended and self.terms.flags & TF.BLOCK_STAT_PAYLOAD:
            table[BLOCK_STATUS] |= F_PAYLOAD_LEN  # the payload selects the contexts to answer
        if not self.terms.flags & TF.SEND_DF:
            table[READ] &= ~F_DF
        if not self.terms.flags & TF.SEND_FAST_ZERO:
            table[ZERO] &= ~F_FAST_ZERO
        if not self.terms.flags & TF.SEND_FUA:
            for cmd in (WRITE, TRIM, ZERO):
                table[cmd] &= ~F_FUA
        return table

    def _refusals(self) -> dict[int, Refusal | None]:
        """Per command, the refusal it always gets on this export (None: allowed)."""
        flags = self.terms.flags

        def unless(bit: int, what: str) -> Refusal | None:
            return None if flags & bit else Refusal(errno.EINVAL, f"the export does not {what}")

        read_only = Refusal(errno.EPERM, "the export is read-only") if flags & TF.READ_ONLY else None
        return {
            READ: None, DISC: None,
            FLUSH: unless(TF.SEND_FLUSH, "support flush"),
            WRITE: read_only,
            TRIM: read_only or unless(TF.SEND_TRIM, "support trim"),
            ZERO: read_only or unless(TF.SEND_WRITE_ZEROES, "support write zeroes"),
            CACHE: unless(TF.SEND_CACHE, "support cache"),
            BLOCK_STATUS: None if self.terms.contexts else Refusal(
                errno.EINVAL, "no metadata context was negotiated"),
        }

    def check(self, flags: int, cmd: int, offset: int, length: int) -> Refusal | None:
        """None if the request may run, else why it is refused."""
        allowed = self.allowed_flags.get(cmd)
        if allowed is None:
            return Refusal(errno.EINVAL, f"unknown command {cmd}")
        refusal = self.refusals[cmd]
        if refusal is not None:
            return refusal
        if flags & ~allowed:
            return Refusal(errno.EINVAL, f"{COMMAND_NAMES[cmd]}: flags {flags & ~allowed:#x} are "
                                         f"not allowed here")
        if cmd == FLUSH:
            return None
        if cmd == WRITE and self.extended and not flags & F_PAYLOAD_LEN:
            return Refusal(errno.EINVAL, "write without PAYLOAD_LEN: no data was sent")
        if length == 0 and cmd != BLOCK_STATUS:
            return Refusal(errno.EINVAL, f"{COMMAND_NAMES[cmd]} of zero bytes")
        if self.alignment and (offset % self.alignment or length % self.alignment):
            return Refusal(errno.EINVAL, f"{COMMAND_NAMES[cmd]} at {offset}+{length} is not aligned "
                                         f"to the minimum block size {self.alignment}")
        if length > self.max_payload and (cmd == READ or cmd == WRITE):
            return Refusal(errno.EINVAL, f"{COMMAND_NAMES[cmd]} of {length} bytes is over the "
                                         f"maximum {self.max_payload}")
        if offset + length > self.size:
            return Refusal(errno.ENOSPC if cmd == WRITE or cmd == ZERO else errno.EINVAL,
                           f"{COMMAND_NAMES[cmd]} at {offset}+{length} is past the end of the "
                           f"export ({self.size} bytes)")
        return None

    # ------------------------------------------------------------- replies
    def ok(self, cookie: int, offset: int = 0) -> bytes:
        """The reply to a command that succeeded and returns no data."""
        if self.extended:
            return wire.done_chunk(cookie, True, offset)
        return wire.simple_reply(cookie)

    def error(self, cookie: int, cmd: int, err: int, message: str, offset: int = 0) -> bytes:
        """The reply to a failed command: an error chunk where the client reads chunks."""
        if self.extended or (self.structured and (cmd == READ or cmd == BLOCK_STATUS)):
            return wire.error_chunk(cookie, wire_errno(err), message, self.extended, offset)
        return wire.simple_reply(cookie, wire_errno(err))

    def read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """What precedes ``length`` bytes of read data sent as one piece."""
        if self.structured:
            return wire.read_data_header(cookie, offset, length, True, self.extended)
        return wire.simple_reply(cookie)

    def read_chunks(self, cookie: int, offset: int, buffers: Sequence[Buffer],
                    zero_buffer: object, allow_holes: bool = True) -> list[Buffer]:
        """The parts of a read reply whose data are ``buffers``, in order.

        Runs of buffers that are views of ``zero_buffer`` become OFFSET_HOLE
        chunks when structured replies are on (and the client did not set
        DF: ``allow_holes``); everything else is sent as it is.
        """
        holes = self.structured and allow_holes and any(
            type(b) is memoryview and b.obj is zero_buffer for b in buffers)
        if not holes:
            return [self.read_header(cookie, offset, sum(map(len, buffers))), *buffers]
        runs: list[tuple[int, int, list[Buffer] | None]] = []  # offset, length, data or None
        pos = offset
        for buf in buffers:
            hole = type(buf) is memoryview and buf.obj is zero_buffer
            if runs and (runs[-1][2] is None) == hole:
                start, size, data = runs[-1]
                if data is not None:
                    data.append(buf)
                runs[-1] = (start, size + len(buf), data)
            else:
                runs.append((pos, len(buf), None if hole else [buf]))
            pos += len(buf)
        parts: list[Buffer] = []
        last = len(runs) - 1
        for index, (start, size, data) in enumerate(runs):
            if data is None:
                parts.append(wire.hole_chunk(cookie, start, size, index == last, self.extended, offset))
            else:
                parts.append(wire.read_data_header(cookie, start, size, index == last, self.extended,
                                                   offset))
                parts.extend(data)
        return parts

    def block_status_selection(self, payload: bytes | bytearray | memoryview
                               ) -> tuple[int, list[int]] | Refusal:
        """(effect length, context ids) of a BLOCK_STATUS sent with a payload
        (extended headers, ``NBD_FLAG_BLOCK_STAT_PAYLOAD``): 64 bits of length,
        then the 32-bit ids of the negotiated contexts to answer (none: all)."""
        size = len(payload)
        if size < 8 or (size - 8) % 4:
            return Refusal(errno.EINVAL, f"a block status payload is 8 + 4n bytes, not {size}")
        (length,) = wire.U64.unpack_from(payload)
        ids = [wire.U32.unpack_from(payload, pos)[0] for pos in range(8, size, 4)]
        if len(set(ids)) != len(ids) or any(i not in self.terms.contexts for i in ids):
            return Refusal(errno.EINVAL, f"block status payload names unknown or repeated "
                                         f"meta context ids {ids}")
        return length, ids or list(self.terms.contexts)

    def block_status(self, cookie: int, offset: int,
                     answers: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> bytes:
        """One BLOCK_STATUS chunk per (context id, (length, flags) pairs) answer."""
        last = len(answers) - 1
        return b"".join(wire.block_status_chunk(cookie, context_id, descriptors, index == last,
                                                self.extended, offset)
                        for index, (context_id, descriptors) in enumerate(answers))
