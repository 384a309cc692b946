"""nbd plugin: a proxy in front of nbdkit and qemu-nbd, compared with nbdkit's nbd plugin."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from plugin_helpers import config_error, export_info

from client.nbdpeers import make_pki, make_qcow2, qemu_nbd
from filters.stack_helpers import BOTH, nbdsh_outcomes
from nbdtest import NBDSH_OUTCOMES, SERVE, nbdsh, run, served, wait_for_socket
from pynbd.client import NBD, NBDError
from pynbd.process import stop_process

FLAGS = ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
         "can_multi_conn", "can_cache")
BLOCK_SIZES = ("block_size_minimum", "block_size_preferred", "block_size_maximum")


def upstream(sock: Path, *args: str, server: Sequence[str] = ("nbdkit",)) -> subprocess.Popen:
    """nbdkit (or ``server``) on ``sock`` serving ``args``, accepting when this returns."""
    sock.unlink(missing_ok=True)  # left by a killed one
    proc = subprocess.Popen([*server, "-f", "-U", str(sock), *args], stderr=subprocess.PIPE)
    wait_for_socket(str(sock), proc)
    return proc


def uri_of(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def digest(uri: str, tmp_path: Path, name: str) -> str:
    out = tmp_path / name
    run(["nbdcopy", uri, str(out)])
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("below", [["pattern", "3M"], ["-r", "sparse-random", "4M", "seed=7"],
                                   ["--filter=cache", "memory", "2M"]])
def test_matches_nbdkit_nbd_plugin(tmp_path, below):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, *below)
    try:
        seen = []
        for server in BOTH:
            with served("nbd", f"socket={sock}", server=server) as srv:
                info = export_info(srv.uri)
                seen.append(({k: info.get(k) for k in FLAGS}, digest(srv.uri, tmp_path, server),
                             run(["nbdinfo", "--map", srv.uri]).stdout))
        assert seen[0] == seen[1]
        assert seen[0][1] == digest(uri_of(sock), tmp_path, "direct")
        theirs = [export_info(uri_of(sock)).get(k) for k in BLOCK_SIZES]
        if theirs[0] is not None:  # passed on (nbdkit 1.32's nbd plugin drops them)
            with served("nbd", f"socket={sock}") as srv:
                ours = [export_info(srv.uri).get(k) for k in BLOCK_SIZES]
            assert ours[:2] == theirs[:2] and ours[2] <= theirs[2]
    finally:
        stop_process(proc)


def test_writes_flags_and_errors_pass_through(tmp_path):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "memory", "4M")
    try:
        with served("nbd", uri_of(sock)) as srv:
            nbdsh(srv.uri, "h.pwrite(b'a' * 65536, 0, nbd.CMD_FLAG_FUA)\n"
                           "h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)\n"
                           "h.trim(65536, 1 << 20); h.flush(); h.cache(4096, 0)")
            assert nbdsh(uri_of(sock), "print(h.pread(8192, 0).hex())").strip() == \
                (b"a" * 4096 + bytes(4096)).hex()
        errors = []
        for server in BOTH:
            with served("--filter=error", "nbd", uri_of(sock), "error=ENOSPC", "error-pwrite-rate=1",
                        server=server) as srv:
                errors.append(nbdsh_outcomes(srv.uri, ["h.pwrite(b'x', 0)", "h.pread(1, 0)"]))
        bad = tmp_path / "bad.sock"
        proc2 = upstream(bad, "--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=1")
        try:
            for server in BOTH:
                with served("nbd", uri_of(bad), server=server) as srv:
                    errors.append(nbdsh_outcomes(srv.uri, ["h.pwrite(b'x', 0)", "h.pread(1, 0)"]))
        finally:
            stop_process(proc2)
        assert errors == [["ENOSPC", "ok"]] * 4
    finally:
        stop_process(proc)


def test_qemu_nbd_qcow2_under_filters(tmp_path):
    image = make_qcow2(tmp_path)
    with qemu_nbd(image) as up:
        for server in BOTH:
            with served("--filter=offset", "nbd", up, "offset=65536", "range=1M", server=server) as srv:
                out = nbdsh(srv.uri, "print(h.get_size(), h.pread(1, 0)[0], h.pread(1, 1048575 - 65536)[0])")
                assert out.split() == ["1048576", "0", "0"]
        with served("nbd", up) as srv:
            assert nbdsh(srv.uri, "print(h.pread(2, 65535).hex())").strip() == "0100"
            rows = run(["nbdinfo", "--map", srv.uri]).stdout.decode()
            assert rows.splitlines()[0].split()[:3] == ["0", "65536", "0"]


def test_cow_over_a_read_only_qemu_nbd(tmp_path):
    image = make_qcow2(tmp_path)
    before = image.read_bytes()
    with qemu_nbd(image, "-r") as up, served("--filter=cow", "nbd", up) as srv:
        nbdsh(srv.uri, "h.pwrite(b'cow!' * 128, 0)")
        assert nbdsh(srv.uri, "print(bytes(h.pread(4, 0)), h.pread(1, 600)[0])").split() == ["b'cow!'", "1"]
    assert image.read_bytes() == before


def test_meta_contexts_pass_through(tmp_path):
    """qemu-nbd's dirty bitmap and allocation depth, seen through the proxy as directly."""
    image = make_qcow2(tmp_path)
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 2M 128k", str(image)])
    contexts = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    with qemu_nbd(image, "-r", "-B", "b0", "-A") as up, served("nbd", up) as srv:
        assert export_info(srv.uri)["contexts"] == contexts
        for context in contexts:
            maps = [run(["nbdinfo", f"--map={context}", uri]).stdout for uri in (srv.uri, up)]
            assert maps[0] == maps[1], context
        dirty = run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", srv.uri]).stdout.decode().split()
        assert dirty[:8] == ["0", str(2 << 20), "0", "clean", str(2 << 20), str(128 << 10), "1", "dirty"]


