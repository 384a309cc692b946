"""Base classes for plugins (data sources) and filters (layers over them).

A plugin is configured once from its parameters, then opened once per client
connection; each open returns a ``Connection``. A filter is configured the
same way and opened with a function that opens the layer below it::

    class Plugin:                          class Filter:
        name, params, thread_model             name, params, thread_model
        config_complete()                      config_complete()
        get_ready() / after_fork()             get_ready() / after_fork()
        list_exports(ctx)                      list_exports(next_list, ctx)
        list_meta_contexts(ctx)                list_meta_contexts(next_list, ctx)
        default_export(ctx)                    default_export(next_default, ctx)
        open(ctx) -> Connection                open(next_open, ctx) -> Connection
                                               connect_below(next_open)
        unload()                               unload()

Parameters declared in ``params`` arrive as attributes (``size=1G`` becomes
``self.size == 1073741824``). ``magic_param`` names the parameter a bare
first word sets (``pynbd serve file disk.img``).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .connection import Connection, FilterConnection, OpenContext
from .control import Command
from .errors import ConfigError
from .params import Param, apply_params

log = logging.getLogger("pynbd.backend")


class ThreadModel(enum.IntEnum):
    """How much concurrency a layer tolerates; lower is more restrictive."""

    SERIALIZE_CONNECTIONS = 0
    SERIALIZE_ALL_REQUESTS = 1
    SERIALIZE_REQUESTS = 2
    PARALLEL = 3


@dataclass(frozen=True)
class Export:
    """An entry of NBD_OPT_LIST."""

    name: str
    description: str = ""


class _Configurable:
    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    params: ClassVar[Sequence[Param]] = ()
    magic_param: ClassVar[str | None] = None
    thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL
    # Set when the layer accepts keys it did not declare (e.g. nbdkit's python plugin).
    accept_unknown_params: ClassVar[bool] = False
    # A scheduling hint, not a promise about I/O: True says every request of
    # this layer finishes in a short, bounded time (memory, local files through
    # the page cache) and never waits on something open-ended (a sleep, the
    # network, a subprocess, a lock another client holds). Where every layer
    # says so, the server runs a connection's requests on its reading thread
    # in batches instead of on a pool (see ``pynbd.server.dispatch``).
    short_requests: ClassVar[bool] = False

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        apply_params(self, values or {})

    def config_complete(self) -> None:
        """Check parameters together; raise ConfigError to refuse them."""

    def get_ready(self) -> None:
        """Last step before the server listens (still in the foreground)."""

    def after_fork(self) -> None:
        """Called after the server daemonized; start threads here."""

    def get_thread_model(self) -> ThreadModel:
        return self.thread_model

    def requests_are_short(self) -> bool:
        """Whether every request is short; see ``short_requests``."""
        return self.short_requests

    def dump_plugin(self) -> list[str]:
        """Extra ``key=value`` lines of ``--dump-plugin`` (nbdkit's dump_plugin callback).
        It runs on an unconfigured instance when the plugin cannot be configured
        without parameters (memory without a size): use no parameter then."""
        return []

    def control_commands(self) -> Sequence[Command]:
        """Commands this layer serves on ``--control=PATH`` (see ``pynbd.backend.control``)."""
        return ()

    def unload(self) -> None:
        """Called once when the server exits."""


class Plugin(_Configurable, abc.ABC):
    """A data source. Subclass it, declare ``params`` and implement ``open``."""

    def list_exports(self, ctx: OpenContext) -> list[Export]:
        """The default export alone; none when ``default_export`` fails (as nbdkit lists)."""
        try:
            return [Export(self.default_export(ctx))]
        except (OSError, LookupError, ConfigError) as exc:
            log.debug("%s: default_export: %s; listing no exports", self.name, exc)
            return []

    def list_meta_contexts(self, ctx: OpenContext) -> list[str]:
        """The meta contexts export ``ctx.export_name`` answers besides
        ``base:allocation`` (``Connection.block_status`` answers them)."""
        return []

    def default_export(self, ctx: OpenContext) -> str:
        return ""

    @abc.abstractmethod
    def open(self, ctx: OpenContext) -> Connection:
        """A new connection for one client (the export it chose is ``ctx.export_name``)."""


class Filter(_Configurable):
    """A layer over the next plugin or filter.

    Set ``connection`` to a ``FilterConnection`` subclass; the default
    ``open`` opens the layer below and builds ``connection(below, self, ctx)``.
    """

    connection: ClassVar[type[FilterConnection[Any]]] = FilterConnection

    def connect_below(self, next_open: Callable[[OpenContext], Connection]) -> None:
        """Called once when the stack is built, with the function that opens the
        layer below; ``open_below`` uses it."""
        self._below_opener = next_open

    def open_below(self, ctx: OpenContext | None = None) -> Connection:
        """Open the layer below outside any client's open (to learn its size in
        ``get_ready``, or for a control command such as a snapshot merge).
        The caller closes what it opened."""
        next_open: Callable[[OpenContext], Connection] | None = getattr(self, "_below_opener", None)
        if next_open is None:
            raise ConfigError(f"{self.name}: the filter is not part of a stack")
        return next_open(ctx or OpenContext())

    def size_below(self) -> int:
        """The size of the layer below's default export."""
        below = self.open_below()
        try:
            return below.get_size()
        finally:
            below.close()

    def list_exports(self, next_list: Callable[[OpenContext], list[Export]],
                     ctx: OpenContext) -> list[Export]:
        return next_list(ctx)

    def list_meta_contexts(self, next_list: Callable[[OpenContext], list[str]],
                           ctx: OpenContext) -> list[str]:
        """The meta contexts of the export: the layer below's, plus any this filter answers."""
        return next_list(ctx)

    def default_export(self, next_default: Callable[[OpenContext], str],
                       ctx: OpenContext) -> str:
        return next_default(ctx)

    def open(self, next_open: Callable[[OpenContext], Connection],
             ctx: OpenContext) -> Connection:
        below = next_open(ctx)
        try:
            return self.wrap(below, ctx)
        except BaseException:
            below.close()
            raise

    def wrap(self, below: Connection, ctx: OpenContext) -> Connection:
        """Build this filter's connection over an opened lower layer."""
        return self.connection(below, self, ctx)
