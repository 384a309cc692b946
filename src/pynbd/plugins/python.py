"""python: run nbdkit Python plugins unmodified, and native plugins from a file.

    pynbd serve python script=plugin.py [KEY=VALUE ...]
    pynbd serve python plugin.py [KEY=VALUE ...]
    pynbd serve ./plugin.py [KEY=VALUE ...]          (the short form)
    ./plugin.py [OPTIONS] [KEY=VALUE ...]            (an executable script)

Parameters
    script=PATH   the plugin file (the magic parameter)
    KEY=VALUE     every other parameter goes, in order, to the plugin's
                  ``config(key, value)``; a plugin without ``config`` takes none

An nbdkit Python plugin is a file of module-level functions, written for
nbdkit-python-plugin(3). Its ``import nbdkit`` gets pynbd's stand-in
(``pynbd.compat.nbdkit``: debug, set_error, parse_size, parse_bool,
export_name, is_tls, shutdown, disconnect and the FLAG_*, FUA_*, CACHE_*,
EXTENT_*, THREAD_MODEL_* constants with nbdkit's values). The same file
runs under ``nbdkit python plugin.py``.

Callbacks (``h`` is whatever ``open`` returned)
    config(key, value)  config_complete()  thread_model()  get_ready()
    after_fork()  cleanup()  preconnect(readonly)
    list_exports(readonly, is_tls) -> [name | (name, description), ...]
    default_export(readonly, is_tls) -> name
    open(readonly) -> h          (required)    close(h)
    dump_plugin()                prints its own --dump-plugin lines
    export_description(h) -> str               sent to clients that ask
    get_size(h) -> int           (required)    block_size(h) -> (min, pref, max)
    is_rotational(h)  can_multi_conn(h)  can_write(h)  can_flush(h)  can_trim(h)
    can_zero(h)  can_fast_zero(h)  can_extents(h) -> bool
    can_fua(h) -> FUA_*          can_cache(h) -> CACHE_*
    extents(h, count, offset, flags) -> [(offset, length, EXTENT_* bits), ...]
    cache(h, count, offset, flags)

  API_VERSION = 2 (declare it at module level; nbdkit's current convention)
    pread(h, buf, offset, flags)       fill the writable memoryview ``buf``
    pwrite(h, buf, offset, flags)      ``buf`` is a read-only memoryview
    flush(h, flags)  trim(h, count, offset, flags)  zero(h, count, offset, flags)
  API_VERSION 1 (no API_VERSION at all means 1)
    pread(h, count, offset) -> bytes   pwrite(h, buf, offset)   flush(h)
    trim(h, count, offset)             zero(h, count, offset, may_trim)

Missing callbacks are treated as nbdkit treats them: no ``pwrite`` means a
read-only export (likewise flush, trim, extents for their ``can_*``); no
``zero`` (or ``can_zero`` false, or ``set_error(errno.EOPNOTSUPP)`` in
``zero``) means zeroes are written with ``pwrite``, and fast-zero requests
fail at once; ``can_fua`` defaults to emulation by flush when ``flush``
exists; ``can_cache`` to native when ``cache`` exists, none otherwise; the
thread model to serialize_all_requests.

Errors: a callback that raises after ``nbdkit.set_error(errno.ENOSPC)``
fails that request with ENOSPC; any other exception fails it with EIO and
its traceback is logged. The server goes on serving. Callbacks are checked
when the plugin loads: a missing open/get_size/pread, or a callback whose
parameters do not fit its calling convention, is refused with the file and
line (and a hint when the other API_VERSION fits).

Native plugins: a file that defines a ``pynbd.backend.Plugin`` subclass (or
names one in ``PLUGIN``) is served directly by ``pynbd serve ./myplugin.py``
with its declared parameters::

    from pynbd.backend import Connection, Param, Plugin

    class Zeroes(Connection):
        def __init__(self, size): self.size = size
        def get_size(self): return self.size
        def pread(self, buf, offset, flags): buf[:] = bytes(len(buf))

    class ZeroPlugin(Plugin):
        name = "zeroes"
        params = (Param("size", "size", "disk size", default=1 << 20),)
        def open(self, ctx): return Zeroes(self.size)

Executable scripts: start the file with ``#!/usr/bin/env -S pynbd serve``
and ``chmod +x`` it; then ``./plugin.py -U - --run 'qemu-img info $uri'
key=value`` runs ``pynbd serve ./plugin.py ...`` (``env -S`` is in GNU
coreutils 8.30 and later).

Limits: ``preconnect`` runs just before the client's first export request
(list, info or go) rather than before the handshake; a bare word after the
script is refused (nbdkit Python plugins have no magic parameter).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, ClassVar

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_MAY_TRIM,
    ConfigError,
    Connection,
    Export,
    Extent,
    OpenContext,
    Param,
    Plugin,
    ThreadModel,
    io_error,
)
from ..backend.params import UNKNOWN_PAIRS
from ..backend.registry import from_module, load_path
from ..compat import nbdkit as shim
from ._callbacks import CallbackConnection

log = logging.getLogger("pynbd.plugins.python")

REQUIRED = ("open", "get_size", "pread")
_H = ("h",)
_REQUEST = ("h", "count", "offset", "flags")
SHAPES: dict[str, tuple[str, ...]] = {
    "config": ("key", "value"), "config_complete": (), "thread_model": (), "get_ready": (),
    "after_fork": (), "cleanup": (), "dump_plugin": (), "preconnect": ("readonly",),
    "list_exports": ("readonly", "is_tls"), "default_export": ("readonly", "is_tls"),
    "open": ("readonly",), "close": _H, "export_description": _H, "get_size": _H,
    "block_size": _H, "is_rotational": _H, "can_multi_conn": _H, "can_write": _H,
    "can_flush": _H, "can_trim": _H, "can_zero": _H, "can_fast_zero": _H, "can_fua": _H,
    "can_cache": _H, "can_extents": _H, "cache": _REQUEST, "extents": _REQUEST,
}
VERSIONED: dict[int, dict[str, tuple[str, ...]]] = {
    1: {"pread": ("h", "count", "offset"), "pwrite": ("h", "buf", "offset"), "flush": _H,
        "trim": ("h", "count", "offset"), "zero": ("h", "count", "offset", "may_trim")},
    2: {"pread": ("h", "buf", "offset", "flags"), "pwrite": ("h", "buf", "offset", "flags"),
        "flush": ("h", "flags"), "trim": _REQUEST, "zero": _REQUEST},
}
_FALLBACK = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP})
_NOT_DONE = object()  # zero() asked to be emulated with pwrite


def _line_of(fn: object) -> str:
    code = getattr(fn, "__code__", None)
    return str(code.co_firstlineno) if code is not None else "?"


def _fits(fn: Callable[..., Any], shape: tuple[str, ...]) -> bool | None:
    """Whether fn can be called with len(shape) positional arguments (None: unknown)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*shape)
    except TypeError:
        return False
    return True


