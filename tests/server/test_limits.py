"""Limits against slow, silent and greedy clients: --timeout, replies nobody reads, --keepalive.

Each test keeps a well-behaved client working beside the bad one: a bad
client costs only its own connection.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
from rawnbd import CMD_READ, CMD_WRITE, IHAVEOPT, NBDMAGIC, OPT_STARTTLS, REP_ACK, RawClient
from test_tls import pki  # noqa: F401 (the fixture)

from nbdtest import SERVE, nbdsh, run, served, wait_for
from pynbd.process import stop_process


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def works(srv) -> bool:
    """A well-behaved client is served (it reads the size and a block)."""
    return nbdsh(srv.uri, "print(len(h.pread(4096, 0)))").strip() == "4096"


def test_a_silent_client_is_dropped_after_timeout():
    with served("memory", "1M", options=["--timeout=1"]) as srv:
        with RawClient.connect(srv.socket) as silent:
            start = time.monotonic()
            assert works(srv)
            assert silent.recv_exact(18)[:8] == struct.pack(">Q", NBDMAGIC)  # the greeting
            assert silent.is_closed()  # then nothing: dropped
            assert 0.8 < time.monotonic() - start < 10
    assert "did not finish the handshake in 1 s; dropped" in srv.stderr()


def test_a_byte_a_second_does_not_keep_a_handshake_alive():
    with served("memory", "1M", options=["--timeout=1.5"]) as srv:
        with RawClient.connect(srv.socket) as slow:
            slow.greet()
            start = time.monotonic()
            request = struct.pack(">QII", IHAVEOPT, 7, 6) + struct.pack(">IH", 0, 0)
            closed = False
            for byte in request:
                try:
                    slow.sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.4)
            assert closed or slow.is_closed()
            assert time.monotonic() - start < 6
            assert works(srv)


def test_a_stalled_tls_handshake_is_dropped_in_time(pki):  # noqa: F811
    certs, _ = pki
    options = ["--timeout=1.5", "--tls=require", f"--tls-certificates={certs}"]
    with served("memory", "1M", options=options) as srv:
        with RawClient.connect(srv.socket) as slow:
            slow.greet()
            assert slow.option(OPT_STARTTLS)[-1][0] == REP_ACK
            hello = client_hello()
            start = time.monotonic()
            for byte in hello[:20]:  # a ClientHello, one byte at a time
                try:
                    slow.sock.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.3)
            assert slow.is_closed()
            assert time.monotonic() - start < 8
        assert works_tls(srv, certs)


def client_hello() -> bytes:
    """The first bytes a TLS client sends (made by Python's ssl, never sent anywhere)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def works_tls(srv, certs) -> bool:
    uri = f"nbds+unix:///?socket={srv.socket}&tls-certificates={certs}"
    return run(["nbdinfo", "--size", uri]).stdout.strip() == b"1048576"


@pytest.mark.parametrize("threads", [[], ["-t", "4"]], ids=["inline", "worker pool"])
def test_a_client_that_never_reads_its_replies_costs_bounded_memory(threads):
    """4 GiB of read replies asked for and never read: the server stops at what the socket
    holds, its memory stays put, and other clients are served meanwhile."""
    with served("memory", "64M", options=threads) as srv:
        pid = srv.proc.pid
        assert works(srv)
        before = rss_kib(pid)
        with RawClient.connect(srv.socket) as greedy:
            greedy.handshake()
            greedy.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, 1 << 20) * 4096)
            time.sleep(2)
            assert works(srv)
            assert rss_kib(pid) - before < 200 * 1024, "the replies nobody reads piled up"
        wait_for(lambda: works(srv))


def test_keepalive_sets_so_keepalive_on_tcp_clients():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([*SERVE, "-f", "--keepalive", "-i", "127.0.0.1", "-p", str(port), "memory", "1M"],
                            stderr=subprocess.PIPE)
    try:
        client = wait_for(lambda: connect_tcp(port))
        with client:
            client.recv(18)
            assert wait_for(lambda: keepalive_sockets(proc.pid))
    finally:
        stop_process(proc)


def connect_tcp(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port))
    except OSError:
        return None


def keepalive_sockets(pid: int) -> list[str]:
    """The server's TCP sockets with SO_KEEPALIVE on (ss shows their keepalive timer)."""
    out = subprocess.run(["ss", "-tnpo", "state", "established"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line and "keepalive" in line]


def test_writes_queued_behind_unread_replies_are_bounded():
    """Reads whose replies nobody reads block every worker; the writes that follow wait in
    the socket, not in the server's memory (at most MAX_QUEUED_BYTES of them are queued)."""
    with served("memory", "64M", options=["-t", "4"]) as srv:
        pid = srv.proc.pid
        assert works(srv)
        before = rss_kib(pid)
        greedy = RawClient.connect(srv.socket)
        greedy.handshake()
        reads = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, 1 << 20) * 32
        write = struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 2, 0, 1 << 20) + bytes(1 << 20)
        sender = threading.Thread(target=send_quietly, args=(greedy.sock, [reads] + [write] * 256))
        sender.start()
        time.sleep(2)
        assert works(srv)
        grown = rss_kib(pid) - before
        greedy.sock.shutdown(socket.SHUT_RDWR)  # wakes the sender blocked in sendall
        sender.join(30)
        greedy.sock.close()
        assert grown < 200 * 1024, f"the server queued {grown} KiB of writes"


def send_quietly(sock: socket.socket, parts: list[bytes]) -> None:
    """Send until done or until the socket is closed under us."""
    try:
        for part in parts:
            sock.sendall(part)
    except OSError:
        return
