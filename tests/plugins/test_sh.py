"""The sh plugin: nbdkit-sh-plugin(3) scripts under pynbd, compared with nbdkit."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

from nbdtest import SERVE, nbdsh, run, served

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
DISK = os.path.join(SCRIPTS, "disk.sh")
FEATURES = os.path.join(SCRIPTS, "features.sh")
SERVERS = ("pynbd", "nbdkit")
PROBE = """
import errno
def attempt(f):
    try:
        r = f()
        return "ok" if r is None else bytes(r)[:6].decode()
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print(attempt(lambda: h.pread(512, 0)), attempt(lambda: h.pread(512, 131072)),
      attempt(lambda: h.pread(512, 262144)), attempt(lambda: h.pread(512, 524288)),
      attempt(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)),
      attempt(lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)),
      attempt(lambda: h.zero(512, 0)), attempt(lambda: h.trim(512, 0)),
      attempt(lambda: h.flush()), attempt(lambda: h.cache(512, 0)), attempt(lambda: h.pread(512, 512)))
"""


def on(server: str, *args: str, run_cmd: str, **kw) -> subprocess.CompletedProcess:
    base = SERVE if server == "pynbd" else ["nbdkit"]
    return run([*base, "-f", "-U", "-", *args, "--run", run_cmd], timeout=100, **kw)


def refused(*args: str) -> str:
    result = run([*SERVE, "-f", "-U", "-", *args, "--run", "true"], check=False, timeout=60)
    assert result.returncode == 1, result
    return result.stderr.decode().strip().splitlines()[-1]


def test_ten_line_shell_disk_with_qemu_img_and_nbdcopy(tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(1 << 20))
    copies = {}
    for server in SERVERS:
        out = tmp_path / f"{server}.img"
        result = on(server, "sh", DISK, "4M", run_cmd=(
            f'qemu-img convert -n -f raw -O raw {source} "$uri" && '
            f'qemu-io -f raw -c "write -z 3M 64k" "$uri" >/dev/null && '
            f'nbdcopy "$uri" {out} && qemu-img info --output=json "$uri"'))
        assert json.loads(result.stdout)["virtual-size"] == 4 << 20
        copies[server] = out.read_bytes()
    expected = source.read_bytes() + bytes(1 << 20)
    assert copies["pynbd"] == expected == copies["nbdkit"]


def test_methods_flags_extents_and_errors_match_nbdkit():
    seen = {}
    for server in SERVERS:
        with served("sh", FEATURES, server=server) as srv:
            export = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
            export.pop("uri")
            listing = run(["nbdinfo", "--list", srv.uri]).stdout.decode()
            seen[server] = (export,
                            [line for line in listing.splitlines() if "uri:" not in line],
                            run(["nbdinfo", "--map", srv.uri]).stdout.decode(),
                            nbdsh(srv.uri, PROBE).split())
    assert seen["pynbd"] == seen["nbdkit"]
    export, listing, extents, answers = seen["pynbd"]
    assert export["export-name"] == "one" and export["block_size_maximum"] == 65536
    assert export["can_fua"] and export["can_cache"] and export["is_rotational"]
    assert "\tdescription: second export" in listing
    assert extents.split()[:8] == ["0", "65536", "0", "data", "65536", "65536", "3", "hole,zero"]
    # too few bytes → EIO, bare failure → EIO, "ENOSPC ..." → ENOSPC, fast zero with
    # can_zero false → ENOTSUP, the connection still works afterwards
    assert answers == ["oneone", "EIO", "EIO", "ENOSPC", "ok", "ENOTSUP", "ok", "ok", "ok",
                       "ok", "oneone"]


RECORDER = """\
    #!/bin/sh
    echo "$tmpdir $*" >> "${RECORD:-/dev/null}"
    case "$1" in
      magic_config_key) echo size ;;
      config) [ "$2" = size ] || exit 1; echo "$3" > "$tmpdir/size" ;;
      get_size) cat "$tmpdir/size" ;;
      can_write|can_zero) exit 0 ;;
      can_fua) echo native ;;
      pread) head -c "$3" /dev/zero ;;
      pwrite|zero) cat > /dev/null ;;
      *) exit 2 ;;
    esac
