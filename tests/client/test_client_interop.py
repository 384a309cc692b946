"""The client library against real servers: pynbd serve, nbdkit, qemu-nbd, nbd-server."""

import asyncio
import errno
import inspect
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from client.nbdpeers import make_pki, make_qcow2, nbd_server, qemu_nbd
from nbdtest import WAIT, run, served
from pynbd.client import NBD, AsyncNBD, NBDError, aio, connect, parse_uri
from pynbd.client.sync import connect as sync_connect
from pynbd.proto import wire
from pynbd.proto.constants import FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, Opt, Rep
from pynbd.proto.errors import RemoteProtocolError
from pynbd.proto.server_transmission import ServerTransmission, Terms

MiB = 1 << 20


class Driven:
    """An ``AsyncNBD`` called from blocking code, so that one test body runs on both faces."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.handle, self.runner = AsyncNBD(), runner

    def __getattr__(self, name):
        attr = getattr(self.handle, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self.runner.run(attr(*args, **kwargs))


@pytest.fixture(params=["sync", "async"])
def new_handle(request) -> Iterator:
    """Makes handles of one face: ``NBD`` itself, or an ``AsyncNBD`` driven by a loop."""
    if request.param == "sync":
        yield NBD
        return
    with asyncio.Runner() as runner:
        yield lambda: Driven(runner)


@contextmanager
def server_uri(kind, tmp_path):
    if kind in ("pynbd", "nbdkit"):
        with served("memory", "4M", server=kind) as srv:
            yield srv.uri
    elif kind == "qemu-nbd":
        with qemu_nbd(make_qcow2(tmp_path), "-A") as uri:
            yield uri
    else:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(4 * MiB))
        with nbd_server(image) as uri:
            yield uri


@pytest.mark.parametrize("kind", ["pynbd", "nbdkit", "qemu-nbd", "nbd-server"])
def test_sync_read_write_zero(kind, tmp_path):
    with server_uri(kind, tmp_path) as uri, sync_connect(
            uri, meta_contexts=["base:allocation"]) as h:
        assert h.get_size() == 4 * MiB
        pattern = bytes(range(256)) * 1024
        h.pwrite(pattern, MiB)
        assert h.pread(len(pattern), MiB) == pattern
        h.zero(4096, MiB)
        assert h.pread(8, MiB + 4092) == bytes(4) + pattern[4096:4100]
        if h.can_flush():
            h.flush()
        if h.can_meta_context("base:allocation"):
            entries = h.block_status(h.get_size(), 0)["base:allocation"]
            assert sum(entries[0::2]) >= MiB and all(f in (0, 1, 2, 3) for f in entries[1::2])


def test_pread_matches_libnbd_on_qcow2(tmp_path):
    with qemu_nbd(make_qcow2(tmp_path), "-r") as uri:
        with sync_connect(uri) as h:
            ours = h.pread(128 * 1024, 0)
        code = "import sys; sys.stdout.buffer.write(h.pread(131072, 0))"
        theirs = run(["nbdsh", "-u", uri, "-c", code])
    assert ours == theirs.stdout and ours[:65536] == b"\x01" * 65536


def test_qemu_dirty_bitmap_and_allocation_depth(tmp_path):
    image = make_qcow2(tmp_path)
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 2M 64k", str(image)])
    with qemu_nbd(image, "-r", "-A", "-B", "b0") as uri:
        with sync_connect(uri, meta_contexts=["qemu:dirty-bitmap:b0",
                                              "qemu:allocation-depth"]) as h:
            got = {}
            h.block_status(h.get_size(), 0, lambda ctx, off, entries, err: got.update({ctx: entries}))
    bitmap = got["qemu:dirty-bitmap:b0"]
    assert 1 in bitmap[1::2]  # the write at 2M is dirty
    assert got["qemu:allocation-depth"][:2] == [65536, 1]


@pytest.mark.parametrize("kind", ["pynbd", "nbdkit"])
def test_async_many_in_flight(kind):
    async def main(uri):
        async with await connect(uri, meta_contexts=["base:allocation"]) as h:
            block = 64 * 1024
            blocks = [bytes([i]) * block for i in range(64)]
            await asyncio.gather(*(h.pwrite(b, i * block) for i, b in enumerate(blocks)))
            bufs = [bytearray(block) for _ in blocks]
            await asyncio.gather(*(h.pread_into(b, i * block) for i, b in enumerate(bufs)))
            assert bufs == [bytearray(b) for b in blocks]
            await asyncio.gather(h.zero(block, 0), h.flush(), h.trim(block, block))
            status = await h.block_status(h.get_size(), 0)
            assert "base:allocation" in status
            with pytest.raises(NBDError) as info:
                await h.pwrite(b"x", h.get_size())
            assert info.value.errno == errno.EINVAL
    with served("memory", "4M", server=kind) as srv:
        asyncio.run(main(srv.uri))


def test_server_error_carries_errno(new_handle):
    with served("memory", "1M", "--filter=error", "error=ENOSPC", "error-pwrite-rate=1",
                server="nbdkit") as srv:
        h = new_handle()
        h.connect_uri(srv.uri)
        with pytest.raises(NBDError) as info:
            h.pwrite(b"x" * 512, 0)
        assert info.value.errno == errno.ENOSPC
        assert h.pread(4, 0) == bytes(4)  # the connection survives
        h.close()


def test_block_status_callback_and_result(new_handle):
    with served("memory", "1M", server="nbdkit") as srv:
        h = new_handle()
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri)
        h.pwrite(b"x" * 4096, 0)
        seen = []
        result = h.block_status(MiB, 0, lambda ctx, off, entries, err: seen.append((ctx, off, entries)))
        assert seen == [("base:allocation", 0, result["base:allocation"])]
        entries = result["base:allocation"]
        assert entries[1] == 0 and 4096 <= entries[0] and sum(entries[0::2]) == MiB  # data first
        h.close()


def test_captive_servers(tmp_path):
    h = NBD()
    h.connect_command(["nbdkit", "-s", "--exit-with-parent", "memory", "3M"])
    assert h.get_size() == 3 * MiB
    h.close()
    image = make_qcow2(tmp_path)
    with sync_connect(["qemu-nbd", "-f", "qcow2", str(image)]) as h:
        assert h.pread(2, 0) == b"\x01\x01"

    async def main():
        async with await connect(["pynbd", "serve", "memory", "2M"]) as ah:
            return ah.get_size()
    assert asyncio.run(main()) == 2 * MiB


def test_option_mode_against_nbdkit(new_handle):
    with served("memory", "1M", server="nbdkit") as srv:
        h = new_handle()
        h.set_opt_mode(True)
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri)
        exports, contexts = [], []
        assert h.opt_list(lambda name, description: exports.append(name)) == [("", "")]
        assert exports == [""]
        assert h.opt_list_meta_context(contexts.append) == contexts == ["base:allocation"]
        h.opt_info()
        assert h.get_size() == MiB
        h.opt_go()
        assert h.pread(1, 0) == b"\0"
        h.close()


def test_opt_abort_ends_option_mode(new_handle):
    with served("memory", "1M", server="nbdkit") as srv:
        h = new_handle()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri)
        h.opt_abort()
        assert not h.is_ready()
        with pytest.raises(NBDError) as info:
            h.opt_list()
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("uri, expect", [
    ("nbd://example.com/disk", dict(transport="tcp", host="example.com", port=10809,
                                    export_name="disk", tls=False)),
    ("nbds://[::1]:1234//abs%20name", dict(host="::1", port=1234, export_name="/abs name",
                                           tls=True)),
    ("nbd+unix:///e?socket=/tmp/s", dict(transport="unix", socket="/tmp/s", export_name="e")),
    ("nbds+unix://?socket=/s&tls-certificates=/pki", dict(tls=True, tls_certificates="/pki")),
    ("nbd+vsock://3:99/", dict(transport="vsock", host="3", port=99)),
])
def test_uri_parsing(uri, expect):
    parsed = parse_uri(uri)
    for key, value in expect.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize("uri, message", [
    ("localhost:10809", "scheme"), ("http://x/", "unknown scheme"),
    ("nbd+unix:///x", "socket"), ("nbd://", "host"), ("nbd://h:port/", "port"),
    ("nbd+unix://host/?socket=/s", "no host"), ("nbd+vsock://abc/", "CID"),
])
def test_bad_uris(uri, message):
    with pytest.raises(NBDError, match=message) as info:
        NBD().connect_uri(uri)
    assert info.value.errno == errno.EINVAL


def test_unreachable_server(tmp_path):
    with pytest.raises(NBDError) as info:
        NBD().connect_uri(f"nbd+unix:///?socket={tmp_path}/nothing")
    assert info.value.errno == errno.ENOENT


def test_connect_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        h = NBD()
        h.set_connect_timeout(0.5)
        with pytest.raises(NBDError) as info:
            h.connect_tcp("127.0.0.1", port)
        assert info.value.errno == errno.ETIMEDOUT


def test_missing_export_and_tls_required(tmp_path):
    with qemu_nbd(make_qcow2(tmp_path), "-x", "there") as uri:
        with pytest.raises(NBDError, match="no such export") as info:
            NBD().connect_uri(uri.replace(":///", ":///elsewhere"))
        assert info.value.errno == errno.ENOENT
    pki = make_pki(tmp_path)
    with served("memory", "1M", server="nbdkit",
                options=["--tls=require", f"--tls-certificates={pki}"]) as srv:
        with pytest.raises(NBDError, match="requires TLS"):
            NBD().connect_uri(srv.uri)
        secure = f"nbds+unix:///?socket={srv.socket}&tls-certificates={pki}"
        with sync_connect(secure) as h:
            assert h.get_tls_negotiated() and h.pread(2, 0) == b"\0\0"

        async def main():
            async with await aio.connect(secure) as ah:
                return ah.get_tls_negotiated(), await ah.pread(2, 0)
        assert asyncio.run(main()) == (True, b"\0\0")


# ----------------------------------------------------- servers that misbehave

def fake_server(script) -> tuple[str, threading.Thread]:
    """A one-shot server on TCP that negotiates, then runs ``script(conn, cookie)``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            conn.sendall(wire.greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            conn.recv(4)
            while True:
                header = _recv(conn, 16)
                option, length = wire.parse_option_header(header)
                _recv(conn, length)
                if option == Opt.GO:
                    conn.sendall(wire.option_reply(option, Rep.INFO, wire.info_export(MiB, 1))
                                 + wire.option_reply(option, Rep.ACK))
                    break
                conn.sendall(wire.option_reply(option, Rep.ERR_UNSUP))
            _, _, cookie, _, _, _ = ServerTransmission(Terms(MiB, 1)).parse_request(_recv(conn, 28))
            script(conn, cookie)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"nbd://127.0.0.1:{listener.getsockname()[1]}/", thread


def _recv(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


@pytest.mark.parametrize("script, message", [
    (lambda c, k: c.sendall(b"\x12\x34\x56\x78" + bytes(12)), "bad reply magic"),
    (lambda c, k: c.sendall(wire.simple_reply(k)[:10]), "middle of a reply"),
    (lambda c, k: c.sendall(wire.simple_reply(k) + b"abc"), "middle of a reply"),
    (lambda c, k: c.sendall(wire.simple_reply(k + 1)), "unknown cookie"),
    (lambda c, k: None, "in flight"),
])
def test_protocol_breakers_raise_and_never_hang(script, message, new_handle):
    uri, thread = fake_server(script)
    h = new_handle()
    h.connect_uri(uri)
    with pytest.raises(RemoteProtocolError, match=message):
        h.pread(512, 0)
    thread.join(WAIT)
    assert not thread.is_alive(), "the fake server is still running"
    with pytest.raises(NBDError) as info:
        h.pread(512, 0)  # the handle is closed, not hung
    assert info.value.errno == errno.ENOTCONN and not h.is_ready()


def test_a_server_gone_in_the_handshake_is_a_remote_protocol_error(new_handle):
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            conn.sendall(wire.greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)[:10])
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    h = new_handle()
    with pytest.raises(RemoteProtocolError, match="closed the connection while reading the"):
        h.connect_tcp("127.0.0.1", listener.getsockname()[1])
    thread.join(WAIT)
    assert not thread.is_alive(), "the fake server is still running"
    assert not h.is_ready()


def test_async_close_waits_for_the_commands_in_flight():
    async def main(uri):
        h = await connect(uri)
        await h.pwrite(b"kept", 0)
        reads = [asyncio.ensure_future(h.pread(4, 0)) for _ in range(4)]
        async def all_sent() -> None:
            while h.in_flight() < 4:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(all_sent(), WAIT)  # a deadline, as nbdtest.wait_for has
        await h.close()  # NBD_CMD_DISC only once the reads have their answers
        return await asyncio.gather(*reads)
    with served("memory", "1M", "--filter=delay", "rdelay=0.3") as srv:
        assert asyncio.run(asyncio.wait_for(main(srv.uri), 30)) == [b"kept"] * 4
