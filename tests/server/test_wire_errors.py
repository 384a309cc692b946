"""Bad input on the wire: each case gets a clear answer and harms nobody else.

Every test runs inside ``bystander``: a second client that is connected
before the bad one arrives, and after it has gone still writes and reads
correctly, while the server's open file descriptors and threads are back to
what they were (nothing leaked by the bad connection).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rawnbd import (
    CMD_BLOCK_STATUS,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZERO,
    EINVAL,
    EIO,
    ENOSPC,
    EPERM,
    F_FUA,
    IHAVEOPT,
    OPT_GO,
    REP_ACK,
    REP_ERR_TOO_BIG,
    REP_ERR_UNSUP,
    RawClient,
)

from nbdtest import open_fds, served, sync_accepts, threads, wait_for, wait_idle
from pynbd.proto.constants import DEFAULT_MAX_PAYLOAD

SIZE = 1 << 20
MAX_PAYLOAD = DEFAULT_MAX_PAYLOAD


# memory never blocks, so the server runs it in the inline loop; a delay on
# cache requests (never sent here) makes the stack blocking: worker threads.
STACKS = {"inline": ("memory", str(SIZE)),
          "threaded": ("--filter=delay", "memory", str(SIZE), "cachedelay=1ms")}


@pytest.fixture(scope="module", params=sorted(STACKS))
def server(request):
    with served(*STACKS[request.param]) as srv:
        yield srv


@pytest.fixture(scope="module", params=sorted(STACKS))
def ro_server(request):
    with served(*STACKS[request.param], options=["-r"]) as srv:
        yield srv


@contextmanager
def bystander(srv, writable: bool = True) -> Iterator[None]:
    """A client connected throughout; afterwards it works and nothing leaked."""
    pid = srv.proc.pid
    wait_idle(srv)  # no thread or socket of an earlier test's clients is left
    with RawClient.connect(srv.socket) as other:
        other.handshake()
        other.pread(0, 512)
        # not a sample of something moving: no other client is connected, and the
        # bystander's session started all it runs (workers too) before it answered
        before = (open_fds(pid), threads(pid))
        yield
        sync_accepts(srv)  # every bad client has been accepted: its session can only end
        wait_for(lambda: (open_fds(pid), threads(pid)) == before,
                 message=lambda: f"leaked: before {before}, now {(open_fds(pid), threads(pid))}")
        pattern = bytes(range(256)) * 16
        if writable:
            other.pwrite(pattern, 8192)
            assert other.pread(8192, len(pattern)) == pattern
        else:
            assert other.pread(0, 4096) == bytes(4096)
        assert srv.proc.poll() is None


def connected(srv, **kw) -> RawClient:
    client = RawClient.connect(srv.socket)
    client.handshake(**kw)
    return client


# ---------------------------------------------------------------- handshake

def test_wrong_option_magic_disconnects(server):
    with bystander(server), RawClient.connect(server.socket) as bad:
        bad.greet()
        bad.send_option(OPT_GO, b"\0" * 6, magic=0x1122334455667788)
        assert bad.is_closed()


def test_unknown_client_flags_disconnect(server):
    with bystander(server), RawClient.connect(server.socket) as bad:
        bad.greet(client_flags=0x80)
        assert bad.is_closed()


def test_unknown_option_is_unsupported_and_the_session_goes_on(server):
    with bystander(server), RawClient.connect(server.socket) as client:
        client.greet()
        assert [rtype for rtype, _ in client.option(99, b"xyz")] == [REP_ERR_UNSUP]
        assert client.go()[-1][0] == REP_ACK
        assert client.pread(0, 16) == bytes(16)


def test_option_payload_over_the_limit(server):
    with bystander(server), RawClient.connect(server.socket) as bad:
        bad.greet()
        bad.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 16 << 20))
        _, rtype, _ = bad.read_option_reply()
        assert rtype == REP_ERR_TOO_BIG
        assert bad.is_closed()


def test_disconnect_mid_handshake(server):
    with bystander(server):
        with RawClient.connect(server.socket) as bad:
            bad.greet()
            bad.sock.sendall(struct.pack(">QI", IHAVEOPT, OPT_GO))  # half an option header
        with RawClient.connect(server.socket) as bad:
            bad.greet()
            bad.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0\0")  # half a payload
        with RawClient.connect(server.socket):
            pass  # gone before reading the greeting


# ---------------------------------------------------------------- transmission

def test_wrong_request_magic_disconnects(server):
    with bystander(server), connected(server) as bad:
        bad.send_request(CMD_READ, 0, 512, magic=0xDEADBEEF)
        assert bad.is_closed()


@pytest.mark.parametrize("cmd, err", [(CMD_READ, EINVAL), (CMD_WRITE, ENOSPC),
                                      (CMD_ZERO, ENOSPC), (CMD_TRIM, EINVAL)])
@pytest.mark.parametrize("structured", [False, True])
def test_request_past_the_end(server, cmd, err, structured):
    with bystander(server), connected(server, structured=structured) as client:
        payload = bytes(1024) if cmd == CMD_WRITE else b""
        assert client.request_error(cmd, SIZE - 512, 1024, payload=payload) == err
        assert client.request_error(CMD_READ, 2**63, 1) == EINVAL
        assert client.pread(SIZE - 512, 512) == bytes(512)  # still in step


def test_block_status_past_the_end(server):
    with bystander(server), connected(server, structured=True, meta=True) as client:
        assert client.request_error(CMD_BLOCK_STATUS, SIZE, 512) == EINVAL


def test_read_larger_than_the_maximum(server):
    big = 64 << 20
    with bystander(server), RawClient.connect(server.socket) as client:
        client.handshake()
        client.send_request(CMD_READ, 0, big)
        reply = client.read_reply()
        assert reply.error == EINVAL
        assert client.pread(0, 512) == bytes(512)


def test_write_larger_than_the_maximum_is_drained(server):
    with bystander(server), connected(server) as client:
        payload = b"\x5a" * (MAX_PAYLOAD + 4096)
        assert client.request_error(CMD_WRITE, 0, len(payload), payload=payload) == EINVAL
        assert client.pread(0, 4096) == bytes(4096)  # nothing of it was written


def test_unknown_command_and_flags(server):
    with bystander(server), connected(server) as client:
        assert client.request_error(42, 0, 512) == EINVAL
        assert client.request_error(CMD_FLUSH, 0, 0, flags=0x4000) == EINVAL
        assert client.request_error(CMD_READ, 0, 512, flags=F_FUA) == EINVAL
        assert client.request_error(CMD_READ, 0, 0) == EINVAL


def test_disconnect_mid_write_payload(server):
    with bystander(server), connected(server) as bad:
        bad.send_request(CMD_WRITE, 0, 65536)
        bad.sock.sendall(b"\xff" * 1000)


def test_disconnect_with_requests_in_flight(server):
    with bystander(server), connected(server) as bad:
        for cookie in range(64):
            bad.send_request(CMD_READ, 0, 65536, cookie=cookie)


@pytest.mark.parametrize("cmd", [CMD_WRITE, CMD_TRIM, CMD_ZERO])
def test_writes_on_a_read_only_export(ro_server, cmd):
    with bystander(ro_server, writable=False), connected(ro_server) as client:
        assert client.flags & 2  # NBD_FLAG_READ_ONLY
        payload = b"x" * 512 if cmd == CMD_WRITE else b""
        assert client.request_error(cmd, 0, 512, payload=payload) == EPERM
        assert client.request_error(CMD_FLUSH, 0, 0) == 0


FLAKY = str(Path(__file__).with_name("flaky_plugin.py"))


def test_plugin_exception_fails_one_request_with_eio():
    with served(FLAKY) as srv:
        with bystander(srv), connected(srv) as client:
            assert client.request_error(CMD_READ, 4096, 512) == EIO
            assert client.pread(0, 512) == b"\x07" * 512
        with connected(srv, structured=True) as client:
            assert client.request_error(CMD_READ, 4096, 512) == EIO
    log = srv.stderr()
    assert "Traceback" in log and "RuntimeError: plugin bug at 4096" in log