"""


def test_every_call_sees_the_same_tmpdir_and_nbdkit_arguments(tmp_path):
    script = tmp_path / "recorder.sh"
    script.write_text(textwrap.dedent(RECORDER))
    script.chmod(0o755)
    record = tmp_path / "calls"
    probe = ("h.pwrite(b'x' * 512, 1024, nbd.CMD_FLAG_FUA); "
             "h.zero(512, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE); h.zero(512, 0)")
    on("pynbd", "sh", str(script), "64k", run_cmd=f'nbdsh -u "$uri" -c "{probe}"',
       env={**os.environ, "RECORD": str(record)})
    lines = [line.split(" ", 1) for line in record.read_text().splitlines()]
    tmpdirs = {tmpdir for tmpdir, _ in lines}
    calls = [call for _, call in lines]
    assert len(tmpdirs) == 1 and not os.path.exists(tmpdirs.pop())  # shared, then removed
    assert calls[:4] == ["load", "magic_config_key", "config size 64k", "config_complete"]
    assert "open false  false" in calls and "get_size " in calls
    assert "pwrite  512 1024 fua" in calls
    assert "zero  512 0 fua" in calls and "zero  512 0 may_trim" in calls
    assert calls.index("close ") < calls.index("unload")


def test_inline_script_on_stdin():
    inline = b'case "$1" in get_size) echo 4096 ;; pread) head -c "$3" /dev/zero | tr "\\0" z ;;' \
             b' *) exit 2 ;; esac\n'
    result = run([*SERVE, "-f", "-U", "-", "sh", "-", "--run",
                  'nbdsh -u "$uri" -c "print(bytes(h.pread(3, 0)))"'], input=inline, timeout=60)
    assert result.stdout.decode().strip() == "b'zzz'"


def test_a_hanging_method_is_killed_at_timeout_and_others_are_served():
    with served("sh", FEATURES, "timeout=2") as srv:
        hung = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c", PROBE.split("print(")[0] +
                                 "print(attempt(lambda: h.pread(512, 786432)))"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert nbdsh(srv.uri, "print(bytes(h.pread(512, 0))[:6])").strip() == "b'oneone'"
            out, _ = hung.communicate(timeout=40)  # the script would sleep 60 s
        finally:
            hung.kill()
        assert out.decode().strip() == "EIO"
        assert nbdsh(srv.uri, "print(bytes(h.pread(512, 0))[:3])").strip() == "b'one'"
        srv.proc.terminate()
        srv.proc.wait(10)
        assert "killed after 2s" in srv.stderr()


def test_bad_scripts_are_refused(tmp_path):
    assert "does not exist" in refused("sh", str(tmp_path / "nope.sh"))
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\nexit 2\n")
    plain.chmod(0o644)
    assert "is not executable (try: chmod +x" in refused("sh", str(plain))
    plain.chmod(0o755)
    assert "no config method" in refused("sh", str(plain), "size=1M")
    assert "has no magic_config_key" in refused("sh", str(plain), "disk.img")
    failing = tmp_path / "failing.sh"
    failing.write_text('#!/bin/sh\n[ "$1" = config_complete ] && { echo "EINVAL need a size" >&2;'
                       ' exit 1; }\nexit 2\n')
    failing.chmod(0o755)
    assert "config_complete: need a size" in refused("sh", str(failing))


def test_missing_get_size_fails_the_client_not_the_server(tmp_path):
    script = tmp_path / "nosize.sh"
    script.write_text('#!/bin/sh\ncase "$1" in pread) head -c "$3" /dev/zero ;; *) exit 2 ;; esac\n')
    script.chmod(0o755)
    with served("sh", str(script)) as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        assert srv.proc.poll() is None


COUNTER = r"""#!/bin/sh
# One line per call ("METHOD HANDLE"); each open gets its own handle.
echo "$1 $2" >> "$RECORD"
case "$1" in
  open) n=$(( $(cat "$tmpdir/opens" 2>/dev/null || echo 0) + 1 ))
        echo "$n" > "$tmpdir/opens"; echo "conn$n" ;;
  get_size) echo 1M ;;
  can_write|can_flush|can_trim|can_zero|can_extents) exit 0 ;;
  pread) head -c "$3" /dev/zero ;;
  pwrite) cat > /dev/null ;;
  zero|trim|flush) ;;
  extents) echo "$4 $3 hole,zero" ;;
  *) exit 2 ;;
esac
"""


def test_each_question_runs_the_script_once_per_connection(tmp_path):
    # The filters and the server ask the layer below its size and what it can
    # do again and again; the layer boundary asks the script once per connection.
    script = tmp_path / "counter.sh"
    script.write_text(COUNTER)
    script.chmod(0o755)
    record = tmp_path / "calls"
    io = ("h.pread(4096, 0); h.pwrite(b'x' * 4096, 8192, nbd.CMD_FLAG_FUA); h.zero(4096, 0); "
          "h.trim(4096, 4096); h.flush(); h.block_status(65536, 0, lambda *a: 0); "
          "print(h.get_size(), h.can_zero(), h.can_fua())")
    with served("--filter=offset", "--filter=truncate", "--filter=blocksize", "--filter=log",
                "sh", str(script), f"logfile={tmp_path / 'log'}",
                env={**os.environ, "RECORD": str(record)}) as srv:
        for _ in range(2):
            code = f"h.add_meta_context('base:allocation'); h.connect_uri('{srv.uri}'); {io}"
            out = run(["nbdsh", "-c", code]).stdout.decode()
            assert out.split() == [str(1 << 20), "True", "True"]
    calls = record.read_text().splitlines()
    assert calls.count("open false") == 2
    for handle in ("conn1", "conn2"):
        for method in ("get_size", "block_size", "can_write", "can_flush", "can_trim", "can_zero",
                       "can_fast_zero", "can_fua", "can_multi_conn", "can_cache", "can_extents",
                       "is_rotational"):
            assert calls.count(f"{method} {handle}") == 1, (method, handle, calls)
        assert f"pwrite {handle}" in calls and f"close {handle}" in calls
