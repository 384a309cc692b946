"""ondemand plugin: a persistent file system per export name, checked with e2fsprogs and nbdkit."""

from __future__ import annotations

import json
import threading
import time

import pytest
from plugin_helpers import config_error
from test_tmpdisk import ext_summary

from filters.stack_helpers import BOTH
from nbdtest import run, served
from pynbd.client import NBD

SIZE = 8 << 20


def uri_of(srv, export: str) -> str:
    return f"nbd+unix:///{export}?socket={srv.socket}"


def test_made_on_first_use_like_nbdkit_and_kept(tmp_path):
    summaries = []
    for server in BOTH:
        exports = tmp_path / server
        exports.mkdir()
        with served("ondemand", f"dir={exports}", str(SIZE), "label=od", server=server) as srv:
            run(["nbdinfo", uri_of(srv, "export1")])
        image = exports / "export1"
        assert image.stat().st_size == SIZE
        run(["e2fsck", "-fn", str(image)])
        summaries.append(ext_summary(str(image)))
    assert summaries[0] == summaries[1]
    assert summaries[0]["Filesystem volume name"] == "od"
    exports = tmp_path / "pynbd"
    # wait=true: the listing below opens export1 right after this client's close
    with served("ondemand", f"dir={exports}", str(SIZE), "wait=true") as srv:
        with NBD() as h:
            h.connect_uri(uri_of(srv, "export1"))
            h.pwrite(b"kept", SIZE - 4096)
            h.flush()
        listed = [e["export-name"] for e in
                  json.loads(run(["nbdinfo", "--list", "--json", srv.uri]).stdout)["exports"]]
    with served("ondemand", f"dir={exports}", str(SIZE)) as srv, NBD() as h:
        h.connect_uri(uri_of(srv, "export1"))
        assert h.pread(4, SIZE - 4096) == b"kept"
    assert listed == ["export1"] == [p.name for p in exports.iterdir()]


def test_invalid_names_refused_server_goes_on(tmp_path):
    with served("ondemand", f"dir={tmp_path}", str(SIZE)) as srv:
        for name in ("a.b", "a:b", ".hidden", "x" * 256):
            assert run(["nbdinfo", uri_of(srv, name)], check=False).returncode != 0
        run(["nbdinfo", uri_of(srv, "fine")])
    assert [p.name for p in tmp_path.iterdir()] == ["fine"]
    assert "Traceback" not in srv.stderr()


def test_locked_while_in_use_and_wait(tmp_path):
    with served("ondemand", f"dir={tmp_path}", str(SIZE)) as srv, NBD() as first:
        first.connect_uri(uri_of(srv, "fs"))
        result = run(["nbdinfo", uri_of(srv, "fs")], check=False)
        assert result.returncode != 0
    assert "filesystem is locked by another client" in srv.stderr()
    with served("ondemand", f"dir={tmp_path}", str(SIZE), "wait=true") as srv:
        first = NBD()
        first.connect_uri(uri_of(srv, "fs"))
        threading.Timer(1.0, first.close).start()
        started = time.monotonic()
        run(["nbdinfo", uri_of(srv, "fs")])  # waits until the first client goes
        assert time.monotonic() - started >= 0.9


def test_failing_mkfs_leaves_nothing(tmp_path):
    with served("ondemand", f"dir={tmp_path}", str(SIZE), "type=nosuchfs") as srv:
        assert run(["nbdinfo", uri_of(srv, "x")], check=False).returncode != 0
    assert list(tmp_path.iterdir()) == []
    assert "mkfs -t nosuchfs failed" in srv.stderr()


@pytest.mark.parametrize("args, message", [
    (["1M"], "missing required parameter 'dir'"),
    (["dir=DIR"], "missing required parameter 'size'"),
    (["dir=DIR/nope", "1M"], "not a directory"),
    (["dir=DIR", "1M", "foo=bar"], "unknown parameter 'foo'"),
])
def test_bad_parameters(tmp_path, args, message):
    assert message in config_error("ondemand", *[a.replace("DIR", str(tmp_path)) for a in args])
