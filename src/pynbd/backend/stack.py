"""A plugin with its filters: built from the command line, opened per client.

``filters[0]`` is the outermost layer (the first ``--filter=`` named), as in
nbdkit. ``key=value`` arguments go to the outermost filter that declares the
key, otherwise to the plugin; a bare word anywhere sets the plugin's magic
parameter (later bare words of a plugin that takes any key: key "").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

from .connection import Connection, OpenContext
from .errors import ConfigError
from .layer import Layer, open_layer
from .params import parse_params, split_key_value
from .plugin import Export, Filter, Plugin, ThreadModel
from .registry import find_filter, find_plugin

C = TypeVar("C", Plugin, Filter)


class Stack:
    """A configured plugin and its filters, outermost filter first."""

    def __init__(self, plugin: Plugin, filters: Sequence[Filter] = ()) -> None:
        self.plugin = plugin
        self.filters = list(filters)
        # Each layer is opened inside its checked boundary (``layer.Layer``):
        # a filter's ``next_open`` returns the layer below already wrapped,
        # and ``open`` hands the server the top layer wrapped the same way.
        open_fn: Callable[[OpenContext], Layer] = _checked(plugin.open, plugin.name)
        list_fn: Callable[[OpenContext], list[Export]] = plugin.list_exports
        default_fn: Callable[[OpenContext], str] = plugin.default_export
        contexts_fn: Callable[[OpenContext], list[str]] = plugin.list_meta_contexts
        for flt in reversed(self.filters):
            flt.connect_below(open_fn)
            open_fn = _checked(functools.partial(flt.open, open_fn), flt.name)
            list_fn = functools.partial(flt.list_exports, list_fn)
            default_fn = functools.partial(flt.default_export, default_fn)
            contexts_fn = functools.partial(flt.list_meta_contexts, contexts_fn)
        self._open = open_fn
        self._list = list_fn
        self._default = default_fn
        self._contexts = contexts_fn

    @classmethod
    def from_args(cls, plugin_name: str, args: Sequence[str],
                  filter_names: Sequence[str] = ()) -> Stack:
        """Configure a stack from command-line words."""
        plugin_cls = find_plugin(plugin_name)
        filter_classes = [find_filter(name) for name in filter_names]
        pairs: list[list[tuple[str, str]]] = [[] for _ in range(len(filter_classes) + 1)]
        magic_seen = False
        for arg in args:
            key, value = split_key_value(arg)
            if key is None:
                if plugin_cls.magic_param is not None and not (
                        magic_seen and plugin_cls.accept_unknown_params):
                    key = plugin_cls.magic_param  # anywhere after the plugin, as in nbdkit
                elif plugin_cls.accept_unknown_params:
                    key = ""  # a later bare word: the plugin decides (sh: its script's magic key)
                else:
                    raise ConfigError(f"{plugin_cls.name}: expected key=value, got {arg!r}")
            magic_seen = magic_seen or key == plugin_cls.magic_param
            owner = next((i for i, f in enumerate(filter_classes)
                          if any(p.name == key for p in f.params)), len(filter_classes))
            pairs[owner].append((key, value))
        filters = [configure(f, pairs[i]) for i, f in enumerate(filter_classes)]
        return cls(configure(plugin_cls, pairs[-1]), filters)

    @property
    def layers(self) -> list[Plugin | Filter]:
        return [*self.filters, self.plugin]

    def thread_model(self) -> ThreadModel:
        """The most restrictive model of any layer."""
        return min(layer.get_thread_model() for layer in self.layers)

    def requests_are_short(self) -> bool:
        """True if every layer's requests are short (see ``Plugin.short_requests``)."""
        return all(layer.requests_are_short() for layer in self.layers)

    def open(self, ctx: OpenContext) -> Layer:
        """Open every layer for one client; the top one, checked, is returned."""
        return self._open(ctx)

    def list_exports(self, ctx: OpenContext) -> list[Export]:
        return self._list(ctx)

    def default_export(self, ctx: OpenContext) -> str:
        return self._default(ctx)

    def list_meta_contexts(self, ctx: OpenContext) -> list[str]:
        """The meta contexts the export answers besides base:allocation."""
        return self._contexts(ctx)

    def get_ready(self) -> None:
        for layer in reversed(self.layers):
            layer.get_ready()

    def after_fork(self) -> None:
        for layer in reversed(self.layers):
            layer.after_fork()

    def unload(self) -> None:
        for layer in self.layers:
            layer.unload()


def _checked(open_fn: Callable[[OpenContext], Connection], name: str) -> Callable[[OpenContext], Layer]:
    """``open_fn`` with its result wrapped in the checked boundary."""
    def open_checked(ctx: OpenContext) -> Layer:
        return open_layer(open_fn(ctx), name, ctx.readonly)
    return open_checked


def configure(cls: type[C], pairs: Sequence[tuple[str, str]]) -> C:
    """Instantiate a plugin or filter class from (key, text) pairs."""
    values = parse_params(cls.name or cls.__name__, cls.params, pairs,
                          accept_unknown=cls.accept_unknown_params)
    layer = cls(values)
    layer.config_complete()
    return layer
