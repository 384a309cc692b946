"""nbdkit Python plugins run unmodified: the same file under pynbd and under nbdkit.

Every sample plugin in scripts/ is served by both servers (``python`` plugin
and the short ``pynbd serve plugin.py`` form) and real clients (nbdinfo,
qemu-img, qemu-io, nbdcopy, nbdsh) must see the same thing.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from nbdtest import SERVE, nbdsh, run, served

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
FLAGS = ("export-size", "is_read_only", "is_rotational", "can_flush", "can_fua", "can_trim",
         "can_zero", "can_fast_zero", "can_cache", "can_multi_conn", "contexts")
SERVERS = ("pynbd", "nbdkit")


def script(name: str) -> str:
    return os.path.join(SCRIPTS, name)


def on(server: str, *args: str, run_cmd: str) -> subprocess.CompletedProcess:
    """Serve args on a private socket with --run (pynbd or nbdkit)."""
    base = SERVE if server == "pynbd" else ["nbdkit"]
    return run([*base, "-f", "-U", "-", *args, "--run", run_cmd], timeout=100)


def flags(uri: str) -> dict:
    export = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
    return {key: export.get(key) for key in FLAGS}


@pytest.mark.parametrize("name", ["ramdisk_v2.py", "ramdisk_v1.py", "minimal.py", "errors.py"])
def test_export_flags_match_nbdkit(name):
    seen = {}
    for server in SERVERS:
        with served("python", script(name), server=server) as srv:
            seen[server] = flags(srv.uri)
    assert seen["pynbd"] == seen["nbdkit"]
    assert seen["pynbd"]["export-size"] == 1 << 20


def test_flags_follow_missing_callbacks():
    with served(script("minimal.py")) as srv:
        got = flags(srv.uri)
    assert got["is_read_only"] and not got["can_flush"] and not got["can_cache"]
    with served(script("ramdisk_v1.py")) as srv:
        got = flags(srv.uri)
    # flush defined, no can_fua: FUA emulated by flush; zero defined: not a fast zero
    assert got["can_fua"] and got["can_flush"] and got["can_trim"] and not got["can_fast_zero"]


@pytest.mark.parametrize("name", ["ramdisk_v2.py", "ramdisk_v1.py"])
def test_qemu_img_and_nbdcopy_round_trip(name, tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(512 * 1024) + bytes(256 * 1024) + b"\x5a" * (256 * 1024))
    digests = {}
    for server in SERVERS:
        out = tmp_path / f"{server}.img"
        on(server, "python", script(name), "size=1M", run_cmd=(
            f"qemu-img convert -n -f raw -O raw {source} \"$uri\" && "
            f"qemu-io -f raw -c 'write -z 600k 64k' -c 'discard 700k 64k' \"$uri\" && "
            f"nbdcopy \"$uri\" {out}"))
        digests[server] = out.read_bytes()
    expected = bytearray(source.read_bytes())
    expected[600 * 1024:764 * 1024] = bytes(164 * 1024)
    assert digests["pynbd"] == bytes(expected)
    assert digests["pynbd"] == digests["nbdkit"]


def test_extents_and_list_exports_match_nbdkit():
    outputs = {}
    for server in SERVERS:
        outputs[server] = on(server, "python", script("ramdisk_v2.py"), "size=1M",
                             "exports=,second,third", run_cmd=(
                                 "qemu-io -f raw -c 'write -P 1 128k 64k' \"$uri\" >/dev/null && "
                                 "nbdinfo --map \"$uri\" && nbdinfo --list \"$uri\" | "
                                 "grep -E '^export=|description:'")).stdout.decode()
    assert outputs["pynbd"] == outputs["nbdkit"]
    rows = [line.split() for line in outputs["pynbd"].splitlines() if line[:1] == " "]
    assert ["131072", "65536", "0", "data"] in rows
    assert 'export="third"' in outputs["pynbd"]


ERROR_PROBE = """
import errno
def attempt(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print(attempt(lambda: h.pread(512, 0)), attempt(lambda: h.pread(512, 65536)),
      attempt(lambda: h.pread(512, 131072)), attempt(lambda: h.pread(512, 0)),
      attempt(lambda: h.pwrite(b"x" * 512, 0)), attempt(lambda: h.zero(512, 0)))
"""


def test_set_error_and_exceptions_reach_the_client_as_nbdkit_sends_them():
    answers = {}
    for server in SERVERS:
        with served("python", script("errors.py"), server=server) as srv:
            answers[server] = nbdsh(srv.uri, ERROR_PROBE).split()
    # set_error(ENOSPC) + raise → ENOSPC; a bare exception → EIO; the connection goes on;
    # zero() asking for EOPNOTSUPP is emulated with pwrite, which refuses with EPERM.
    assert answers["pynbd"] == ["ok", "ENOSPC", "EIO", "ok", "EPERM", "EPERM"]
    assert answers["pynbd"] == answers["nbdkit"]


def test_traceback_is_logged_for_a_plain_exception():
    with served(script("errors.py")) as srv:
        nbdsh(srv.uri, ERROR_PROBE)
        srv.proc.terminate()
        srv.proc.wait(10)
        log = srv.stderr()
    assert "ZeroDivisionError: this region is broken on purpose" in log
    assert "Traceback" in log and "errors.py" in log


def test_every_lifecycle_callback_is_called(tmp_path):
    log = tmp_path / "calls.log"
    probe = "h.pread(512, 0); h.flush(); h.cache(4096, 0); print(h.get_size())"
    with served(script("ramdisk_v2.py"), "size=64k", f"log={log}", "exports=second,other") as srv:
        assert nbdsh(srv.uri, probe).strip() == "65536"
        srv.proc.terminate()
        srv.proc.wait(10)
    calls = log.read_text().splitlines()
    assert calls[:3] == ["config_complete", "get_ready", "after_fork"]
    assert "preconnect readonly=False" in calls
    assert "open readonly=False export='second'" in calls  # default_export chose it
    assert {"flush", "cache 4096 0", "close"} <= set(calls)
    assert calls[-1] == "cleanup"


def test_nbdkit_module_functions(tmp_path):
    plugin = tmp_path / "functions.py"
    plugin.write_text(
        "import nbdkit\nAPI_VERSION = 2\n"
        "def open(readonly):\n"
        "    nbdkit.debug('debug works')\n"
        "    return [nbdkit.export_name(), nbdkit.is_tls(), nbdkit.parse_size('2k'),\n"
        "            nbdkit.parse_bool('on'), nbdkit.FLAG_FUA, nbdkit.CACHE_NATIVE,\n"
        "            nbdkit.EXTENT_ZERO, nbdkit.THREAD_MODEL_PARALLEL]\n"
        "def get_size(h):\n    return h[2]\n"
        "def pread(h, buf, offset, flags):\n"
        "    text = repr(h).encode().ljust(len(buf))\n"
        "    buf[:] = text[offset:offset + len(buf)]\n"
        "def thread_model():\n    return nbdkit.THREAD_MODEL_PARALLEL\n")
    with served(str(plugin), options=["-e", "named", "-v"]) as srv:
        text = nbdsh(srv.uri.replace(":///", ":///named"), "print(h.pread(80, 0).decode())")
        srv.proc.terminate()
        srv.proc.wait(10)
        log = srv.stderr()
    assert text.strip() == "['named', False, 2048, True, 2, 2, 2, 3]"
    assert "debug works" in log


COUNTER = '''
import builtins
import itertools
API_VERSION = 2
LOG = {log!r}
opens = itertools.count(1)

def note(method, h):
    with builtins.open(LOG, "a") as f:  # (open is the plugin's callback here)
        f.write(f"{{method}} {{h}}\\n")

def open(readonly):
    return f"conn{{next(opens)}}"

def get_size(h): note("get_size", h); return 1 << 20
def block_size(h): note("block_size", h); return (1, 4096, 1 << 20)
def can_write(h): note("can_write", h); return True
def can_flush(h): note("can_flush", h); return True
def can_trim(h): note("can_trim", h); return True
def can_zero(h): note("can_zero", h); return True
def can_extents(h): note("can_extents", h); return True
def can_multi_conn(h): note("can_multi_conn", h); return False
def is_rotational(h): note("is_rotational", h); return False
def pread(h, buf, offset, flags): buf[:] = bytes(len(buf))
def pwrite(h, buf, offset, flags): note("pwrite", h)
def zero(h, count, offset, flags): pass
def trim(h, count, offset, flags): pass
def flush(h, flags): pass
def extents(h, count, offset, flags): return [(offset, count, 3)]
def close(h): note("close", h)
'''


def test_each_question_calls_the_plugin_once_per_connection(tmp_path):
    # The filters and the server ask the layer below again and again; the
    # layer boundary asks the plugin once per connection.
    log = tmp_path / "calls"
    plugin = tmp_path / "counter.py"
    plugin.write_text(COUNTER.format(log=str(log)))
    io = ("h.pread(4096, 0); h.pwrite(b'x' * 4096, 8192, nbd.CMD_FLAG_FUA); h.zero(4096, 0); "
          "h.trim(4096, 4096); h.flush(); "
          "h.block_status(65536, 0, lambda *a: 0); print(h.get_size())")
    with served("--filter=offset", "--filter=truncate", "--filter=blocksize", "--filter=log",
                str(plugin), f"logfile={tmp_path / 'log'}") as srv:
        for _ in range(2):
            code = f"h.add_meta_context('base:allocation'); h.connect_uri('{srv.uri}'); {io}"
            assert run(["nbdsh", "-c", code]).stdout.decode().split() == [str(1 << 20)]
    calls = log.read_text().splitlines()
    for handle in ("conn1", "conn2"):
        for method in ("get_size", "block_size", "can_write", "can_flush", "can_trim", "can_zero",
                       "can_extents", "can_multi_conn", "is_rotational"):
            assert calls.count(f"{method} {handle}") == 1, (method, handle, calls)
        assert f"pwrite {handle}" in calls and f"close {handle}" in calls
