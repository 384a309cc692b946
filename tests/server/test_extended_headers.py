"""NBD_OPT_EXTENDED_HEADERS, byte by byte (libnbd 1.14 and qemu 7.2 predate it).

Layouts from doc/proto.md: 32-byte requests with a 64-bit length, 32-byte
reply headers whose offset field repeats the request's offset, writes
flagged NBD_CMD_FLAG_PAYLOAD_LEN, and BLOCK_STATUS_EXT descriptors of two
64-bit fields.
"""

from __future__ import annotations

import struct

import pytest
from rawnbd import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZERO,
    EINVAL,
    EXT_REPLY_MAGIC,
    F_PAYLOAD_LEN,
    F_REQ_ONE,
    OPT_EXTENDED_HEADERS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_EXT_HEADER_REQD,
    TYPE_BLOCK_STATUS_EXT,
    TYPE_ERROR,
    TYPE_NONE,
    TYPE_OFFSET_DATA,
    TYPE_OFFSET_HOLE,
    RawClient,
)

from nbdtest import served

SIZE = 8 << 30  # over 2^32, so 64-bit lengths matter


@pytest.fixture(scope="module", params=["inline", "threaded"])
def server(request):
    blocking = ["--filter=delay", "cachedelay=1ms"] if request.param == "threaded" else []
    with served("memory", str(SIZE), *blocking) as srv:
        yield srv


def ext_client(srv, meta: bool = True) -> RawClient:
    client = RawClient.connect(srv.socket)
    client.handshake(extended=True, meta=meta)
    return client


def test_negotiation(server):
    with RawClient.connect(server.socket) as c:
        c.greet()
        assert c.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        assert c.option(OPT_EXTENDED_HEADERS)[-1][0] == REP_ACK  # an upgrade is fine
        assert c.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ERR_EXT_HEADER_REQD  # no downgrade
        assert c.option(OPT_EXTENDED_HEADERS, b"x")[-1][0] & 2**31  # takes no data


def test_every_reply_is_an_extended_chunk_with_the_request_offset(server):
    with ext_client(server) as c:
        data = b"\xab" * 4096
        c.send_request(CMD_WRITE, 1 << 32, len(data), F_PAYLOAD_LEN, cookie=7, payload=data)
        raw = c.recv_exact(32)
        magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", raw)
        assert (magic, flags, rtype, cookie, offset, length) == (
            EXT_REPLY_MAGIC, 1, TYPE_NONE, 7, 1 << 32, 0)

        c.send_request(CMD_READ, (1 << 32) + 1024, 2048, cookie=8)
        (chunk,) = c.read_chunks()
        assert (chunk.type, chunk.cookie, chunk.offset) == (TYPE_OFFSET_DATA, 8, (1 << 32) + 1024)
        assert struct.unpack_from(">Q", chunk.payload)[0] == (1 << 32) + 1024
        assert chunk.payload[8:] == data[:2048]

        for cmd in (CMD_FLUSH, CMD_CACHE):
            c.send_request(cmd, 0 if cmd == CMD_FLUSH else 4096, 0 if cmd == CMD_FLUSH else 4096)
            (reply,) = c.read_chunks()
            assert reply.type == TYPE_NONE and reply.done


def test_read_with_holes_keeps_the_request_offset_in_every_header(server):
    with ext_client(server) as c:
        c.pwrite(b"\x11" * 4096, 65536)
        c.send_request(CMD_READ, 0, 262144, cookie=3)
        chunks = c.read_chunks()
        assert {ch.offset for ch in chunks} == {0}
        kinds = [(ch.type, struct.unpack_from(">Q", ch.payload)[0]) for ch in chunks]
        assert (TYPE_OFFSET_HOLE, 0) in kinds and (TYPE_OFFSET_DATA, 65536) in kinds
        assert c.pread(0, 262144) == bytes(65536) + b"\x11" * 4096 + bytes(262144 - 69632)


def test_64_bit_lengths(server):
    big = (1 << 32) + (1 << 20)
    with ext_client(server) as c:
        c.pwrite(b"\x22" * 4096, 4 << 30)
        assert c.request_error(CMD_ZERO, 0, big) == 0
        assert c.pread(4 << 30, 4096) == bytes(4096)
        c.pwrite(b"\x33" * 4096, 6 << 30)
        assert c.request_error(CMD_TRIM, 3 << 30, big) == 0
        assert c.pread(6 << 30, 4096) == bytes(4096)


def test_block_status_ext(server):
    with ext_client(server) as c:
        c.pwrite(b"\x44" * 4096, 7 << 30)
        c.send_request(CMD_BLOCK_STATUS, 0, 1 << 33, cookie=9)
        (chunk,) = c.read_chunks()
        assert chunk.type == TYPE_BLOCK_STATUS_EXT and chunk.offset == 0
        context, count = struct.unpack_from(">II", chunk.payload)
        assert context != 0 and len(chunk.payload) == 8 + 16 * count
        extents = [struct.unpack_from(">QQ", chunk.payload, 8 + 16 * i) for i in range(count)]
        assert extents[0][0] >= 1 << 32  # one descriptor longer than 32 bits can say
        assert sum(length for length, _ in extents) <= 1 << 33
        c.send_request(CMD_BLOCK_STATUS, 0, 1 << 33, F_REQ_ONE, cookie=10)
        (chunk,) = c.read_chunks()
        assert struct.unpack_from(">II", chunk.payload)[1] == 1


def test_payload_flag_misuse(server):
    with ext_client(server) as c:
        # a payload on a command that takes none: consumed, refused, in step
        assert c.request_error(CMD_CACHE, 0, 16, F_PAYLOAD_LEN, payload=b"z" * 16) == EINVAL
        # a write without the flag has no payload: refused
        assert c.request_error(CMD_WRITE, 0, 512) == EINVAL
        assert c.pread(0, 16) == bytes(16)
        # past the end: an error chunk carrying the request's offset
        c.send_request(CMD_READ, SIZE, 512, cookie=5)
        (chunk,) = c.read_chunks()
        assert (chunk.type, chunk.chunk_error, chunk.offset) == (TYPE_ERROR, EINVAL, SIZE)


def test_payload_over_the_maximum_disconnects(server):
    with ext_client(server) as c:
        c.send_request(CMD_WRITE, 0, 1 << 40, F_PAYLOAD_LEN)
        assert c.is_closed()
