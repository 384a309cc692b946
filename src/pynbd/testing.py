"""pytest plugin shipped with pynbd: an NBD disk for a test in one line.

Installing pynbd registers this module with pytest (entry point ``pytest11``),
so any project's tests can ask for the ``nbd_server`` fixture::

    def test_my_backup_tool(nbd_server):
        uri = nbd_server("memory", "64M")                     # nbd+unix:///?socket=...
        subprocess.run(["my-backup", uri], check=True)

    def test_flaky_disk(nbd_server):
        uri = nbd_server("memory", "1G", filters=["delay"], rdelay="10ms")

    def test_with_my_plugin(nbd_server, tmp_path):
        uri = nbd_server("tests/data/plugin.py", size="1M")   # nbdkit-style or native
        uri = nbd_server("sh", "./disk.sh", "64M", readonly=True)

``nbd_server(plugin, *args, filters=[...], readonly=False, subprocess=False,
**params)`` starts a server and returns its URI. ``args`` are command-line
words as after ``pynbd serve PLUGIN`` (the magic parameter, ``key=value``);
``params`` are more ``key=value`` parameters (``_`` in a keyword stands for
``-`` unless a layer declares it with ``_``). The server runs in the test's
process on a private Unix socket; ``subprocess=True`` runs ``pynbd serve``
as a child process instead (use it for plugins that call
``nbdkit.shutdown()`` or must not share the test's process). Every server a
test started is stopped, and its socket removed, when the test ends, pass or
fail. A configuration mistake raises ``pynbd.backend.ConfigError`` at once.

``nbd_server.servers`` lists the running ``ServedStack`` objects of the test
(``.uri``, ``.socket``, ``.pid``), most recent last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest


class NbdServerFactory:
    """The ``nbd_server`` fixture's value: call it to start a server."""

    def __init__(self) -> None:
        self.servers: list[Any] = []

    def __call__(self, plugin: str, *args: str, filters: Sequence[str] = (),
                 readonly: bool = False, subprocess: bool = False, **params: Any) -> str:
        import pynbd

        served = pynbd.serve(plugin, *args, filters=list(filters), readonly=readonly,
                             subprocess=subprocess, **params)
        served.__enter__()
        self.servers.append(served)
        return served.uri

    def close(self) -> None:
        """Stop every server, the most recent first."""
        while self.servers:
            self.servers.pop().close()


@pytest.fixture
def nbd_server() -> Iterator[NbdServerFactory]:
    """Start NBD servers for this test: ``uri = nbd_server("memory", "1M")``."""
    factory = NbdServerFactory()
    try:
        yield factory
    finally:
        factory.close()
