"""nbdkit's command line under ``pynbd serve``, each option against Debian's nbdkit where it has it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from nbdtest import SERVE, run, served
from pynbd.backend.plugin import Filter, Plugin
from pynbd.backend.registry import builtin_names

SERVERS = {"pynbd": SERVE, "nbdkit": ["nbdkit"]}
BOTH = tuple(SERVERS)
SIZE = 'nbdinfo --size "$uri"'


def serve(server: str, *args: str, check: bool = True) -> tuple[int, str, str]:
    result = run([*SERVERS[server], *args], check=check, timeout=60)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def refused(server: str, *args: str) -> str:
    """The one line a bad command line gets from pynbd (no traceback, status 1; nbdkit may say more)."""
    code, _, err = serve(server, *args, check=False)
    assert code == 1 and "Traceback" not in err, err
    assert server == "nbdkit" or len(err.strip().splitlines()) == 1, err
    return err


def keys(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# ---------------------------------------------------------------- --help

def test_help_lists_every_plugin_and_filter_in_one_line():
    _, out, _ = serve("pynbd", "--help")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for name in builtin_names(Plugin) + builtin_names(Filter):
        assert name in lines and len(lines[name].split()) > 2, name
    assert "a RAM disk." in lines["memory"]


# ---------------------------------------------------------------- the magic parameter

@pytest.mark.parametrize("server", BOTH)
def test_magic_parameter_anywhere(server, tmp_path):
    disk, logfile = tmp_path / "disk.img", tmp_path / "log"
    disk.write_bytes(b"x" * 4096)
    _, out, _ = serve(server, "-U", "-", "--filter=log", "file", f"logfile={logfile}", str(disk),
                      "--run", SIZE)
    assert out.strip() == "4096" and logfile.exists()
    _, out, _ = serve(server, "-U", "-", "data", "size=1M", "( 0x55 0xAA )*256", "--run",
                      'nbdinfo --size "$uri" && nbdcopy "$uri" - | head -c 4 | od -An -tx1')
    assert out.split() == [str(1 << 20), "55", "aa", "55", "aa"]


# ---------------------------------------------------------------- --dump-config, --dump-plugin

def test_dump_config_has_nbdkits_keys():
    ours = keys(serve("pynbd", "--dump-config")[1])
    theirs = keys(serve("nbdkit", "--dump-config")[1])
    assert set(theirs) <= set(ours)
    assert ours["name"] == "pynbd" and ours["version"].startswith(f"{ours['version_major']}.")


@pytest.mark.parametrize("plugin, feature", [("memory", "mlock"), ("data", "data_base64"),
                                             ("info", "info_address")])
def test_dump_plugin_has_nbdkits_keys(plugin, feature):
    ours = keys(serve("pynbd", "--dump-plugin", plugin)[1])
    theirs = keys(serve("nbdkit", "--dump-plugin", plugin)[1])
    for key in ("name", "api_version", "max_thread_model", "thread_model", "magic_config_key",
                "errno_is_preserved", feature):
        assert key in theirs and ours[key] == theirs[key], key
    assert {"has_thread_model", "max_known_status", "has_config_complete"} <= set(ours)


def test_dump_plugin_runs_the_configuration_first():
    assert "BEGIN AST" not in refused("pynbd", "--dump-plugin", "data", "raw=x", "foo=1")
    assert keys(serve("pynbd", "--dump-plugin", "memory", "1M")[1])["mlock"] == "yes"


@pytest.mark.parametrize("server", BOTH)
def test_dump_plugin_with_single_is_refused(server):
    refused(server, "-s", "--dump-plugin", "memory")


# ---------------------------------------------------------------- the options

def test_long_and_short_options_cover_nbdkits():
    for flag in ("--long-options", "--short-options"):
        ours = set(serve("pynbd", flag)[1].split())
        assert set(serve("nbdkit", flag)[1].split()) <= ours
        assert "--print-uri" in ours or flag == "--short-options"


@pytest.mark.parametrize("server", BOTH)
def test_version_short(server):
    assert serve(server, "-V")[1].startswith(server)


@pytest.mark.parametrize("server", BOTH)
def test_mask_handshake_zero_is_plain_newstyle(server):
    _, out, _ = serve(server, "--mask-handshake=0", "-U", "-", "memory", "1M", "--run", 'nbdinfo "$uri"')
    assert "protocol: newstyle without TLS" in out and "export-size: 1048576" in out


@pytest.mark.parametrize("server", BOTH)
def test_no_sr_means_simple_replies_and_no_block_status(server):
    _, out, _ = serve(server, "--no-sr", "-U", "-", "memory", "1M", "--run",
                      'nbdinfo "$uri"; nbdinfo --map "$uri" || echo no-map', check=False)
    assert "using simple packets" in out and "no-map" in out


def test_no_meta_contexts_keeps_structured_replies():
    _, out, _ = serve("pynbd", "--no-meta-contexts", "-U", "-", "memory", "1M", "--run",
                      'nbdinfo "$uri"; nbdinfo --map "$uri" || echo no-map', check=False)
    assert "using structured packets" in out and "no-map" in out


def test_print_uri():
    _, out, _ = serve("pynbd", "--print-uri", "-U", "-", "memory", "1M", "--run", SIZE)
    uri, size = out.split()
    assert uri.startswith("nbd+unix:///?socket=") and size == str(1 << 20)


@pytest.mark.parametrize("server", BOTH)
def test_user_group_swap_and_selinux_label_are_accepted(server):
    _, out, _ = serve(server, "-u", "root", "-g", "root", "--swap", "-U", "-", "memory", "1M",
                      "--run", SIZE)
    assert out.strip() == str(1 << 20)
    if server == "pynbd":  # Debian's nbdkit is built with SELinux and needs it enabled
        _, out, err = serve(server, "--selinux-label=system_u:object_r:svirt_t:s0", "-U", "-",
                            "memory", "1M", "--run", SIZE)
        assert out.strip() == str(1 << 20) and "SELinux is not enabled" in err


@pytest.mark.parametrize("server", BOTH)
def test_unknown_user_refused(server):
    args = ("-u", "no-such-user-xyz", "-U", "-", "memory", "1M", "--run", "true")
    if server == "pynbd":
        refused(server, *args)
    else:  # nbdkit's status here depends on whether --run's fork came first
        assert "not a valid user name" in serve(server, *args, check=False)[2]


@pytest.mark.parametrize("server", BOTH)
def test_debug_flag_data_ast(server):
    _, _, err = serve(server, "-v", "-D", "data.AST=1", "-U", "-", "data", "1 2 3", "--run", SIZE)
    assert "BEGIN AST" in err and "END AST" in err


def test_bad_debug_flag_refused():
    refused("pynbd", "-D", "data.AST", "memory", "1M")
    refused("pynbd", "-D", "data.AST=x", "memory", "1M")


@pytest.mark.parametrize("server", BOTH)
def test_single_with_script_on_stdin_refused(server):
    refused(server, "-s", "sh", "-")


@pytest.mark.parametrize("server", BOTH)
def test_oldstyle_and_vsock(server):
    if server == "pynbd":
        refused(server, "-o", "-U", "-", "memory", "1M", "--run", "true")
        refused(server, "--vsock", "memory", "1M", "--run", "true")


# ---------------------------------------------------------------- memory and data plugins

@pytest.mark.parametrize("server", BOTH)
def test_memory_malloc_mlock(server):
    script = ('nbdsh -u "$uri" -c '
              '"h.pwrite(b\\"x\\" * 8192, 0); h.zero(8192, 0); print(bytes(h.pread(2, 4096)))"')
    _, out, _ = serve(server, "-U", "-", "memory", "1M", "allocator=malloc,mlock=true", "--run", script)
    assert out.strip() == "b'\\x00\\x00'"
    refused(server, "-U", "-", "memory", "1M", "allocator=sparse,mlock=true", "--run", "true")


@pytest.mark.parametrize("server", BOTH)
def test_data_empty_slice_and_extra_keys(server):
    _, out, _ = serve(server, "-U", "-", "data", '"Hello"[99:99] 1', "--run", SIZE)
    assert out.strip() == "1"
    refused(server, "-U", "-", "data", '"Hello"[2:99]', "--run", "true")
    refused(server, "-U", "-", "data", "raw=abc", "foo=bar", "--run", "true")
    _, out, _ = serve(server, "-U", "-", "data", "$x $x", "x=7", "--run", SIZE)
    assert out.strip() == "2"


@pytest.mark.parametrize("server", BOTH)
def test_data_explicit_zero_bytes_are_allocated(server):
    _, out, _ = serve(server, "-U", "-", "data", "base64=" + "A" * 64, "size=100000",
                      "--run", 'nbdinfo --map "$uri"')
    assert [line.split() for line in out.splitlines()] == [["0", "32768", "2", "zero"],
                                                          ["32768", "67232", "3", "hole,zero"]]


# ---------------------------------------------------------------- request limits

@pytest.mark.parametrize("server", BOTH)
def test_64_mib_requests_accepted(server):
    code = 'h.pwrite(b"a" * (64 << 20), 0); print(h.pread(64 << 20, 0).count(b"a"))'
    _, out, _ = serve(server, "-U", "-", "memory", "65M", "--run", f'nbdsh -u "$uri" -c \'{code}\'')
    assert out.strip() == str(64 << 20)


@pytest.mark.parametrize("server", BOTH)
def test_emulated_cache_reads_in_nbdkits_chunks(server, tmp_path):
    logfile = tmp_path / "log"
    serve(server, "-U", "-", "--filter=nocache", "--filter=log", "memory", "16M", "cachemode=emulate",
          f"logfile={logfile}", "--run", 'nbdsh -u "$uri" -c "h.cache(8 << 20, 0)"')
    reads = [line for line in logfile.read_text().splitlines() if "Read id=" in line and "return" not in line]
    assert len(reads) == 1 and "count=0x800000" in reads[0]


# ---------------------------------------------------------------- script plugins' hooks

PY_PLUGIN = '''
API_VERSION = 2
def dump_plugin(): print("testplugin_feature=yes")
def open(readonly): return 1
def get_size(h): return 512
def pread(h, buf, offset, flags): buf[:] = bytes(len(buf))
def export_description(h): return "a python disk"
'''
SH_PLUGIN = '''#!/bin/sh
case "$1" in
  dump_plugin) echo sh_feature=yes ;;
  open) echo handle ;;
  get_size) echo 512 ;;
  pread) head -c $3 /dev/zero ;;
  export_description) echo "a shell disk" ;;
  default_export) [ -n "$NO_DEFAULT" ] || exit 2; echo "no default here" >&2; exit 1 ;;
  *) exit 2 ;;
esac
'''


@pytest.fixture
def scripts(tmp_path):
    py, sh = tmp_path / "plugin.py", tmp_path / "plugin.sh"
    py.write_text(PY_PLUGIN)
    sh.write_text(SH_PLUGIN)
    sh.chmod(0o755)
    return {"python": [str(py)], "sh": [str(sh)],
            "eval": ["dump_plugin=echo eval_feature=yes", "get_size=echo 512",
                     "pread=head -c $3 /dev/zero", "export_description=echo an eval disk"]}


@pytest.mark.parametrize("server", BOTH)
@pytest.mark.parametrize("plugin, line, description", [
    ("python", "testplugin_feature=yes", "a python disk"), ("sh", "sh_feature=yes", "a shell disk"),
    ("eval", "eval_feature=yes", "an eval disk")])
def test_script_dump_plugin_and_export_description(server, scripts, plugin, line, description):
    assert line in serve(server, "--dump-plugin", plugin, *scripts[plugin])[1].splitlines()
    _, out, _ = serve(server, "-U", "-", plugin, *scripts[plugin], "--run", 'nbdinfo "$uri"')
    assert f"description: {description}" in out


@pytest.mark.parametrize("server", BOTH)
def test_list_without_list_exports_and_a_failing_default_export_is_empty(server, scripts):
    result = run([*SERVERS[server], "-U", "-", "sh", *scripts["sh"], "--run",
                  'nbdinfo --list "$uri" && nbdinfo --size "nbd+unix:///x?socket=$unixsocket"'],
                 env={**os.environ, "NO_DEFAULT": "1"})
    out = result.stdout.decode()
    assert "protocol: newstyle-fixed" in out and "export=" not in out and out.split()[-1] == "512"


# ---------------------------------------------------------------- file plugin

def test_file_directory_lists_in_directory_order(tmp_path):
    for name in ("zz", "aa", "mm", "bb", "qq"):
        (tmp_path / name).write_bytes(bytes(1024))
    listed = {}
    for server in BOTH:
        _, out, _ = serve(server, "-U", "-", "file", f"directory={tmp_path}", "--run",
                          'nbdinfo --list --json "$uri"')
        listed[server] = [e["export-name"] for e in json.loads(out)["exports"]]
    assert listed["pynbd"] == listed["nbdkit"] and sorted(listed["pynbd"]) == ["aa", "bb", "mm", "qq", "zz"]
    refused("pynbd", "-U", "-", "file", f"dir={tmp_path}", f"directory={tmp_path}", "--run", "true")


# ---------------------------------------------------------------- log filter

def test_log_logscript(tmp_path):
    out = tmp_path / "out"
    script = f'echo "$type|$act|$connection|$id|$offset|$count|$return|$extents|$size" >> {out}'
    client = 'nbdinfo --map "$uri" >/dev/null; nbdsh -u "$uri" -c "h.pread(512, 0)"'
    seen = {}
    for server in BOTH:
        serve(server, "-U", "-", "--filter=log", "memory", "1M", f"logscript={script}", "--run", client)
        seen[server] = sorted(line for line in out.read_text().splitlines()
                              if "connect|" not in line.lower())  # nbdkit adds Preconnect
        out.unlink()
    assert seen["pynbd"] == seen["nbdkit"]
    assert "ENTER|Read|2|1|0x0|0x200|||" in seen["pynbd"]


# ---------------------------------------------------------------- delay filter

READ_ONCE = 'nbdsh -u "$uri" -c "h.pread(512, 0)"'


@pytest.mark.parametrize("server", BOTH)
def test_delay_ends_when_the_client_disconnects(server):
    start = time.monotonic()
    _, out, _ = serve(server, "-U", "-", "--filter=delay", "memory", "1M", "rdelay=30",
                      "--run", f"timeout 1 {READ_ONCE}; echo $?")
    assert out.strip() == "124" and time.monotonic() - start < 10


@pytest.mark.parametrize("server", BOTH)
def test_delay_ends_when_the_server_shuts_down(server):
    with served("--filter=delay", "memory", "1M", "rdelay=30", server=server) as srv:
        client = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c", "h.pread(512, 0)"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=10)
        assert time.monotonic() - start < 10
        client.wait(timeout=10)


# ---------------------------------------------------------------- retry filter

FLAKY_SH = '''#!/bin/bash
# the first open fails reads and writes; later opens are smaller and read-only
n=$(cat $tmpdir/opens 2>/dev/null || echo 0)
case "$1" in
  open) echo $((n + 1)) > $tmpdir/opens; echo h ;;
  get_size) if [ "$n" -le 1 ]; then echo 1M; else echo 512K; fi ;;
  can_write) [ "$n" -le 1 ] && exit 0 || exit 3 ;;
  pread) if [ "$n" -le 1 ]; then echo EIO first open >&2; exit 1; fi; head -c $3 /dev/zero ;;
  pwrite) cat >/dev/null; if [ "$n" -le 1 ]; then echo EIO first open >&2; exit 1; fi ;;
  *) exit 2 ;;
esac
'''


@pytest.mark.parametrize("server", BOTH)
def test_retry_checks_the_reopened_connection(server, tmp_path):
    script = tmp_path / "flaky.sh"
    script.write_text(FLAKY_SH)
    script.chmod(0o755)
    outcomes = []
    write = "h.pwrite(bytes(512), 0)"
    for op, options in (("h.pread(512, 786432)", ("retries=1",)), (write, ("retries=1",)),
                        (write, ("retries=3", "retry-readonly=true"))):
        start = time.monotonic()
        _, out, _ = serve(server, "-U", "-", "--filter=retry", "sh", str(script), "retry-delay=1",
                          *options, "--run", f'nbdsh -u "$uri" -c "{op}" 2>&1 || true')
        outcomes.append((out.strip().splitlines() or ["ok"])[-1].split(": ")[-1])
        assert time.monotonic() - start < 5  # a read-only reopen is not retried 3 times (1+2+4 s)
    assert outcomes == ["Input/output error", "Operation not permitted", "Operation not permitted"]


# ---------------------------------------------------------------- readahead filter

READS = """
import time
for offset, count in [(0, 4096), (4096, 4096), (8192, 65536), (1 << 20, 512), (3 << 20, 512),
                      (5 << 20, 512), (7 << 20, 512), (1 << 20, 512), (0x100200, 512), (0, 512)]:
    h.pread(count, offset)
    time.sleep(0.05)