def test_captive_qemu_nbd(tmp_path):
    image = make_qcow2(tmp_path)
    with served("nbd", "command=qemu-nbd", "arg=-f", "arg=qcow2", f"arg={image}") as srv:
        assert export_info(srv.uri)["export-size"] == 4 << 20
        nbdsh(srv.uri, "h.pwrite(b'q' * 512, 2 << 20)")
    assert run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x71 2M 512", str(image)]).returncode == 0


def test_upstream_killed_then_back(tmp_path):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "pattern", "1M")
    with served("nbd", uri_of(sock), "retry=2") as srv, NBD() as h:
        h.connect_uri(srv.uri)
        assert h.pread(8, 8) == (8).to_bytes(8, "big")
        proc.kill()  # killed, as a crash would (nbdkit's SIGTERM waits for its clients)
        proc.wait()
        with pytest.raises(NBDError) as failed:
            h.pread(8, 8)
        assert failed.value.errno == errno.EIO
        start = time.monotonic()
        with pytest.raises(NBDError):  # no server: 3 tries a second apart, then EIO
            h.pread(8, 8)
        assert 1.5 < time.monotonic() - start < 20
        proc = upstream(sock, "pattern", "1M")
        try:
            assert h.pread(8, 16) == (16).to_bytes(8, "big")  # reconnected
        finally:
            proc.kill()
            proc.wait()
    log = srv.stderr()
    assert "lost the connection" in log and "reconnected" in log and "Traceback" not in log


def test_new_clients_wait_for_a_late_server_with_retry(tmp_path):
    sock = tmp_path / "up.sock"
    with served("nbd", f"socket={sock}", "retry=5") as srv:
        client = subprocess.Popen(["nbdinfo", "--size", srv.uri], stdout=subprocess.PIPE)
        time.sleep(1.2)
        proc = upstream(sock, "memory", "5M")
        try:
            assert client.communicate(timeout=30)[0].strip() == b"5242880"
        finally:
            stop_process(proc)


def test_unreachable_server_refuses_the_client_and_keeps_serving(tmp_path):
    sock = tmp_path / "up.sock"
    with served("nbd", f"socket={sock}") as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        proc = upstream(sock, "memory", "1M")
        try:
            assert export_info(srv.uri)["export-size"] == 1 << 20
        finally:
            stop_process(proc)
    assert "cannot connect to" in srv.stderr()


def test_tls_to_the_server(tmp_path):
    pki = make_pki(tmp_path)
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "--tls=require", f"--tls-certificates={pki}", "memory", "1M")
    try:
        with served("nbd", f"socket={sock}", "tls=require", f"tls-certificates={pki}",
                    "tls-verify=false") as srv:
            assert export_info(srv.uri)["export-size"] == 1 << 20
        assert "TLS" in config_error("nbd", f"socket={sock}", "shared=true")  # the server requires it
    finally:
        stop_process(proc)


