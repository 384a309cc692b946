"""Encoders and decoders for every fixed-layout NBD message.

Both the server and the client build and parse messages only through these
functions, so the two can never disagree about the wire format. All are pure:
bytes in, values out, or values in, bytes out. The ``struct.Struct`` objects
are module constants so that hot paths pay no format parsing per call.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    ReplyType,
)
from .errors import RemoteProtocolError

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
EXTENDED_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
STRUCTURED_READ_HEADER = struct.Struct(">IHHQIQ")  # chunk header + data offset
EXTENDED_READ_HEADER = struct.Struct(">IHHQQQQ")  # extended header + data offset
HOLE_PAYLOAD = struct.Struct(">QI")  # offset, hole length
ERROR_PAYLOAD = struct.Struct(">IH")  # errno, message length
BLOCK_DESCRIPTOR = struct.Struct(">II")
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")

NO_ZEROES_PAD = bytes(124)


class ReplyHeader(NamedTuple):
    """A reply header as the client reads it.

    For simple replies ``type`` is -1, ``flags`` is DONE and ``error`` is the
    error field; for chunks ``error`` is 0 and ``length`` is the payload size.
    """

    flags: int
    type: int
    cookie: int
    length: int
    error: int


# ---------------------------------------------------------------- handshake

def greeting(handshake_flags: int) -> bytes:
    """The first bytes a newstyle server sends."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def option_request(option: int, data: bytes = b"") -> bytes:
    """An option as the client sends it."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def parse_option_header(data: bytes) -> tuple[int, int]:
    """Return (option, length) of an option header; check its magic."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise RemoteProtocolError(f"bad option magic {magic:#x}, expected IHAVEOPT")
    return option, length


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """An option reply as the server sends it."""
    return OPTION_REPLY_HEADER.pack(REPLY_MAGIC, option, reply, len(data)) + data


def parse_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """Return (option, reply type, length) of an option reply header."""
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != REPLY_MAGIC:
        raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
    return option, reply, length


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The reply to NBD_OPT_EXPORT_NAME."""
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + NO_ZEROES_PAD


def string_payload(name: str) -> bytes:
    """A 32-bit length followed by the UTF-8 string."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw


def info_request(name: str, infos: Sequence[int]) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    return (string_payload(name) + U16.pack(len(infos))
            + b"".join(U16.pack(i) for i in infos))


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """Parse an NBD_OPT_INFO / NBD_OPT_GO payload into (name, info types)."""
    name, rest = _take_string(data)
    if len(rest) < 2:
        raise RemoteProtocolError("NBD_OPT_GO: missing number of information requests")
    (count,) = U16.unpack_from(rest)
    if len(rest) != 2 + 2 * count:
        raise RemoteProtocolError("NBD_OPT_GO: information request list has the wrong length")
    return name, [U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)]


def meta_context_request(name: str, queries: Sequence[str]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return (string_payload(name) + U32.pack(len(queries))
            + b"".join(string_payload(q) for q in queries))


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """Parse a meta context option payload into (export name, queries)."""
    name, rest = _take_string(data)
    if len(rest) < 4:
        raise RemoteProtocolError("meta context option: missing number of queries")
    (count,) = U32.unpack_from(rest)
    rest = rest[4:]
    queries = []
    for _ in range(count):
        query, rest = _take_string(rest)
        queries.append(query)
    if rest:
        raise RemoteProtocolError("meta context option: trailing bytes after the queries")
    return name, queries


def _take_string(data: bytes) -> tuple[str, bytes]:
    if len(data) < 4:
        raise RemoteProtocolError("string length missing")
    (length,) = U32.unpack_from(data)
    if length > len(data) - 4:
        raise RemoteProtocolError("string longer than the option payload")
    try:
        text = bytes(data[4:4 + length]).decode()
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("string is not valid UTF-8") from exc
    return text, data[4 + length:]


def server_reply_payload(name: str, description: str = "") -> bytes:
    """Payload of an NBD_REP_SERVER reply (one export of NBD_OPT_LIST)."""
    return string_payload(name) + description.encode()


def parse_server_reply_payload(data: bytes) -> tuple[str, str]:
    """Parse an NBD_REP_SERVER payload into (name, description)."""
    name, rest = _take_string(data)
    return name, bytes(rest).decode(errors="replace")


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return U16.pack(Info.NAME) + name.encode()


def info_description(description: str) -> bytes:
    return U16.pack(Info.DESCRIPTION) + description.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def meta_context_reply_payload(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


# ------------------------------------------------------------- transmission

def request(flags: int, cmd: int, cookie: int, offset: int, length: int,
            extended: bool = False) -> bytes:
    """A request header as the client sends it."""
    if extended:
        return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie,
                                     offset, length)
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, reply_type: int, cookie: int, length: int,
                 offset: int = 0, extended: bool = False) -> bytes:
    """The header of one structured (or extended) reply chunk."""
    if extended:
        return EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, reply_type, cookie,
                                   offset, length)
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie,
                                 length)


