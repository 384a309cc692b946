"""Suite-wide setup, and the file systems tests need.

libnbd's ``nbdsh`` runs ``python3 -m nbd``, and Debian installs the ``nbd``
module for the system interpreter (/usr/bin/python3) only. When the tests run
under another interpreter (a venv, pyenv) an ``nbdsh`` shim on PATH makes
nbdsh — in tests and in ``--run`` commands alike — use the system one.
"""

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session", autouse=True)
def nbdsh_uses_system_python(tmp_path_factory):
    shims = tmp_path_factory.mktemp("shims")
    shim = shims / "nbdsh"
    shim.write_text(f'#!/bin/sh\nexec {SYSTEM_PYTHON} -m nbd "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{shims}{os.pathsep}{old}"
    yield
    os.environ["PATH"] = old


def mounted(tmp_path: Path, name: str, *mount_args: str) -> Iterator[Path]:
    """Mount a file system on ``tmp_path/name`` for one test (skip where mount is refused)."""
    point = tmp_path / name
    point.mkdir()
    result = subprocess.run(["mount", *mount_args, str(point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount {name}: {result.stderr.decode().strip()}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs: a real file system without fallocate (no holes, no ZERO_RANGE)."""
    yield from mounted(tmp_path, "ramfs", "-t", "ramfs", "ramfs")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: holes but no ZERO_RANGE, and soon full."""
    yield from mounted(tmp_path, "tmpfs", "-t", "tmpfs", "-o", "size=1m", "tmpfs")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on /dev/shm (tmpfs: no ZERO_RANGE) without mounting anything."""
    if subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"],
                      capture_output=True).stdout.strip() != b"tmpfs":
        pytest.skip("/dev/shm is not tmpfs")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="pynbd-test"))
    try:
        yield path
    finally:
        shutil.rmtree(path)
