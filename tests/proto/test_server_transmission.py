"""The server's transmission core as pure code: byte strings in, requests,
refusals and reply bytes out. Every message is packed here with ``struct``
from the NBD protocol document, never with pynbd's own encoders."""

from __future__ import annotations

import errno
import struct

import pytest

from pynbd.proto.errors import RemoteProtocolError
from pynbd.proto.server_transmission import Refusal, ServerTransmission, Terms, wire_errno

REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
SIMPLE, STRUCTURED, EXTENDED = 0x67446698, 0x668E33EF, 0x6E8A278C
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA, SEND_TRIM = 1, 2, 4, 8, 32
SEND_WRITE_ZEROES, SEND_DF, SEND_CACHE, SEND_FAST_ZERO = 64, 128, 1024, 2048
T_NONE, T_OFFSET_DATA, T_OFFSET_HOLE, T_BLOCK_STATUS, T_BLOCK_STATUS_EXT = 0, 1, 2, 5, 6
T_ERROR = (1 << 15) + 1
DONE = 1
ALL = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_DF | SEND_CACHE \
    | SEND_FAST_ZERO
MiB = 1 << 20


def core(flags: int = ALL, size: int = MiB, minimum: int = 1, structured: bool = True,
         extended: bool = False, contexts: dict[int, str] | None = None) -> ServerTransmission:
    return ServerTransmission(Terms(size=size, flags=flags, block_size=(minimum, 4096, 64 * 1024),
                                    structured=structured, extended=extended,
                                    contexts={1: "base:allocation"} if contexts is None else contexts))