class Script:
    """A loaded nbdkit-style plugin module: its API version and checked callbacks."""

    def __init__(self, module: ModuleType, path: str) -> None:
        self.module = module
        self.path = path
        self.api_version = self._api_version()
        missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
        if missing:
            raise ConfigError(f"{path}: an nbdkit Python plugin must define {', '.join(REQUIRED)}; "
                              f"missing: {', '.join(missing)}")
        self.fns: dict[str, Callable[..., Any]] = {}
        for name, shape in {**SHAPES, **VERSIONED[self.api_version]}.items():
            fn = getattr(module, name, None)
            if fn is not None:
                self.fns[name] = self._checked(name, fn, shape)

    def _api_version(self) -> int:
        value = getattr(self.module, "API_VERSION", 1)
        if value not in VERSIONED:
            raise ConfigError(f"{self.path}: API_VERSION = {value!r} is not supported "
                              f"(use 1 or 2)")
        return int(value)

    def _checked(self, name: str, fn: object, shape: tuple[str, ...]) -> Callable[..., Any]:
        where = f"{self.path}:{_line_of(fn)}"
        if not callable(fn):
            raise ConfigError(f"{where}: {name} must be a function, not {type(fn).__name__}")
        if _fits(fn, shape) is not False:
            return fn
        message = (f"{where}: {name}{inspect.signature(fn)} does not fit the call "
                   f"{name}({', '.join(shape)}) of API_VERSION {self.api_version}")
        other = 3 - self.api_version
        other_shape = VERSIONED[other].get(name)
        if other_shape is not None and _fits(fn, other_shape):
            message += f"; it has the API_VERSION {other} form: set API_VERSION = {other}"
        raise ConfigError(message)

    def has(self, name: str) -> bool:
        return name in self.fns

    # ------------------------------------------------------------ calling
    def call(self, name: str, ctx: OpenContext | None, *args: Any) -> Any:
        """Run a callback for a client; an exception becomes an OSError with its errno."""
        shim.begin_callback(ctx)
        try:
            return self.fns[name](*args)
        except Exception as exc:  # noqa: BLE001 (a plugin bug fails one request)
            raise self._failure(name, exc) from exc

    def call_zero(self, ctx: OpenContext | None, *args: Any) -> Any:
        """zero(): returns _NOT_DONE when the plugin set EOPNOTSUPP/ENOTSUP (fall back)."""
        shim.begin_callback(ctx)
        try:
            self.fns["zero"](*args)
        except Exception as exc:  # noqa: BLE001
            if shim.last_error() in _FALLBACK:
                return _NOT_DONE
            raise self._failure("zero", exc) from exc
        return _NOT_DONE if shim.last_error() in _FALLBACK else None

    def _failure(self, name: str, exc: Exception) -> OSError:
        err = shim.last_error()
        if err:
            log.debug("%s: %s failed (%s): %s", self.path, name, errno.errorcode.get(err, err), exc)
        else:
            err = errno.EIO
            log.error("%s: %s raised %s: %s\n%s", self.path, name, type(exc).__name__, exc,
                      "".join(traceback.format_exception(exc)).rstrip())
        return io_error(err, f"{name}: {type(exc).__name__}: {exc}")

    def configure(self, name: str, *args: Any) -> Any:
        """Run a start-up callback; an exception becomes a ConfigError naming the line."""
        shim.begin_callback(None)
        try:
            return self.fns[name](*args)
        except Exception as exc:  # noqa: BLE001 (reported to the user, one line)
            frames = [f for f in traceback.extract_tb(exc.__traceback__)
                      if os.path.abspath(f.filename) == os.path.abspath(self.path)]
            line = frames[-1].lineno if frames else "?"
            raise ConfigError(f"{self.path}:{line}: {name}: {type(exc).__name__}: {exc}") from None


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise io_error(errno.EIO, f"{name} returned {value!r}, not an integer")
    return value