def read_data_header(cookie: int, offset: int, length: int, done: bool,
                     extended: bool, request_offset: int | None = None) -> bytes:
    """Header plus offset of an OFFSET_DATA chunk carrying ``length`` bytes.

    An extended header repeats the request's offset (``request_offset``,
    default ``offset``); the chunk's own offset is in the payload.
    """
    flags = REPLY_FLAG_DONE if done else 0
    if extended:
        return EXTENDED_READ_HEADER.pack(EXTENDED_REPLY_MAGIC, flags,
                                         ReplyType.OFFSET_DATA, cookie,
                                         offset if request_offset is None else request_offset,
                                         length + 8, offset)
    return STRUCTURED_READ_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags,
                                       ReplyType.OFFSET_DATA, cookie, length + 8,
                                       offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool,
               extended: bool, request_offset: int | None = None) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return (chunk_header(flags, ReplyType.OFFSET_HOLE, cookie, HOLE_PAYLOAD.size,
                         offset if request_offset is None else request_offset, extended)
            + HOLE_PAYLOAD.pack(offset, length))


def error_chunk(cookie: int, error: int, message: str, extended: bool,
                offset: int = 0) -> bytes:
    msg = message.encode()[:1024]
    payload = ERROR_PAYLOAD.pack(error, len(msg)) + msg
    return chunk_header(REPLY_FLAG_DONE, ReplyType.ERROR, cookie, len(payload),
                        offset, extended) + payload


def done_chunk(cookie: int, extended: bool, offset: int = 0) -> bytes:
    return chunk_header(REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0, offset, extended)


def block_status_chunk(cookie: int, context_id: int,
                       extents: Iterable[tuple[int, int]], done: bool,
                       extended: bool, offset: int = 0) -> bytes:
    """A BLOCK_STATUS (or _EXT) chunk from (length, flags) pairs."""
    flags = REPLY_FLAG_DONE if done else 0
    if extended:
        descriptors = [BLOCK_DESCRIPTOR_EXT.pack(length, state)
                       for length, state in extents]
        payload = U32.pack(context_id) + U32.pack(len(descriptors)) + b"".join(descriptors)
        reply_type = ReplyType.BLOCK_STATUS_EXT
    else:
        payload = U32.pack(context_id) + b"".join(
            BLOCK_DESCRIPTOR.pack(length, state) for length, state in extents)
        reply_type = ReplyType.BLOCK_STATUS
    return chunk_header(flags, reply_type, cookie, len(payload), offset,
                        extended) + payload


def parse_reply_header(data: bytes | bytearray | memoryview) -> tuple[int, ReplyHeader | None]:
    """Identify a reply by its magic.

    Returns (header size, header). When only the 4-byte magic is known the
    header is None and the size says how many bytes the full header needs.
    """
    (magic,) = U32.unpack_from(data)
    if magic == SIMPLE_REPLY_MAGIC:
        size = SIMPLE_REPLY.size
        if len(data) < size:
            return size, None
        _, error, cookie = SIMPLE_REPLY.unpack_from(data)
        return size, ReplyHeader(REPLY_FLAG_DONE, -1, cookie, 0, error)
    if magic == STRUCTURED_REPLY_MAGIC:
        size = STRUCTURED_REPLY.size
        if len(data) < size:
            return size, None
        _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack_from(data)
        return size, ReplyHeader(flags, rtype, cookie, length, 0)
    if magic == EXTENDED_REPLY_MAGIC:
        size = EXTENDED_REPLY.size
        if len(data) < size:
            return size, None
        _, flags, rtype, cookie, _offset, length = EXTENDED_REPLY.unpack_from(data)
        return size, ReplyHeader(flags, rtype, cookie, length, 0)
    raise RemoteProtocolError(f"bad reply magic {magic:#x}")
