"""tmpdisk plugin: a fresh file system per client, checked with e2fsprogs and against nbdkit's tmpdisk."""

from __future__ import annotations

import os
import re

import pytest
from plugin_helpers import config_error, export_info

from filters.stack_helpers import BOTH
from nbdtest import SERVE, exited, nbdsh, run, served, wait_for
from pynbd.client import NBD

SIZE = 32 << 20


@pytest.fixture
def tmpdir_env(tmp_path):
    """An environment whose TMPDIR is a fresh directory (where the disks go)."""
    disks = tmp_path / "disks"
    disks.mkdir()
    return disks, {**os.environ, "TMPDIR": str(disks)}


def copy_out(uri: str, path) -> str:
    run(["nbdcopy", uri, str(path)])
    return str(path)


def ext_summary(image: str) -> dict[str, str]:
    """dumpe2fs -h fields that do not change from one mkfs to the next."""
    out = run(["dumpe2fs", "-h", image]).stdout.decode()
    fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", out, re.M))
    return {k: fields[k] for k in ("Filesystem volume name", "Block count", "Block size",
                                   "Inode count", "Filesystem features")}


def test_ext4_with_a_label_matches_nbdkit(tmp_path, tmpdir_env):
    _, env = tmpdir_env
    seen = []
    for server in BOTH:
        with served("tmpdisk", str(SIZE), "label=scratch", server=server, env=env) as srv:
            assert export_info(srv.uri)["export-size"] == SIZE
            image = copy_out(srv.uri, tmp_path / f"{server}.img")
        run(["e2fsck", "-fn", image])
        seen.append(ext_summary(image))
    assert seen[0] == seen[1]
    assert seen[0]["Filesystem volume name"] == "scratch"


def test_each_client_its_own_disk_deleted_on_disconnect(tmpdir_env):
    disks, env = tmpdir_env
    with served("tmpdisk", str(SIZE), env=env) as srv:
        pid = srv.proc.pid

        def open_disks() -> dict[str, str]:
            """/proc/PID/fd/N → what it is, for the server's files under TMPDIR."""
            out = {}
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = f"/proc/{pid}/fd/{fd}"
                try:
                    target = os.readlink(link)
                except FileNotFoundError:
                    continue
                if target.startswith(str(disks)):
                    out[link] = target
            return out

        with NBD() as a, NBD() as b:
            a.connect_uri(srv.uri)
            b.connect_uri(srv.uri)
            assert not a.can_multi_conn()
            pristine = a.pread(4096, 1024)  # the ext4 superblock
            a.pwrite(b"A" * 4096, 1024)
            b.pwrite(b"B" * 4096, 1024)
            assert a.pread(4096, 1024) == b"A" * 4096 and b.pread(4096, 1024) == b"B" * 4096
            assert os.listdir(disks) == []  # unlinked as soon as open
            held = open_disks()
            assert len(held) == 2 and all(t.endswith("(deleted)") for t in held.values())
            assert all(os.stat(link).st_blocks * 512 < SIZE // 4 for link in held)  # sparse
        wait_for(lambda: open_disks() == {}, message=lambda: f"still open: {open_disks()}")
        with NBD() as c:
            c.connect_uri(srv.uri)
            assert c.pread(4096, 1024)[:44] == pristine[:44]  # a new file system (44: s_mtime)
    assert exited(pid)


def test_command_with_variables(tmp_path, tmpdir_env):
    _, env = tmpdir_env
    skel = tmp_path / "skel"
    skel.mkdir()
    (skel / "hello.txt").write_text("hello from tmpdisk\n")
    command = 'truncate -s $size "$disk" && mke2fs -q -F -t $type -L "$label" -d "$skel" "$disk"'
    with served("tmpdisk", "16M", "type=ext2", "label=pre", f"skel={skel}", f"command={command}",
                env=env) as srv:
        image = copy_out(srv.uri, tmp_path / "out.img")
    assert run(["debugfs", "-R", "cat /hello.txt", image]).stdout == b"hello from tmpdisk\n"
    assert ext_summary(image)["Filesystem volume name"] == "pre"
    with served("tmpdisk", "size=0", f"base={image}", 'command=cp --sparse=always "$base" "$disk"',
                env=env) as srv:
        assert export_info(srv.uri)["export-size"] == 16 << 20  # the command's size, not size=


def test_failing_command_refuses_only_that_client(tmp_path, tmpdir_env):
    disks, env = tmpdir_env
    flag = tmp_path / "flag"
    command = f'[ -e {flag} ] || {{ echo "no flag here" >&2; exit 7; }}; truncate -s $size "$disk"'
    with served("tmpdisk", "1M", f"command={command}", env=env) as srv:
        result = run(["nbdinfo", srv.uri], check=False)
        assert result.returncode != 0
        flag.touch()
        assert nbdsh(srv.uri, "print(h.get_size())").strip() == str(1 << 20)
        assert os.listdir(disks) == []
    log = srv.stderr()
    assert "command failed with exit status 7: no flag here" in log and "Traceback" not in log


def test_unknown_file_system_is_logged(tmpdir_env):
    _, env = tmpdir_env
    with served("tmpdisk", "1M", "type=nosuchfs", env=env) as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
    assert "mkfs -t nosuchfs failed" in srv.stderr()


def test_read_only_clients_get_a_formatted_disk(tmpdir_env):
    _, env = tmpdir_env
    with served("tmpdisk", str(SIZE), env=env, options=["-r"]) as srv:
        assert export_info(srv.uri)["is_read_only"] is True
        assert nbdsh(srv.uri, "print(h.pread(2, 1024 + 56).hex())").strip() == "53ef"  # ext magic


@pytest.mark.parametrize("args, message", [
    (["1M", "foo=bar"], "unknown parameter 'foo'"),
    (["1M", "disk=x", "command=true"], "disk: not a parameter"),
    (["1M", "bad-name=x", "command=true"], "bad-name: not a parameter"),
    (["1M", "open=x", "command=true"], "open: a name the plugin uses itself"),
    ([], "missing required parameter 'size'"),
])
def test_bad_parameters(args, message):
    assert message in config_error("tmpdisk", *args)


def test_missing_tmpdir_is_refused_at_start(tmp_path):
    result = run([*SERVE, "-f", "-U", str(tmp_path / "s"), "tmpdisk", "1M"], check=False,
                 env={**os.environ, "TMPDIR": str(tmp_path / "nope")})
    assert result.returncode == 1 and "does not exist (set TMPDIR)" in result.stderr.decode()