class ScriptConnection(CallbackConnection):
    """One client's handle ``h`` from the plugin's ``open``."""

    def __init__(self, script: Script, handle: Any, ctx: OpenContext) -> None:
        self.script = script
        self.h = handle
        self.ctx = ctx
        self.v1 = script.api_version == 1

    def _call(self, name: str, *args: Any) -> Any:
        return self.script.call(name, self.ctx, self.h, *args)

    def has(self, name: str) -> bool:
        return self.script.has(name)

    def answer(self, name: str) -> int:
        value = self._call(name)
        if name in ("can_fua", "can_cache"):
            return _integer(name, value)
        return int(bool(value))

    # ------------------------------------------------------------ what it can do
    def get_size(self) -> int:
        return _integer("get_size", self._call("get_size"))

    def block_size(self) -> tuple[int, int, int]:
        if not self.script.has("block_size"):
            return (0, 0, 0)
        sizes = self._call("block_size")
        try:
            minimum, preferred, maximum = (_integer("block_size", s) for s in sizes)
        except (TypeError, ValueError):
            raise io_error(errno.EIO, f"block_size returned {sizes!r}, not three integers") from None
        return minimum, preferred, maximum

    def export_description(self) -> str:
        return str(self._call("export_description")) if self.script.has("export_description") else ""

    # ------------------------------------------------------------ data
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if not self.v1:
            self._call("pread", buf, offset, flags)
            return
        data = self._call("pread", len(buf), offset)
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise io_error(errno.EIO, f"pread returned {type(data).__name__}, "
                                      "which is not bytes-like") from None
        if len(view) < len(buf):
            raise io_error(errno.EIO, f"pread returned {len(view)} bytes, {len(buf)} were asked for")
        buf[:] = view[:len(buf)]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if not self.script.has("pwrite"):
            super().pwrite(buf, offset, flags)
        elif self.v1:
            self._call("pwrite", buf.toreadonly(), offset)
        else:
            self._call("pwrite", buf.toreadonly(), offset, flags)

    def flush(self, flags: int) -> None:
        if not self.script.has("flush"):
            return
        if self.v1:
            self._call("flush")
        else:
            self._call("flush", flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        if not self.script.has("trim"):
            super().trim(count, offset, flags)
        elif self.v1:
            self._call("trim", count, offset)
        else:
            self._call("trim", count, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if self.zero_method() and self.script.has("zero"):
            arg = bool(flags & FLAG_MAY_TRIM) if self.v1 else flags
            if self.script.call_zero(self.ctx, self.h, count, offset, arg) is not _NOT_DONE:
                return
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "zero: not faster than writing")
        super().zero(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        # Called only when can_cache said native (the boundary emulates the rest);
        # a plugin that says so without a cache function gets reads.
        if self.script.has("cache"):
            self._call("cache", count, offset, flags)
        else:
            super().cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        if not self.script.has("extents"):
            return list(super().extents(count, offset, flags))
        result = self._call("extents", count, offset, flags)
        try:
            found = [Extent(_integer("extents", o), _integer("extents", n), bool(t & shim.EXTENT_HOLE),
                            bool(t & shim.EXTENT_ZERO)) for o, n, t in result]
        except (TypeError, ValueError):
            raise io_error(errno.EIO, "extents must return an iterable of "
                                      "(offset, length, type) tuples") from None
        if not found:
            raise io_error(errno.EIO, "extents returned no extent")
        return found

    def close(self) -> None:
        if self.script.has("close"):
            try:
                self._call("close")
            except OSError as exc:
                log.warning("%s: close: %s", self.script.path, exc)


def _declares_plugin(module: ModuleType) -> bool:
    if getattr(module, "PLUGIN", None) is not None:
        return True
    return any(isinstance(obj, type) and issubclass(obj, Plugin) and obj.__module__ == module.__name__
               for obj in vars(module).values())


class PythonPlugin(Plugin):
    name = "python"
    magic_param = "script"
    params = (Param("script", "path", "the nbdkit Python plugin to run", required=True),)
    accept_unknown_params = True
    # Set on classes made for one already loaded file (pynbd serve plugin.py).
    script_module: ClassVar[ModuleType | None] = None
    script_path: ClassVar[str] = ""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        values = dict(values or {})
        path = self.script_path or values["script"]
        module = self.script_module or load_nbdkit_script(path)
        if _declares_plugin(module):
            raise ConfigError(f"{path} defines a pynbd Plugin class: serve it as "
                              f"'pynbd serve {path}', not through the python plugin")
        self.script = Script(module, path)
        self._thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS
        for key, value in values.get(UNKNOWN_PAIRS, []):
            self._config(key, value)

    def _config(self, key: str, value: str) -> None:
        if key == "":
            raise ConfigError(f"{self.script.path}: expected key=value, got {value!r} "
                              "(nbdkit Python plugins have no magic parameter)")
        if not self.script.has("config"):
            raise ConfigError(f"{self.script.path}: this plugin takes no parameters "
                              f"(it has no config function), got {key}={value}")
        self.script.configure("config", key, value)

    @classmethod
    def for_path(cls, path: str) -> type[Plugin]:
        """The plugin class for a .py file: its own Plugin subclass, or one running it."""
        module = load_nbdkit_script(path)
        if _declares_plugin(module):
            return from_module(module, Plugin, path)
        doc = module.__doc__ or cls.__doc__
        return type(f"PythonScript_{module.__name__}", (cls,), {
            "params": (), "magic_param": None, "script_module": module,
            "script_path": path, "__module__": module.__name__, "__doc__": doc})

    # ------------------------------------------------------------ life cycle
    def config_complete(self) -> None:
        if self.script.has("config_complete"):
            self.script.configure("config_complete")
        if self.script.has("thread_model"):
            value = self.script.configure("thread_model")
            try:
                self._thread_model = ThreadModel(value)
            except ValueError:
                raise ConfigError(f"{self.script.path}: thread_model returned {value!r}, "
                                  "not one of nbdkit.THREAD_MODEL_*") from None

    def get_thread_model(self) -> ThreadModel:
        return self._thread_model

    def dump_plugin(self) -> list[str]:
        """The script's dump_plugin() prints its own lines, then python_version (as nbdkit)."""
        script: Script | None = getattr(self, "script", None)  # None: not configured
        if script is not None and script.has("dump_plugin"):
            script.configure("dump_plugin")
            sys.stdout.flush()
        return [f"python_version={sys.version.split()[0]}"]

    def get_ready(self) -> None:
        if self.script.has("get_ready"):
            self.script.configure("get_ready")

    def after_fork(self) -> None:
        if self.script.has("after_fork"):
            self.script.configure("after_fork")

    def unload(self) -> None:
        if self.script.has("cleanup"):
            try:
                self.script.configure("cleanup")
            except ConfigError as exc:
                log.warning("%s", exc)

    # ------------------------------------------------------------ per client
    def _preconnect(self, ctx: OpenContext) -> None:
        if self.script.has("preconnect") and not ctx.extra.get("python.preconnected"):
            ctx.extra["python.preconnected"] = True
            self.script.call("preconnect", ctx, ctx.readonly)

    def list_exports(self, ctx: OpenContext) -> list[Export]:
        self._preconnect(ctx)
        if not self.script.has("list_exports"):
            return super().list_exports(ctx)
        return _exports(self.script.call("list_exports", ctx, ctx.readonly, ctx.tls))

    def default_export(self, ctx: OpenContext) -> str:
        self._preconnect(ctx)
        if not self.script.has("default_export"):
            return ""
        name = self.script.call("default_export", ctx, ctx.readonly, ctx.tls)
        if not isinstance(name, str):
            raise io_error(errno.EIO, f"default_export returned {name!r}, not a string")
        return name

    def open(self, ctx: OpenContext) -> Connection:
        self._preconnect(ctx)
        return ScriptConnection(self.script, self.script.call("open", ctx, ctx.readonly), ctx)


def _exports(items: Iterable[Any]) -> list[Export]:
    exports = []
    for item in items:
        if isinstance(item, str):
            exports.append(Export(item))
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item):
            exports.append(Export(*item))
        else:
            raise io_error(errno.EIO, f"list_exports returned {item!r}: expected a name "
                                      "or a (name, description) tuple")
    return exports


def load_nbdkit_script(path: str) -> ModuleType:
    """Import a plugin file with ``import nbdkit`` answered by pynbd's stand-in."""
    shim.install()
    return load_path(path, "plugin")


PLUGIN = PythonPlugin
