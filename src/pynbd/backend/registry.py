"""Finding plugins and filters by the name the user types.

Lookup order for a name: a path to a ``.py`` file (it must define exactly
one ``Plugin`` / ``Filter`` subclass, or name it in ``PLUGIN`` / ``FILTER``;
a plugin file with nbdkit-style module-level functions instead is served
through the ``python`` plugin; a ``.so`` is an nbdkit plugin, served through
the ``cc`` plugin); a module of pynbd itself (``pynbd.plugins.NAME``,
``pynbd.filters.NAME``, with ``-`` read as ``_``); an entry point in the
``pynbd.plugins`` / ``pynbd.filters`` group of any installed package.
Each module defines one class and names it in ``PLUGIN`` / ``FILTER``, or
is found by scanning for the one subclass.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import pkgutil
import sys
import traceback
from importlib import metadata
from types import ModuleType
from typing import Protocol, TypeVar, runtime_checkable

from .errors import ConfigError
from .plugin import Filter, Plugin

T = TypeVar("T", Plugin, Filter)

_KINDS: dict[type, tuple[str, str]] = {Plugin: ("plugin", "pynbd.plugins"),
                                        Filter: ("filter", "pynbd.filters")}


@runtime_checkable
class PluginFileHost(Protocol):
    """What the python plugin's class offers: the plugin class for a .py file
    (the file's own Plugin subclass, or one running its nbdkit-style functions)."""

    def for_path(self, path: str) -> type[Plugin]: ...


def find_plugin(name: str) -> type[Plugin]:
    """The Plugin class for ``name`` (a name or a path to a .py file)."""
    if is_script_path(name):  # .so: an nbdkit plugin (cc); .py: native or nbdkit-style (python)
        host_name = "cc" if name.endswith(".so") else "python"
        host = _find(host_name, Plugin)
        if not isinstance(host, PluginFileHost):
            raise ConfigError(f"the {host_name} plugin cannot serve plugin files such as {name!r}")
        return host.for_path(name)
    return _find(name, Plugin)


def find_filter(name: str) -> type[Filter]:
    return _find(name, Filter)


def builtin_names(kind: type) -> list[str]:
    """Names of the plugins or filters shipped in pynbd."""
    package = importlib.import_module(_KINDS[kind][1])
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_"))


def is_script_path(name: str) -> bool:
    return name.endswith(".py") or os.sep in name


def _find(name: str, kind: type[T]) -> type[T]:
    label, group = _KINDS[kind]
    if is_script_path(name):
        return from_module(load_path(name, label), kind, name)
    module_name = f"{group}.{name.replace('-', '_')}"
    if name.replace("-", "_").isidentifier():
        spec = importlib.util.find_spec(module_name)
        if spec is not None:
            return from_module(importlib.import_module(module_name), kind, name)
    for entry in metadata.entry_points(group=group):
        if entry.name == name:
            obj = entry.load()
            if isinstance(obj, ModuleType):
                return from_module(obj, kind, name)
            return _checked_class(obj, kind, f"entry point {entry.value!r}")
    raise ConfigError(f"unknown {label} {name!r} (see 'pynbd serve --help' for the list)")


class _ScriptLoader(importlib.machinery.SourceFileLoader):
    """Python source under any file name (shebang scripts); writes no __pycache__."""

    def set_data(self, path: str, data: object, *, _mode: int = 0o666) -> None:
        return None


def load_path(path: str, label: str) -> ModuleType:
    """Import a .py file as a fresh module; ConfigError (file:line) if it cannot."""
    if not os.path.exists(path):
        raise ConfigError(f"{label} file {path!r} does not exist")
    module_name = "pynbd_script_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(module_name, path,
                                                  loader=_ScriptLoader(module_name, path))
    if spec is None or spec.loader is None:
        raise ConfigError(f"{label} file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 (any import failure is reported)
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)]
        last = (own or frames)[-1]
        raise ConfigError(f"{path}:{last.lineno}: cannot load {label}: "
                          f"{type(exc).__name__}: {exc}") from None
    return module


def from_module(module: ModuleType, kind: type[T], name: str) -> type[T]:
    """The one Plugin/Filter class a module names in PLUGIN/FILTER or defines."""
    label = _KINDS[kind][0]
    declared = getattr(module, label.upper(), None)
    if declared is not None:
        return _checked_class(declared, kind, f"{name}: {label.upper()}")
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, kind) and obj is not kind
             and obj.__module__ == module.__name__]
    if len(found) != 1:
        raise ConfigError(f"{name}: expected one {kind.__name__} subclass, found {len(found)}")
    return found[0]


def _checked_class(obj: object, kind: type[T], what: str) -> type[T]:
    """``obj`` if it is a subclass of ``kind``; ConfigError naming ``what`` otherwise."""
    if isinstance(obj, type) and issubclass(obj, kind):
        return obj
    raise ConfigError(f"{what} is {obj!r}, not a {kind.__name__} subclass")
