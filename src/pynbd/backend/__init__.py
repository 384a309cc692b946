"""What plugins and filters see: the Connection contract and its helpers.

Import from here in a plugin or filter::

    from pynbd.backend import Plugin, Connection, Param, Extent, io_error
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .blocks import (
        RamDisk,
        ResidentDisk,
        align_extents,
        block_runs,
        extents_of_runs,
        fill_zero,
        is_zero,
    )
    from .connection import (
        ALLOCATION_DEPTH,
        CACHE_EMULATE,
        CACHE_NATIVE,
        CACHE_NONE,
        DATA_METHODS,
        FLAG_FAST_ZERO,
        FLAG_FUA,
        FLAG_MAY_TRIM,
        FLAG_REQ_ONE,
        FUA_EMULATE,
        FUA_NATIVE,
        FUA_NONE,
        ZERO_BUFFER,
        Buffer,
        Connection,
        ContextExtent,
        Extent,
        FilterConnection,
        OpenContext,
        clip_extents,
    )
    from .control import Command, ControlError
    from .errors import ConfigError, errno_of, io_error
    from .layer import Layer, LayerCallError
    from .params import Param, parse_bool, parse_duration, parse_size
    from .plugin import Export, Filter, Plugin, ThreadModel


# The names are loaded when first used, so that a tool that imports one
# module of the package (``pynbd.backend.linux``) does not load them all.
_MODULES = ("blocks", "connection", "control", "errors", "layer", "params", "plugin")


def __getattr__(name: str) -> object:
    if name in __all__:
        for module in _MODULES:
            found = getattr(importlib.import_module(f"{__name__}.{module}"), name, _MODULES)
            if found is not _MODULES:
                globals()[name] = found
                return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALLOCATION_DEPTH", "CACHE_EMULATE", "CACHE_NATIVE", "CACHE_NONE", "DATA_METHODS", "FLAG_FAST_ZERO",
    "FLAG_FUA", "FLAG_MAY_TRIM", "FLAG_REQ_ONE", "FUA_EMULATE", "FUA_NATIVE", "FUA_NONE", "ZERO_BUFFER",
    "Buffer", "Command", "ConfigError", "Connection", "ContextExtent", "ControlError", "Export",
    "Extent", "Filter", "FilterConnection", "Layer", "LayerCallError", "OpenContext", "Param", "Plugin",
    "RamDisk", "ResidentDisk", "ThreadModel", "block_runs", "extents_of_runs", "clip_extents",
    "align_extents",
    "errno_of", "fill_zero", "io_error", "is_zero", "parse_bool", "parse_duration", "parse_size",
]
