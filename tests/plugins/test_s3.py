"""S3 plugin: against moto's S3 server on 127.0.0.1, compared with nbdkit's S3 plugin."""

from __future__ import annotations

import hashlib
import os

import pytest
from plugin_helpers import config_error, export_info, extent_map
from s3server import moto_s3

from filters.stack_helpers import BOTH, nbdsh_outcomes
from nbdtest import nbdsh, run, served

OBJECT = os.urandom((1 << 20) + 333)
BLOCK = 65536


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        server.client.create_bucket(Bucket="disks")
        server.client.put_object(Bucket="disks", Key="disk.img", Body=OBJECT)
        yield server


def s3_args(s3, *more: str) -> list[str]:
    return ["S3", f"endpoint-url={s3.url}", "bucket=disks", *more]


def blocks_of(s3, prefix: str) -> list[str]:
    listing = s3.client.list_objects_v2(Bucket="disks", Prefix=prefix + "/")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_one_object_matches_nbdkit(s3, tmp_path):
    results = []
    for server in BOTH:
        with served(*s3_args(s3, "key=disk.img"), server=server, env=s3.env_for(server)) as srv:
            out = tmp_path / server
            run(["nbdcopy", srv.uri, str(out)])
            info = export_info(srv.uri)
            results.append((info["export-size"], info["is_read_only"],
                            hashlib.sha256(out.read_bytes()).hexdigest()))
    assert results[0] == results[1] == (len(OBJECT), True, hashlib.sha256(OBJECT).hexdigest())


def test_blocks_written_by_one_read_by_the_other(s3):
    # pynbd writes, nbdkit reads, and the other way round: the same object names.
    # (nbdkit's S3 plugin takes only whole blocks: its minimum block size is object-size.)
    for writer, reader, prefix in (("pynbd", "nbdkit", "w1"), ("nbdkit", "pynbd", "w2")):
        args = s3_args(s3, f"key={prefix}", "size=1M", f"object-size={BLOCK}")
        with served(*args, server=writer, env=s3.env_for(writer)) as srv:
            nbdsh(srv.uri, f"h.pwrite(b'x' * {BLOCK}, {BLOCK}); h.pwrite(b'y' * {2 * BLOCK}, {3 * BLOCK})")
        with served(*args, server=reader, env=s3.env_for(reader)) as srv:
            out = nbdsh(srv.uri, f"d = h.pread({6 * BLOCK}, 0); print(d[::{BLOCK}].hex())")
        assert out.strip() == b"\0x\0yy\0".hex()
        assert blocks_of(s3, prefix) == [f"{prefix}/{n:016x}" for n in (1, 3, 4)]


def test_partial_writes(s3):
    with served(*s3_args(s3, "key=p", "size=1M", f"object-size={BLOCK}"), env=s3.env) as srv:
        nbdsh(srv.uri, f"h.pwrite(b'partial', {3 * BLOCK + 10}); h.pwrite(b'ab', {BLOCK - 1})")
        out = nbdsh(srv.uri, f"print(h.pread(9, {3 * BLOCK + 9}).hex(), h.pread(4, {BLOCK - 2}).hex())")
    assert out.split() == [b"\0partial\0".hex(), b"\0ab\0".hex()]
    assert blocks_of(s3, "p") == [f"p/{n:016x}" for n in (0, 1, 3)]


def test_trim_zero_and_extents(s3):
    args = s3_args(s3, "key=t", "size=1M", f"object-size={BLOCK}")
    with served(*args, env=s3.env) as srv:
        nbdsh(srv.uri, f"h.pwrite(b'a' * {4 * BLOCK}, 0)\n"
                       f"h.trim({BLOCK}, {BLOCK}); h.zero({BLOCK}, {2 * BLOCK})\n"
                       f"h.zero(100, 10); h.pwrite(bytes({BLOCK}), {3 * BLOCK}); h.flush()")
        assert blocks_of(s3, "t") == [f"t/{0:016x}"]
        rows = extent_map(srv.uri)
        assert rows == [(0, BLOCK, 0), (BLOCK, (1 << 20) - BLOCK, 3)]
        assert nbdsh(srv.uri, "print(h.pread(8, 6).hex(), h.pread(4, 110).hex())").split() == \
            [(b"aaaa" + bytes(4)).hex(), b"aaaa".hex()]
        info = export_info(srv.uri)
        assert info["can_multi_conn"] and info["can_trim"] and info["can_fua"] and not info["is_read_only"]


def test_concurrent_partial_writes_to_one_block(s3):
    args = s3_args(s3, "key=c", "size=1M", f"object-size={BLOCK}")
    with served(*args, env=s3.env) as srv:
        code = "\n".join(["cookies = [h.aio_pwrite(bytes([i + 1]) * 512, i * 512) for i in range(32)]",
                          "while h.aio_in_flight() > 0: h.poll(-1)",
                          "print(h.pread(32 * 512, 0)[::512].hex())"])
        assert nbdsh(srv.uri, code).strip() == bytes(range(1, 33)).hex()


@pytest.mark.parametrize("params, message", [
    (["bucket=nope", "key=x"], "bucket 'nope' does not exist"),
    (["bucket=disks", "key=missing.img"], "no object 'missing.img' in bucket 'disks'"),
    (["bucket=disks", "key=x", "size=1M"], "size= and object-size= must be given together"),
    (["key=x"], "missing required parameter 'bucket'"),
])
def test_refused_at_start(s3, params, message):
    env_line = config_error_env(s3, ["S3", f"endpoint-url={s3.url}", *params])
    assert message in env_line, env_line


def config_error_env(s3, args: list[str]) -> str:
    """config_error with the dummy credentials in the environment."""
    saved = dict(os.environ)
    os.environ.update(s3.env)
    try:
        return config_error(*args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_bad_credentials_refused_at_start():
    with moto_s3(check_credentials=True) as strict:
        line = config_error_env(strict, ["S3", f"endpoint-url={strict.url}", "bucket=b", "key=k"])
    assert "denied (check the credentials)" in line or "InvalidAccessKeyId" in line, line


def test_unreachable_service_refused_at_start():
    line = config_error("S3", "endpoint-url=http://127.0.0.1:1", "bucket=b", "key=k",
                        "access-key=a", "secret-key=b")
    assert line.startswith("pynbd: error: S3:") and "127.0.0.1:1" in line, line


def test_service_gone_while_serving_is_eio():
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket="disks")
        with served(*s3_args(s3, "key=g", "size=1M", f"object-size={BLOCK}"), env=s3.env) as srv:
            nbdsh(srv.uri, "h.pwrite(b'z' * 512, 0)")
            s3.proc.kill()
            s3.proc.wait()
            assert nbdsh_outcomes(srv.uri, ["h.pread(512, 0)", "h.pwrite(b'y', 0)"]) == ["EIO", "EIO"]
        log = srv.stderr()
    assert "S3: GET g/0000000000000000" in log and "Traceback" not in log, log
