"""The two faces of the client handle are one API: generated from one source, same signatures."""

import inspect
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from pynbd.client import aio, common, sync

ROOT = Path(__file__).resolve().parents[2]
UNASYNC = ROOT / "scripts" / "unasync.py"

# Methods of the faces that never wait for the server, so the asyncio face has them plain too.
NO_IO = {"in_flight", "stream"}


def test_blocking_face_is_generated_from_the_asyncio_face():
    done = subprocess.run([sys.executable, str(UNASYNC), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_unasync_check_catches_a_drift(tmp_path):
    script = runpy.run_path(str(UNASYNC))
    source = "async def f(h: AsyncNBD) -> None:\n    async with h._lock:\n        await h.pread(1, 0)\n"
    assert script["unasync"](source, "x.py").splitlines()[2:] == [
        "def f(h: NBD) -> None:", "    with h._lock:", "        h.pread(1, 0)"]
    client = tmp_path / "src" / "pynbd" / "client"
    client.mkdir(parents=True)
    (client / "aio.py").write_text(source)
    (client / "blocking.py").write_text(script["unasync"](source, "aio.py").replace("1, 0", "2, 0"))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "unasync.py").write_text(UNASYNC.read_text())
    done = subprocess.run([sys.executable, str(tmp_path / "scripts" / "unasync.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "out of date" in done.stderr and "+        h.pread(1, 0)" in done.stdout


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_both_faces_have_the_same_public_names():
    assert public(sync.NBD) == public(aio.AsyncNBD)
    assert "block_status" in public(sync.NBD) and "opt_list" in public(sync.NBD)


@pytest.mark.parametrize("name", sorted(public(sync.NBD)))
def test_same_signature_async_where_the_blocking_one_waits(name):
    blocking, asynchronous = getattr(sync.NBD, name), getattr(aio.AsyncNBD, name)
    if blocking is asynchronous:  # shared from HandleBase: settings and facts, no I/O
        assert hasattr(common.HandleBase, name)
        return
    assert not inspect.iscoroutinefunction(blocking)
    assert inspect.iscoroutinefunction(asynchronous) == (name not in NO_IO)
    assert str(inspect.signature(blocking)) == unasync_text(str(inspect.signature(asynchronous)))


def test_connect_and_context_managers_match():
    assert inspect.iscoroutinefunction(aio.connect) and not inspect.iscoroutinefunction(sync.connect)
    assert str(inspect.signature(sync.connect)) == unasync_text(str(inspect.signature(aio.connect)))
    assert hasattr(aio.AsyncNBD, "__aenter__") and hasattr(aio.AsyncNBD, "__aexit__")
    assert hasattr(sync.NBD, "__enter__") and hasattr(sync.NBD, "__exit__")


def unasync_text(text: str) -> str:
    return re.sub(r"\bAsync(?=[A-Z])", "", text)
