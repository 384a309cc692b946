"""pynbd copy's bad input: each gets one clear line on stderr and exit status 1.

A copy that fails mid-way (ENOSPC, EIO from nbdkit's full plugin or the
error filters of nbdkit and pynbd) must never exit 0.
"""

from __future__ import annotations

import socket

import pytest
from test_copy import IMAGE_SIZE, make_image, pynbd_copy

from client.nbdpeers import make_pki
from nbdtest import served


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("copyerr") / "image.raw")


def fails(*args: str, input: bytes | None = None) -> str:
    """Run a copy that must fail; return its one line of complaint."""
    result = pynbd_copy(*args, check=False, input=input)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("pynbd copy: ")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- endpoints

@pytest.mark.parametrize("uri", ["nbd://host:port/", "nbd+unix:///", "nbd+unix://host/?socket=/x",
                                 "nbd+vsock://abc/"])
def test_unparseable_uri(tmp_path, uri):
    line = fails(uri, str(tmp_path / "out"))
    assert "invalid NBD URI" in line
    assert not (tmp_path / "out").exists()


def test_unreachable_tcp_server(tmp_path):
    line = fails(f"nbd://127.0.0.1:{free_port()}/", str(tmp_path / "out"))
    assert "ECONNREFUSED" in line or "refused" in line


def test_missing_unix_socket(tmp_path, image):
    line = fails(str(image), f"nbd+unix:///?socket={tmp_path}/nothing-here")
    assert "No such file or directory" in line or "ENOENT" in line


def test_unknown_export_name(tmp_path):
    with served("--filter=exportname", "memory", "1M", "exportname=disk",
                "exportname-strict=true", server="nbdkit") as srv:
        uri = srv.uri.replace("nbd+unix:///", "nbd+unix:///nope")
        line = fails(uri, str(tmp_path / "out"))
    assert "no such export" in line or "ENOENT" in line


def test_missing_source_file(tmp_path):
    line = fails(str(tmp_path / "absent.raw"), "null:")
    assert "No such file or directory" in line


def test_captive_server_that_fails(tmp_path):
    line = fails("--", "[", "false", "]", str(tmp_path / "out"))
    assert "[ false ]" in line


def test_second_connection_refused(image):
    """A server that advertises multi-conn but takes one client: the second lane fails."""
    with served("--filter=limit", "memory", "16M", "limit=1", server="nbdkit") as srv:
        assert "server closed the connection" in fails("-C", "2", "-T", "2", str(image), srv.uri)


def test_server_requiring_tls(image, tmp_path):
    """Refused without TLS (one line); an nbds:// URI with the CA copies the same bytes."""
    pki = make_pki(tmp_path)
    out = tmp_path / "out.raw"
    with served("memory", "16M", server="nbdkit",
                options=["--tls=require", f"--tls-certificates={pki}"]) as srv:
        assert "TLS" in fails(str(image), srv.uri)
        secure = f"nbds+unix:///?socket={srv.socket}&tls-certificates={pki}"
        pynbd_copy(str(image), secure)
        pynbd_copy(secure, str(out))
    assert out.read_bytes() == image.read_bytes()


def test_read_only_destination(image):
    with served("memory", "16M", options=["-r"], server="nbdkit") as srv:
        assert "read-only" in fails(str(image), srv.uri)


# --------------------------------------------------------------------- sizes

def test_source_larger_than_destination(image):
    with served("memory", "15M", server="nbdkit") as srv:
        line = fails(str(image), srv.uri)
    assert f"smaller than source size ({IMAGE_SIZE})" in line


def test_stream_longer_than_destination(image):
    with served("memory", "1M") as srv:
        line = fails("-", srv.uri, input=image.read_bytes()[:2 * 1024 * 1024])
    assert "larger than the destination" in line


# ------------------------------------------------------------- failed writes

def test_full_destination_enospc(image):
    with served("full", "16M", server="nbdkit") as srv:
        assert "ENOSPC" in fails(str(image), srv.uri)


@pytest.mark.parametrize("server", ["nbdkit", "pynbd"])
@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_writes_failing_mid_copy(image, server, err):
    with served("--filter=error", "memory", "16M", f"error={err}", "error-pwrite-rate=0.2",
                server=server) as srv:
        assert err in fails("--request-size=64K", str(image), srv.uri)


def test_zero_requests_failing(image):
    with served("--filter=error", "memory", "16M", "error=EIO", "error-zero-rate=1",
                server="nbdkit") as srv:
        assert "EIO" in fails("--allocated", str(image), srv.uri)


def test_reads_failing_mid_copy(tmp_path):
    with served("--filter=error", "pattern", "16M", "error=EIO", "error-pread-rate=0.2",
                server="nbdkit") as srv:
        assert "EIO" in fails(srv.uri, str(tmp_path / "out"))


def test_synchronous_copy_stops_at_first_failure(image):
    with served("--filter=error", "memory", "16M", "error=ENOSPC", "error-pwrite-rate=1",
                server="nbdkit") as srv:
        assert "ENOSPC" in fails("--synchronous", str(image), srv.uri)


def test_stream_destination_enospc(image):
    result = pynbd_copy(str(image), "/dev/full", check=False)
    assert result.returncode == 1
    assert "No space left on device" in result.stderr.decode()


# -------------------------------------------------------------- command line

@pytest.mark.parametrize("args,message", [
    (["--request-size=1000", "a", "b"], "--request-size: must be a power of 2"),
    (["--request-size=64M", "a", "b"], "--request-size: must be a power of 2"),
    (["-S", "100", "a", "b"], "--sparse: must be a power of 2"),
    (["-C", "0", "a", "b"], "--connections: could not parse"),
    (["--requests=x", "a", "b"], "--requests: could not parse"),
    (["--progress=abc", "a", "b"], "--progress: expected a file descriptor"),
    (["--bogus", "a", "b"], "unrecognized option '--bogus'"),
    (["-X", "a", "b"], "invalid option -- 'X'"),
    (["--flush=yes", "a", "b"], "doesn't allow an argument"),
    (["only-one"], "expected two arguments"),
    (["a", "b", "c"], "expected two arguments"),
    (["null:", "out"], "null: can only be the destination"),
    (["--", "[", "nbdkit", "memory", "1M", "out"], "'[' without a matching ']'"),
    (["--", "[", "]", "out"], "nothing between '[' and ']'"),
    (["-R"], "option '-R' requires an argument"),
])
def test_bad_command_lines(args, message):
    assert message in fails(*args)


def test_progress_to_a_closed_descriptor(image):
    assert "--progress=99" in fails("--progress=99", str(image), "null:")
