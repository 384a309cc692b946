"""curl plugin: nginx over HTTP and HTTPS, compared with nbdkit's curl plugin, and servers that fail."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time

import pytest
from plugin_helpers import config_error, export_info
from webserver import PASSWORD, USER, BadServer, nginx

from filters.stack_helpers import BOTH, nbdsh_errno, nbdsh_outcomes
from nbdtest import SERVE, nbdsh, run, served, wait_for
from pynbd.client import NBD, NBDError

SIZE = (3 << 20) + 12345  # not a multiple of anything


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    (root / "disk.img").write_bytes(os.urandom(SIZE))
    (root / "tiny").write_bytes(b"x")
    with nginx(str(root)) as server:
        server.root = root
        yield server


def digest_of(uri: str, tmp_path, name: str) -> str:
    """sha256 of the whole export, copied by nbdcopy."""
    out = tmp_path / name
    run(["nbdcopy", uri, str(out)])
    return hashlib.sha256(out.read_bytes()).hexdigest()


def expected(web) -> str:
    return hashlib.sha256((web.root / "disk.img").read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["http", "https"])
def test_bytes_and_size_match_nbdkit(web, tmp_path, where):
    url = web.http("disk.img") if where == "http" else web.https("auth/disk.img")
    args = [url] if where == "http" else [url, f"cainfo={web.ca}", f"user={USER}", f"password={PASSWORD}"]
    results = []
    for server in BOTH:
        with served("curl", *args, server=server, options=["-r"]) as srv:
            results.append((export_info(srv.uri)["export-size"], digest_of(srv.uri, tmp_path, server)))
    assert results[0] == results[1] == (SIZE, expected(web))


def test_reads_at_odd_offsets_match_the_file(web):
    with served("curl", web.http("disk.img")) as srv:
        out = nbdsh(srv.uri, "print(h.pread(1000, 4095).hex()); print(h.pread(7, h.get_size() - 7).hex())")
    data = (web.root / "disk.img").read_bytes()
    assert out.split() == [data[4095:5095].hex(), data[-7:].hex()]


def test_one_byte_object(web):
    with served("curl", web.http("tiny")) as srv:
        assert nbdsh(srv.uri, "print(h.get_size(), bytes(h.pread(1, 0)))").split() == ["1", "b'x'"]


@pytest.mark.parametrize("location, params", [
    ("redirect/disk.img", []),
    ("cookie/disk.img", ["cookie=session=ok"]),
    ("header/disk.img", ["header=X-Token: ok"]),
    ("header/disk.img", ["header-script=echo 'X-Token: ok'"]),
    ("cookie/disk.img", ["cookie-script=echo session=ok"]),
])
def test_access_controls(web, tmp_path, location, params):
    with served("curl", web.http(location), *params) as srv:
        assert digest_of(srv.uri, tmp_path, "out") == expected(web)


def test_password_from_a_file_and_https_options(web, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    with served("curl", web.https("auth/disk.img"), f"user={USER}", f"password=+{secret}",
                "sslverify=false", "connections=2", "timeout=10") as srv:
        assert digest_of(srv.uri, tmp_path, "out") == expected(web)


def test_header_script_renewed(web, tmp_path):
    runs = tmp_path / "runs"
    script = f"echo $iteration >> {runs}; echo 'X-Token: ok'"
    with served("curl", web.http("header/disk.img"), f"header-script={script}",
                "header-script-renew=1") as srv:
        def renewed() -> bool:
            nbdsh(srv.uri, "h.pread(512, 0)")
            return "1" in runs.read_text().split()
        wait_for(renewed, message=lambda: f"script runs: {runs.read_text().split()}", interval=0.3)
    assert runs.read_text().split()[:2] == ["0", "1"]


@pytest.mark.parametrize("location, params, message", [
    ("norange/disk.img", [], "does not serve byte ranges"),
    ("missing", [], "HTTP 404"),
    ("forbidden", [], "HTTP 403"),
    ("auth/disk.img", [], "HTTP 401"),
    ("redirect/disk.img", ["followlocation=false"], "HTTP 302"),
    ("header/disk.img", ["header-script=echo nope >&2; exit 3"],
     "header-script failed with exit status 3: nope"),
])
def test_refused_at_start(web, location, params, message):
    line = config_error("curl", web.http(location), *params)
    assert message in line and line.startswith("pynbd: error: curl:"), line


def test_bad_certificate_and_bad_parameters(web):
    assert "SSL certificate" in config_error("curl", web.https("disk.img"))
    assert "header-script cannot be used with header" in config_error(
        "curl", web.http("disk.img"), "header=a: b", "header-script=true")
    assert "unknown protocol 'gopherx'" in config_error("curl", web.http("disk.img"),
                                                        "protocols=http,gopherx")
    assert "connect" in config_error("curl", "http://127.0.0.1:1/disk.img").lower()
    assert "not a URL" in config_error("curl", "disk.img")
    # protocols= also applies to the URL itself
    assert "curl:" in config_error("curl", web.http("disk.img"), "protocols=https")


@pytest.mark.parametrize("behaviour, message, gets", [
    ("503", "HTTP 503 (after 3 attempts)", 3),
    ("reset", "(after 3 attempts)", 3),
    ("grow", "size changed from 65536 to 131072", 1),
])
def test_failing_reads_are_eio_and_logged(behaviour, message, gets):
    with BadServer(65536, behaviour) as bad:
        with served("curl", bad.url) as srv:
            bad.gets = 0
            assert nbdsh_errno(srv.uri, "h.pread(4096, 0)") == "EIO"
            assert gets <= bad.gets <= 2 * gets  # libcurl may retry a dead kept-alive connection once
            assert export_info(srv.uri)["export-size"] == 65536  # still serving
        log = srv.stderr()
    assert message in log and "Traceback" not in log, log


def test_transient_errors_retried():
    with BadServer(65536, "flaky") as bad:
        with served("curl", bad.url) as srv:
            bad.gets = 0
            out = nbdsh(srv.uri, "print(h.pread(16, 256).hex())")
        assert out.strip() == bad.data[256:272].hex() and bad.gets == 3
    assert "HTTP 503; trying again" in srv.stderr()


def test_timeout_bounds_a_hanging_server():
    with BadServer(65536, "hang") as bad:
        with served("curl", bad.url, "timeout=1") as srv:
            start = time.monotonic()
            assert nbdsh_outcomes(srv.uri, ["h.pread(4096, 0)"]) == ["EIO"]
            assert time.monotonic() - start < 10
        assert "timed out" in srv.stderr().lower()


def test_xz_image_over_http_with_run(web, tmp_path):
    """The seed pipeline: pynbd serve curl URL --filter=xz --run 'nbdinfo $uri'."""
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"".join(i.to_bytes(8, "big") for i in range(300000)))
    run(["xz", "-k", "-T1", "--block-size=1MiB", str(plain)])
    (web.root / "image.xz").write_bytes((tmp_path / "plain.img.xz").read_bytes())
    out = tmp_path / "out.img"
    result = run([*SERVE, "-U", "-", "curl", web.http("image.xz"), "--filter=xz",
                  "--run", f"nbdinfo --size $uri && nbdcopy $uri {out}"])
    assert result.stdout.decode().strip() == str(plain.stat().st_size)
    assert out.read_bytes() == plain.read_bytes()


def test_object_replaced_while_served(web):
    """nginx gives a strong ETag: reads carry If-Match, and a changed object fails them (412)."""
    path = web.root / "changing.img"
    path.write_bytes(bytes(65536))
    with served("curl", web.http("changing.img")) as srv, NBD() as before:
        before.connect_uri(srv.uri)
        assert before.pread(4, 0) == bytes(4)
        path.write_bytes(b"\1" * 65536)
        os.utime(path, (1, 1))
        with pytest.raises(NBDError) as failed:
            before.pread(4, 0)
        assert failed.value.errno == errno.EIO
        assert nbdsh(srv.uri, "print(h.pread(4, 0).hex())").strip() == "01010101"  # a new client
    log = srv.stderr()
    assert "the object changed while it was served (HTTP 412" in log and "Traceback" not in log, log


@pytest.mark.parametrize("connections", [1, 3])
def test_parallel_requests_up_to_connections(connections):
    """Reads of several clients run at once on the shared pool, at most connections= of them."""
    with BadServer(65536, "gate") as bad:
        with served("curl", bad.url, f"connections={connections}") as srv:
            handles = [NBD() for _ in range(6)]
            try:
                for h in handles:
                    h.connect_uri(srv.uri)
                readers = [threading.Thread(target=h.pread, args=(512, 0)) for h in handles]
                for reader in readers:
                    reader.start()
                wait_for(lambda: bad.active == connections, message=lambda: f"{bad.active} GETs at once")
                bad.release.set()
                for reader in readers:
                    reader.join(30)
                assert not any(reader.is_alive() for reader in readers)
            finally:
                for h in handles:
                    h.close()
        assert bad.most == connections and bad.gets == 6


def test_many_reads_in_flight_of_one_client(web):
    """64 reads sent at once (answered later, on the multi handle), over HTTP and HTTPS."""
    code = """
