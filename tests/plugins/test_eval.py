"""The eval plugin: nbdkit-eval-plugin(1) command lines under pynbd, compared with nbdkit."""

from __future__ import annotations

import json
import os

from nbdtest import SERVE, run

SERVERS = ("pynbd", "nbdkit")
FILE_DISK = (
    'config=ln -sf "$(realpath "$3")" $tmpdir/file',
    "get_size=stat -Lc %s $tmpdir/file",
    "pread=dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none",
    "pwrite=dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes status=none",
)


def on(server: str, *args: str, run_cmd: str, cwd: str | None = None) -> str:
    base = SERVE if server == "pynbd" else ["nbdkit"]
    command = [*base, "-f", "-U", "-", *args, "--run", run_cmd]
    result = run(["sh", "-c", 'cd "$0" && exec "$@"', cwd or ".", *command], timeout=100)
    return result.stdout.decode()


def test_zero_disk_from_the_manual():
    outputs = {server: on(server, "eval", "get_size= echo 64M ",
                          "pread= dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                          run_cmd='nbdinfo --json "$uri"') for server in SERVERS}
    exports = {server: json.loads(text)["exports"][0] for server, text in outputs.items()}
    for export in exports.values():
        export.pop("uri")
        for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
            export.pop(key, None)  # pynbd always states block sizes
    assert exports["pynbd"] == exports["nbdkit"]
    assert exports["pynbd"]["export-size"] == 64 << 20 and exports["pynbd"]["is_read_only"]


def test_file_disk_from_the_manual_and_implied_can_write(tmp_path):
    results = {}
    for server in SERVERS:
        image = tmp_path / f"{server}.img"
        image.write_bytes(bytes(1 << 20))
        out = on(server, "eval", *FILE_DISK, f"file={image.name}", cwd=str(tmp_path), run_cmd=(
            'qemu-io -f raw -c "write -P 0x33 8k 24k" "$uri" >/dev/null && '
            'nbdinfo --json "$uri"'))
        results[server] = (json.loads(out)["exports"][0]["is_read_only"], image.read_bytes())
    assert results["pynbd"] == results["nbdkit"]
    read_only, data = results["pynbd"]
    assert not read_only  # pwrite given, can_write left out
    assert data[8192:32768] == b"\x33" * 24576 and data[:8192] == bytes(8192)


def test_missing_snippet_and_unknown_keys():
    missing = on("pynbd", "eval", "get_size=echo 4k", "missing=exit 2",
                 "pread=head -c $3 /dev/zero", "can_flush=exit 0",
                 run_cmd='nbdinfo --json "$uri"')
    assert json.loads(missing)["exports"][0]["can_flush"]
    result = run([*SERVE, "-f", "-U", "-", "eval", "get_size=echo 4k", "colour=red",
                  "--run", "true"], check=False)
    assert result.returncode == 1
    assert "no config method" in result.stderr.decode()
    result = run([*SERVE, "-f", "-U", "-", "eval", "get_size=echo 4k", "get_size=echo 8k",
                  "--run", "true"], check=False)
    assert "given more than once" in result.stderr.decode()


def test_config_snippet_receives_user_keys(tmp_path):
    seen = tmp_path / "seen"
    on("pynbd", "eval", f"config=echo \"$2=$3\" >> {seen}", "get_size=echo 512",
       "pread=head -c $3 /dev/zero", "colour=red", "colour=blue", run_cmd="true")
    assert seen.read_text().splitlines() == ["colour=red", "colour=blue"]
    assert os.path.getsize(seen) > 0