"""


def test_readahead_window_policy(tmp_path):
    logfile, reads = tmp_path / "log", tmp_path / "reads.py"
    reads.write_text(READS)
    caches = {}
    for server in BOTH:
        serve(server, "-U", "-", "--filter=readahead", "--filter=log", "memory", "16M",
              f"logfile={logfile}", "--run", f'nbdsh -u "$uri" -c "exec(open(\'{reads}\').read())"')
        caches[server] = sorted(re.findall(r" Cache id=\d+ (offset=\S+ count=\S+)", logfile.read_text()))
    assert caches["pynbd"] == caches["nbdkit"] and len(caches["pynbd"]) == 10


# ---------------------------------------------------------------- blocksize filter

EXTENTS = "echo 0 512 3; echo 512 512 0; echo 1024 7168 3; echo 8192 4096 1; echo 12288 4096 3"
PARALLEL_WRITES = """
import time
start = time.monotonic()
for _ in range(4):
    h.aio_pwrite(bytes(4096), 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(round(time.monotonic() - start))
"""


@pytest.mark.parametrize("server", BOTH)
def test_blocksize_preferred_size_and_aligned_extents(server):
    _, out, _ = serve(server, "-U", "-", "--filter=blocksize", "eval", "get_size=echo 16384",
                      "pread=head -c $3 /dev/zero", "can_extents=exit 0", f"extents={EXTENTS}",
                      "block_size=echo 1 65536 1M", "minblock=4096",
                      "--run", 'nbdinfo --map "$uri"; nbdinfo --json "$uri"')
    lines = out.splitlines()
    assert [line.split() for line in lines[:4]] == [
        ["0", "4096", "0", "data"], ["4096", "4096", "3", "hole,zero"], ["8192", "4096", "1", "hole"],
        ["12288", "4096", "3", "hole,zero"]]
    assert json.loads("\n".join(lines[4:]))["exports"][0]["block_size_preferred"] == 65536


@pytest.mark.parametrize("server", BOTH)
def test_blocksize_aligned_writes_run_in_parallel(server, tmp_path):
    script = tmp_path / "writes.py"
    script.write_text(PARALLEL_WRITES)
    _, out, _ = serve(server, "-U", "-", "--filter=blocksize", "--filter=delay", "memory", "1M",
                      "minblock=4096", "wdelay=1", "--run",
                      f'nbdsh -u "$uri" -c "exec(open(\'{script}\').read())"')
    assert out.strip() == "1"  # four writes of the same block at once, not one after another


@pytest.mark.parametrize("server", BOTH)
def test_debug_flag_backend_datapath(server):
    counts = []
    for flags in ((), ("-D", "nbdkit.backend.datapath=0")):
        _, _, err = serve(server, "-v", *flags, "-U", "-", "memory", "1M", "--run", READ_ONCE)
        counts.append(err.count("pread count="))
    assert counts[0] > 0 and counts[1] == 0


@pytest.mark.parametrize("server", BOTH)
def test_failing_export_description_is_left_out(server, tmp_path):
    script = tmp_path / "plugin.py"
    script.write_text(PY_PLUGIN.replace('return "a python disk"', 'raise RuntimeError("no description")'))
    _, out, _ = serve(server, "-U", "-", "python", str(script), "--run", 'nbdinfo "$uri"')
    assert "export-size: 512" in out and "description:" not in out