def compact(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def extended(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# ------------------------------------------------------------------ parsing

def test_compact_and_extended_headers_parse_at_any_position():
    data = b"junk" + compact(FUA, WRITE, 0xC0FFEE, 4096, 512)
    tx = core()
    assert tx.header_size == 28
    assert tx.parse_request(data, 4) == (FUA, WRITE, 0xC0FFEE, 4096, 512, 512)
    tx = core(extended=True)
    assert tx.header_size == 32
    assert tx.parse_request(extended(0, READ, 7, 1 << 40, 1 << 33)) == (0, READ, 7, 1 << 40, 1 << 33, 0)


def test_a_bad_magic_is_the_peers_fault():
    with pytest.raises(RemoteProtocolError, match="bad request magic 0x12345678"):
        core().parse_request(b"\x12\x34\x56\x78" + bytes(24))
    with pytest.raises(RemoteProtocolError):  # a compact request on an extended connection
        core(extended=True).parse_request(compact(0, READ, 1, 0, 512) + bytes(4))


def test_payload_lengths():
    def payload(tx: ServerTransmission, flags: int, cmd: int, length: int) -> int:
        header = (extended if tx.extended else compact)(flags, cmd, 1, 0, length)
        return tx.parse_request(header)[5]

    tx = core()
    assert payload(tx, 0, WRITE, 512) == 512
    assert payload(tx, 0, READ, 512) == 0
    assert payload(tx, 0, WRITE, 1 << 30) == 1 << 30  # the caller drops it, check refuses
    tx = core(extended=True)
    assert payload(tx, PAYLOAD_LEN, WRITE, 512) == 512
    assert payload(tx, 0, WRITE, 512) == 0
    assert payload(tx, PAYLOAD_LEN, CACHE, 16) == 16
    with pytest.raises(RemoteProtocolError, match="over the maximum"):
        payload(tx, PAYLOAD_LEN, WRITE, 1 << 30)


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("request_, terms, expected", [
    ((0, READ, 0, 512), {}, None),
    ((0, 42, 0, 512), {}, errno.EINVAL),                        # unknown command
    ((FUA, READ, 0, 512), {}, errno.EINVAL),                    # FUA on a read
    ((DF, READ, 0, 512), {"flags": ALL & ~SEND_DF}, errno.EINVAL),  # DF not negotiated
    ((FUA, WRITE, 0, 512), {"flags": ALL & ~SEND_FUA}, errno.EINVAL),
    ((FAST_ZERO, ZERO, 0, 512), {"flags": ALL & ~SEND_FAST_ZERO}, errno.EINVAL),
    ((0, WRITE, 0, 512), {"flags": ALL | READ_ONLY}, errno.EPERM),
    ((FUA, TRIM, 0, 512), {"flags": ALL | READ_ONLY}, errno.EPERM),  # read-only before flags
    ((0, TRIM, 0, 512), {"flags": ALL & ~SEND_TRIM}, errno.EINVAL),
    ((0, CACHE, 0, 512), {"flags": ALL & ~SEND_CACHE}, errno.EINVAL),
    ((0, FLUSH, 0, 0), {"flags": ALL & ~SEND_FLUSH}, errno.EINVAL),
    ((0, FLUSH, 0, 0), {}, None),
    ((0, BLOCK_STATUS, 0, 512), {"contexts": {}}, errno.EINVAL),
    ((REQ_ONE, BLOCK_STATUS, 0, 0), {}, None),
    ((0, READ, 0, 0), {}, errno.EINVAL),                        # zero length
    ((0, READ, MiB - 511, 512), {}, errno.EINVAL),              # past the end
    ((0, WRITE, MiB - 511, 512), {}, errno.ENOSPC),             # past the end, writing
    ((0, ZERO, MiB, 1), {}, errno.ENOSPC),
    ((0, TRIM, MiB, 1 << 30), {}, errno.EINVAL),
    ((0, READ, 0, 64 * 1024 + 1), {}, errno.EINVAL),            # over the maximum
    ((0, ZERO, 0, MiB), {}, None),                              # no payload: no maximum
    ((0, READ, 512, 512), {"minimum": 512}, None),
    ((0, READ, 256, 512), {"minimum": 512}, errno.EINVAL),      # unaligned offset
    ((0, WRITE, 0, 100), {"minimum": 512}, errno.EINVAL),       # unaligned length
])
def test_validation_against_the_terms(request_, terms, expected):
    flags, cmd, offset, length = request_
    refusal = core(**terms).check(flags, cmd, offset, length)
    assert (refusal.errno if refusal else None) == expected
    if refusal:
        assert refusal.message  # every refusal says why


def test_refusal_messages_say_what_is_wrong():
    tx = core(minimum=512)
    assert tx.check(0, WRITE, MiB, 512) == Refusal(
        errno.ENOSPC, "write at 1048576+512 is past the end of the export (1048576 bytes)")
    assert "minimum block size 512" in tx.check(0, READ, 1, 512).message
    assert core(flags=ALL | READ_ONLY).check(0, WRITE, 0, 512).message == "the export is read-only"


def test_extended_writes_need_payload_len():
    tx = core(extended=True)
    assert tx.check(PAYLOAD_LEN, WRITE, 0, 512) is None
    assert tx.check(0, WRITE, 0, 512).errno == errno.EINVAL
    assert tx.check(PAYLOAD_LEN, CACHE, 0, 16).errno == errno.EINVAL  # a payload where none belongs
    assert core().check(PAYLOAD_LEN, WRITE, 0, 512).errno == errno.EINVAL  # not negotiated


def test_local_errnos_map_to_the_protocols_few():
    assert [wire_errno(e) for e in (errno.EROFS, errno.EDQUOT, errno.ENOENT, errno.ENOSPC)] == [
        errno.EPERM, errno.ENOSPC, errno.EIO, errno.ENOSPC]


# ------------------------------------------------------------------ replies

def test_ok_replies():
    assert core(structured=False).ok(9) == struct.pack(">IIQ", SIMPLE, 0, 9)
    assert core().ok(9) == struct.pack(">IIQ", SIMPLE, 0, 9)  # structured: simple replies still fine
    assert core(extended=True).ok(9, 4096) == struct.pack(">IHHQQQ", EXTENDED, DONE, T_NONE, 9, 4096, 0)


def test_error_replies():
    assert core(structured=False).error(3, READ, errno.EROFS, "ro") == struct.pack(">IIQ", SIMPLE,
                                                                                   errno.EPERM, 3)
    chunk = core().error(3, READ, errno.ENOSPC, "full")
    assert chunk == struct.pack(">IHHQI", STRUCTURED, DONE, T_ERROR, 3, 6 + 4) + \
        struct.pack(">IH", errno.ENOSPC, 4) + b"full"
    assert core().error(3, WRITE, errno.EIO, "x") == struct.pack(">IIQ", SIMPLE, errno.EIO, 3)
    chunk = core(extended=True).error(3, WRITE, errno.EIO, "x", 512)
    assert chunk[:32] == struct.pack(">IHHQQQ", EXTENDED, DONE, T_ERROR, 3, 512, 7)


def test_read_replies_without_holes():
    data = memoryview(b"abcd")
    assert core(structured=False).read_chunks(5, 0, [data], object()) == [
        struct.pack(">IIQ", SIMPLE, 0, 5), data]
    parts = core().read_chunks(5, 100, [data], object())
    assert parts == [struct.pack(">IHHQIQ", STRUCTURED, DONE, T_OFFSET_DATA, 5, 12, 100), data]


def test_read_replies_with_holes_from_the_zero_buffer():
    zeroes = bytes(4096)
    hole, data = memoryview(zeroes)[:1024], memoryview(b"x" * 512)
    parts = core().read_chunks(5, 0, [data, hole, hole, data], zeroes)
    assert b"".join(bytes(p) for p in parts) == (
        struct.pack(">IHHQIQ", STRUCTURED, 0, T_OFFSET_DATA, 5, 520, 0) + b"x" * 512
        + struct.pack(">IHHQIQI", STRUCTURED, 0, T_OFFSET_HOLE, 5, 12, 512, 2048)
        + struct.pack(">IHHQIQ", STRUCTURED, DONE, T_OFFSET_DATA, 5, 520, 2560) + b"x" * 512)
    # DF (allow_holes=False) and simple replies send the zeroes as data
    assert core().read_chunks(5, 0, [hole], zeroes, allow_holes=False)[1] is hole
    assert core(structured=False).read_chunks(5, 0, [hole], zeroes)[1] is hole


def test_extended_read_chunks_carry_the_request_offset():
    zeroes = bytes(512)
    parts = core(extended=True).read_chunks(5, 4096, [memoryview(zeroes)], zeroes)
    assert parts == [struct.pack(">IHHQQQQI", EXTENDED, DONE, T_OFFSET_HOLE, 5, 4096, 12, 4096, 512)]


def test_block_status_32_and_64_bit():
    descriptors = [(4096, 3), (8192, 0)]
    assert core().block_status(8, 0, [(1, descriptors)]) == struct.pack(
        ">IHHQI", STRUCTURED, DONE, T_BLOCK_STATUS, 8, 4 + 16) + struct.pack(">IIIII", 1, 4096, 3,
                                                                             8192, 0)
    assert core(extended=True).block_status(8, 0, [(1, descriptors)]) == struct.pack(
        ">IHHQQQ", EXTENDED, DONE, T_BLOCK_STATUS_EXT, 8, 0, 8 + 32) + struct.pack(
        ">IIQQQQ", 1, 2, 4096, 3, 8192, 0)
    two = core(contexts={1: "base:allocation", 2: "qemu:dirty-bitmap:b"}).block_status(
        8, 0, [(1, [(1, 0)]), (2, [(1, 1)])])
    assert [struct.unpack_from(">H", two, off)[0] for off in (4, 4 + 20 + 12)] == [0, DONE]
    assert [struct.unpack_from(">I", two, off)[0] for off in (20, 20 + 12 + 20)] == [1, 2]


def test_block_status_payload_selects_contexts():
    contexts = {1: "base:allocation", 2: "qemu:dirty-bitmap:b", 3: "qemu:allocation-depth"}
    tx = core(extended=True, contexts=contexts, flags=HAS_FLAGS | (1 << 12))
    assert tx.block_status_selection(struct.pack(">QII", 4096, 3, 1)) == (4096, [3, 1])
    assert tx.block_status_selection(struct.pack(">Q", 512)) == (512, [1, 2, 3])
    for bad in (b"", struct.pack(">QH", 1, 1), struct.pack(">QI", 1, 9), struct.pack(">QII", 1, 2, 2)):
        refusal = tx.block_status_selection(bad)
        assert refusal.errno == errno.EINVAL, bad
    # PAYLOAD_LEN is allowed on BLOCK_STATUS only where the export offered the payload form.
    assert tx.check(PAYLOAD_LEN, BLOCK_STATUS, 0, 4096) is None
    plain = core(extended=True, contexts=contexts)
    assert plain.check(PAYLOAD_LEN, BLOCK_STATUS, 0, 4096).errno == errno.EINVAL