def test_multi_conn_upstream_connections(tmp_path):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "memory", "1M")
    try:
        with served("nbd", "hostname=127.0.0.1", "port=1", "connections=3") as srv:
            assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        with served("nbd", uri_of(sock), "connections=3") as srv, NBD() as h:
            h.connect_uri(srv.uri)
            assert h.can_multi_conn()
            for i in range(6):
                h.pwrite(bytes([i + 1]) * 512, i * 512)
            h.flush()
            assert nbdsh(uri_of(sock), "print(h.pread(3072, 0)[::512].hex())").strip() == "010203040506"
    finally:
        stop_process(proc)


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of uri="),
    (["socket=/x", "hostname=y"], "given: socket, hostname"),
    (["uri=http://x/"], "unknown scheme"),
    (["uri=nbd+unix:///?socket=/x", "export=a"], "export= cannot be used with uri="),
    (["socket=/nonexistent.sock", "shared=true"], "cannot connect to"),
    (["command=true", "shared=false"], "command= needs shared=true"),
    (["socket=/x", "dynamic-export=true", "shared=true"], "dynamic-export cannot be used"),
    (["hostname=x", "port=nosuchservice"], "unknown service"),
])
def test_bad_parameters(args, message):
    assert message in config_error("nbd", *args)


def test_shared_connection_for_all_clients(tmp_path):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "memory", "1M")
    try:
        with served("nbd", f"socket={sock}", "shared=true") as srv:
            nbdsh(srv.uri, "h.pwrite(b'shared', 0)")
            assert nbdsh(srv.uri, "print(bytes(h.pread(6, 0)))").strip() == "b'shared'"
            listing = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
            assert listing["exports"][0]["export-size"] == 1 << 20
    finally:
        stop_process(proc)


def test_reads_in_flight_when_the_server_dies_fail_then_reconnect(tmp_path):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "--filter=delay", "pattern", "1M", "rdelay=2")
    code = NBDSH_OUTCOMES + """
import time
bufs = [nbd.Buffer(4096) for _ in range(16)]
cookies = [h.aio_pread(buf, 4096 * i) for i, buf in enumerate(bufs)]
time.sleep(0.5)  # all sent on, held by the server's delay
print("sent", flush=True)
print(outcomes(cookies))
"""
    with served("nbd", uri_of(sock), "retry=3") as srv:
        client = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c", code], stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline() == "sent\n"
        proc.kill()
        proc.wait()
        assert client.stdout.read().strip() == str(["EIO"] * 16)
        assert client.wait() == 0
        proc = upstream(sock, "pattern", "1M")
        try:
            assert nbdsh(srv.uri, "print(h.pread(8, 64).hex())").strip() == (64).to_bytes(8, "big").hex()
        finally:
            proc.kill()
            proc.wait()
    log = srv.stderr()
    assert "lost the connection" in log and "Traceback" not in log


@pytest.mark.parametrize("shared", ["true", "false"])
def test_client_gone_with_reads_in_flight(tmp_path, shared):
    sock = tmp_path / "up.sock"
    # Upstream is pynbd: Debian's nbdkit 1.32 aborts when a client (here the proxy, closing the
    # vanished client's own link) disconnects while its delay filter holds reads.
    proc = upstream(sock, "--filter=delay", "pattern", "1M", "rdelay=1", server=SERVE)
    try:
        with served("nbd", uri_of(sock), f"shared={shared}") as srv:
            code = "for i in range(16): h.aio_pread(nbd.Buffer(4096), 4096 * i)\nh.poll(0)\n"
            nbdsh(srv.uri, code)  # exits (no NBD_CMD_DISC) with 16 reads in flight
            assert nbdsh(srv.uri, "print(h.pread(8, 8).hex())").strip() == (8).to_bytes(8, "big").hex()
        assert "Traceback" not in srv.stderr()
    finally:
        proc.kill()
        proc.wait()


def test_fio_verify_through_the_proxy_at_depth_16(tmp_path):
    sock = tmp_path / "up.sock"
    proc = upstream(sock, "memory", "4M")
    try:
        with served("nbd", uri_of(sock)) as srv:
            run(["fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randrw", "--bs=4k",
                 "--iodepth=16", "--size=4M", "--verify=crc32c", "--verify_fatal=1", "--fsync=8",
                 "--verify_state_save=0", "--do_verify=1", "--loops=2"])
    finally:
        proc.kill()
        proc.wait()
