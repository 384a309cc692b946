"""pynbd: a Network Block Device toolkit in Python.

A pluggable NBD server (``pynbd serve``), a client library, and the tools
built on them. Embed a server in a program or a test::

    import pynbd
    with pynbd.serve("memory", size="1G", filters=["delay"], rdelay="10ms") as srv:
        print(srv.uri)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .server.embed import ServedStack


def serve(plugin: str, *args: str, filters: tuple[str, ...] | list[str] = (),
          subprocess: bool = False, readonly: bool = False, **params: Any) -> ServedStack:
    """Serve a stack and yield its URI; see ``pynbd.server.embed.serve``."""
    from .server.embed import serve as _serve
    return _serve(plugin, *args, filters=filters, subprocess=subprocess, readonly=readonly,
                  **params)
