"""The transmission-phase reply parser, driven with byte strings only."""

import errno

import pytest

from pynbd.proto import wire
from pynbd.proto.client_transmission import Transmission
from pynbd.proto.constants import Cmd, CmdFlag
from pynbd.proto.errors import LocalProtocolError, RemoteProtocolError
from pynbd.proto.server_transmission import ServerTransmission, Terms


def feed(t: Transmission, data: bytes, step: int | None = None) -> list:
    """Deliver ``data`` through get_buffer/buffer_updated, ``step`` bytes at a time."""
    done = []
    while data:
        buf = t.get_buffer()
        n = min(len(buf), len(data), step or len(data))
        buf[:n] = data[:n]
        data = data[n:]
        done += t.buffer_updated(n)
    return done


def parsed(header: bytes, extended: bool) -> tuple[int, int, int, int, int, int]:
    """The request as the server's core reads it: (flags, command, cookie, offset, length, payload)."""
    return ServerTransmission(Terms(1 << 30, 1, extended=extended)).parse_request(header)


def read(t: Transmission, offset: int, count: int):
    buf = bytearray(count)
    cmd, header = t.request(Cmd.READ, offset, count, buf=memoryview(buf))
    assert parsed(header, t.extended)[2] == cmd.cookie
    return cmd, buf


@pytest.mark.parametrize("step", [None, 1, 7, 100_000])
def test_simple_read_reply(step):
    t = Transmission(structured=False, extended=False)
    cmd, buf = read(t, 0, 200_000)
    payload = bytes(range(256)) * 782
    done = feed(t, wire.simple_reply(cmd.cookie) + payload[:200_000], step)
    assert done == [cmd] and cmd.error == 0 and bytes(buf) == payload[:200_000]


def test_structured_read_out_of_order_with_holes():
    t = Transmission(structured=True, extended=False)
    a, abuf = read(t, 1000, 300)
    b, bbuf = read(t, 0, 100)
    abuf[:] = b"\xff" * 300
    stream = (wire.read_data_header(b.cookie, 0, 100, True, False) + b"b" * 100
              + wire.read_data_header(a.cookie, 1200, 100, False, False) + b"a" * 100
              + wire.hole_chunk(a.cookie, 1000, 200, False, False)
              + wire.done_chunk(a.cookie, False))
    done = feed(t, stream, 13)
    assert done == [b, a]
    assert bytes(bbuf) == b"b" * 100 and bytes(abuf) == bytes(200) + b"a" * 100
    assert not t.in_flight


def test_large_data_lands_directly_in_the_callers_buffer():
    t = Transmission(structured=True, extended=False)
    cmd, buf = read(t, 0, 1 << 20)
    feed(t, wire.read_data_header(cmd.cookie, 0, 1 << 20, True, False)[:28])
    target = t.get_buffer()
    assert target.obj is buf  # recv_into would write into the caller's memory
    target[:] = b"z" * len(target)
    assert t.buffer_updated(len(target)) == [cmd] and buf == b"z" * (1 << 20)


def test_error_chunk_and_simple_error():
    t = Transmission(structured=True, extended=False)
    cmd, _ = read(t, 0, 10)
    w, _ = t.request(Cmd.WRITE, 0, 3)
    done = feed(t, wire.error_chunk(cmd.cookie, errno.EIO, "disk on fire", False)
                + wire.simple_reply(w.cookie, errno.ENOSPC))
    assert done == [cmd, w]
    assert (cmd.error, cmd.message) == (errno.EIO, "disk on fire")
    assert w.error == errno.ENOSPC


def test_short_read_reply_fails_the_command():
    t = Transmission(structured=True, extended=False)
    cmd, _ = read(t, 0, 10)
    feed(t, wire.read_data_header(cmd.cookie, 0, 4, False, False) + b"abcd"
         + wire.done_chunk(cmd.cookie, False))
    assert cmd.error == errno.EIO and "4 of 10" in cmd.message


def test_block_status_compact_and_extended():
    t = Transmission(structured=True, extended=False, contexts={1: "base:allocation"})
    cmd, _ = t.request(Cmd.BLOCK_STATUS, 0, 8192)
    feed(t, wire.block_status_chunk(cmd.cookie, 1, [(4096, 0), (4096, 3)], True, False))
    assert cmd.extents == [(1, [4096, 0, 4096, 3])]
    t = Transmission(structured=True, extended=True, contexts={2: "qemu:allocation-depth"})
    cmd, header = t.request(Cmd.BLOCK_STATUS, 0, 1 << 40)
    assert len(header) == 32
    feed(t, wire.block_status_chunk(cmd.cookie, 2, [(1 << 40, 1)], True, True))
    assert cmd.extents == [(2, [1 << 40, 1])]


def test_extended_write_carries_payload_len():
    t = Transmission(structured=True, extended=True)
    _, header = t.request(Cmd.WRITE, 0, 5)
    assert parsed(header, True)[0] & CmdFlag.PAYLOAD_LEN


def _violation(stream_for):
    t = Transmission(structured=True, extended=False, contexts={1: "base:allocation"})
    cmd, _ = read(t, 100, 10)
    with pytest.raises(RemoteProtocolError) as info:
        feed(t, stream_for(cmd.cookie))
    return str(info.value)


@pytest.mark.parametrize("stream_for, message", [
    (lambda c: b"\xde\xad\xbe\xef" + bytes(20), "bad reply magic"),
    (lambda c: wire.simple_reply(c + 99), "unknown cookie"),
    (lambda c: wire.read_data_header(c, 0, 10, True, False) + bytes(10), "outside the request"),
    (lambda c: wire.hole_chunk(c, 105, 10, True, False), "outside the request"),
    (lambda c: wire.block_status_chunk(c, 1, [(1, 0)], True, False), "invalid reply"),
    (lambda c: wire.chunk_header(1, 77, c, 0), "invalid reply"),
    (lambda c: wire.read_data_header(c, 100, 10, True, True), "bad reply magic"),
])
def test_protocol_violations(stream_for, message):
    assert message in _violation(stream_for)


@pytest.mark.parametrize("late_call", [
    lambda t: t.get_buffer(),
    lambda t: t.buffer_updated(0),
    lambda t: t.request(Cmd.FLUSH),
])
def test_a_bad_reply_breaks_the_parser_for_good(late_call):
    t = Transmission(structured=True, extended=False)
    cmd, _ = read(t, 0, 10)
    with pytest.raises(RemoteProtocolError) as first:
        feed(t, wire.simple_reply(cmd.cookie + 1))
    with pytest.raises(LocalProtocolError, match="earlier error.*unknown cookie") as later:
        late_call(t)
    assert later.value.__cause__ is first.value


def test_no_request_after_disconnect():
    t = Transmission(structured=False, extended=False)
    t.disconnect()
    for late_call in (lambda: t.request(Cmd.FLUSH), t.disconnect):
        with pytest.raises(LocalProtocolError, match="NBD_CMD_DISC was already sent"):
            late_call()


def test_connection_lost_mid_reply_and_between_replies():
    t = Transmission(structured=True, extended=False)
    cmd, _ = read(t, 0, 100)
    lost = t.connection_lost()
    assert isinstance(lost, RemoteProtocolError) and "1 command(s) in flight" in str(lost)
    feed(t, wire.read_data_header(cmd.cookie, 0, 100, True, False) + b"x" * 10)
    assert "middle of a reply" in str(t.connection_lost())


def test_requests_too_large_without_extended_headers():
    t = Transmission(structured=True, extended=False)
    with pytest.raises(ValueError):
        t.request(Cmd.TRIM, 0, 1 << 32)
