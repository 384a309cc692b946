"""Helpers shared by the plugin tests: peers' views of an export.

    from plugin_helpers import extent_map, export_info, qemu_io, config_error, nbd_script

``extent_map`` and ``export_info`` are what nbdinfo reports, ``qemu_io`` runs
qemu-io commands on a URI or a local file, ``nbd_script`` runs Python with
libnbd's ``nbd`` module (only /usr/bin/python3 has it), and ``config_error``
runs ``pynbd serve`` expecting a one-line command-line error.
"""

from __future__ import annotations

import json
import os
import tempfile

from nbdtest import SERVE, run

SYSTEM_PYTHON = "/usr/bin/python3"


def extent_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) rows of ``nbdinfo --map``."""
    rows = []
    for line in run(["nbdinfo", "--map", uri]).stdout.decode().splitlines():
        offset, length, kind = line.split()[:3]
        rows.append((int(offset), int(length), int(kind)))
    return rows


def kind_at(rows: list[tuple[int, int, int]], offset: int) -> int:
    """The extent type (0 data, 3 hole) covering ``offset`` in an ``extent_map``."""
    return next(kind for start, length, kind in rows if start <= offset < start + length)


def zero_runs(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, bool]]:
    """An ``extent_map`` reduced to what reads as zeroes: (offset, length, zero), merged."""
    runs: list[tuple[int, int, bool]] = []
    for offset, length, kind in rows:
        zero = bool(kind & 2)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, zero)
        else:
            runs.append((offset, length, zero))
    return runs


def export_info(uri: str) -> dict:
    """The first export of ``nbdinfo --json``."""
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]


def qemu_io(target: str, *commands: str) -> str:
    """Run qemu-io commands on a raw image (NBD URI or file); its stdout."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = run([*args, target])
    out, err = result.stdout.decode(), result.stderr.decode()
    assert "failed" not in (out + err).lower(), out + err
    return out


def nbd_script(code: str, *argv: str) -> str:
    """Run ``code`` under the system Python with ``nbd`` and ``sys`` imported; its stdout."""
    return run([SYSTEM_PYTHON, "-c", "import nbd, sys, errno, time\n" + code, *argv]).stdout.decode()


def config_error(*args: str) -> str:
    """Run ``pynbd serve ARGS`` expecting exit 1 with one line on stderr; that line."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run([*SERVE, "-f", "-U", os.path.join(tmp, "sock"), *args], check=False, timeout=30)
    err = result.stderr.decode()
    assert result.returncode == 1, f"exit {result.returncode}: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]