import random
rng = random.Random(5)
size = h.get_size()
reads = [(rng.randrange(0, size - 70000), rng.choice((1, 512, 4096, 65536))) for _ in range(64)]
bufs = [nbd.Buffer(n) for _, n in reads]
cookies = [h.aio_pread(buf, off) for buf, (off, _) in zip(bufs, reads)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
for buf, (off, n) in zip(bufs, reads):
    print(off, buf.to_bytearray().hex())
"""
    data = (web.root / "disk.img").read_bytes()
    for args in ([web.http("disk.img"), "connections=4"],
                 [web.https("auth/disk.img"), f"cainfo={web.ca}", f"user={USER}", f"password={PASSWORD}"]):
        with served("curl", *args) as srv:
            lines = nbdsh(srv.uri, code).split("\n")[:-1]
        assert len(lines) == 64
        for line in lines:
            off, hexdata = line.split(" ")
            assert bytes.fromhex(hexdata) == data[int(off):int(off) + len(hexdata) // 2]


def test_client_gone_with_reads_in_flight():
    with BadServer(65536, "gate") as bad:
        with served("curl", bad.url) as srv:
            nbdsh(srv.uri, "for i in range(8): h.aio_pread(nbd.Buffer(512), 512 * i)\nh.poll(0)\n")
            wait_for(lambda: bad.active > 0, message="no GET arrived")
            bad.release.set()  # their answers come when nobody waits for them any more
            out = nbdsh(srv.uri, "print(h.pread(16, 256).hex())")
            assert out.strip() == bad.data[256:272].hex()
        assert "Traceback" not in srv.stderr()
