"""cc: nbdkit plugins written in C, compiled as they load; and nbdkit's own .so plugins.

    pynbd serve cc plugin.c [CC=CC] [CFLAGS=FLAGS] [EXTRA_CFLAGS=FLAGS] [KEY=VALUE ...]
    pynbd serve cc - [KEY=VALUE ...] < plugin.c         (the source on standard input)
    ./plugin.c [OPTIONS] [KEY=VALUE ...]                 (a C script, see below)
    pynbd serve ./nbdkit-foo-plugin.so [KEY=VALUE ...]   (an already built nbdkit plugin)

Parameters
    script=PATH      the C source (the magic parameter: the first bare word);
                     ``-`` reads it from standard input
    CC=CC            the compiler (default ``cc``)
    CFLAGS=FLAGS     replaces the default flags ``-g -O2 -fPIC -shared``
                     (they must still make a shared object)
    EXTRA_CFLAGS=FLAGS  added after CFLAGS (``-I.``, ``-lm``, ``-DDEBUG``)
    KEY=VALUE        every other parameter goes, in order, to the plugin's
                     ``.config``; a bare word goes to its ``.magic_config_key``

The source is compiled with ``CC CFLAGS EXTRA_CFLAGS -I<pynbd's headers> -o
plugin.so SOURCE`` in a private temporary directory, loaded, and the
directory removed. The ``#include <nbdkit-plugin.h>`` it contains gets
pynbd's header, written from nbdkit-plugin(3): ``struct nbdkit_plugin`` has
nbdkit's layout for API versions 1 and 2, so the same file builds and runs
under ``nbdkit cc`` and the same ``.so`` under both servers. The compiler's
messages go to standard error; a file that does not compile stops the
server with exit status 1.

A C script starts with three lines the compiler skips and the shell runs::

    #if 0
    exec pynbd serve cc "$0" "$@"
    #endif
    #include <nbdkit-plugin.h>
    ...
    NBDKIT_REGISTER_PLUGIN (plugin)

then ``chmod +x plugin.c; ./plugin.c -U - --run 'qemu-img info $uri' size=1G``.

Callbacks are called as nbdkit calls them: load, config (for each
parameter), config_complete, thread_model, get_ready, after_fork; per
client preconnect, list_exports / default_export, open, get_size,
block_size, the can_* and is_rotational answers (once per connection),
pread, pwrite, flush, trim, zero, cache and extents with their flags
(API version 1 callbacks without them), close; at exit cleanup and unload.
Missing callbacks are treated as nbdkit treats them (no pwrite: read-only;
no zero, or zero failing with ENOTSUP: zeroes are written; can_fua emulated
by flush; and so on).

The functions a plugin calls: nbdkit_error / verror, nbdkit_debug / vdebug
(shown with ``-v``), nbdkit_set_error, nbdkit_parse_size, nbdkit_parse_bool,
nbdkit_parse_int / unsigned / int8_t ... uint64_t, nbdkit_absolute_path,
nbdkit_realpath, nbdkit_read_password (``-``, ``+FILE``, ``-FD`` or the
password), nbdkit_stdio_safe, nbdkit_strdup_intern and friends,
nbdkit_add_extent, nbdkit_add_export, nbdkit_use_default_export,
nbdkit_export_name, nbdkit_is_tls, nbdkit_nanosleep, nbdkit_peer_name,
nbdkit_peer_pid / uid / gid, nbdkit_shutdown, nbdkit_disconnect.

Errors: a callback that returns -1 fails the request with the errno given to
nbdkit_set_error, else ``errno`` if the plugin sets ``.errno_is_preserved``,
else EIO; its nbdkit_error message goes to the log. A callback that fails
without calling nbdkit_error is logged as such (and fails with EIO). A
failing config, config_complete or get_ready stops the server with the
plugin's message.

Threads: the plugin's THREAD_MODEL (lowered by its thread_model callback) is
honoured; C code runs with Python's GIL released. Where a PARALLEL plugin's
requests run depends on what it may wait for, read from the functions and
libraries its shared object imports: a plugin that calls nothing that waits
(no sleep, poll, socket, pipe read or write, subprocess, condition variable
or semaphore, and no library besides the C library and zlib, zstd, xz and
bzip2: a RAM disk, a file) has short requests, run on each connection's
reading thread as the server's own memory and file plugins are (a thread
hand-off per request would cost several times the request); any other
PARALLEL plugin's requests run at once on the server's threads (``-t``, 16
by default). ``-v`` logs the reason. ``-t N`` (N > 1) always gives a pool
of N threads, and ``-t 1`` always the reading thread.

Limits: nbdkit_peer_pid / uid / gid answer for clients on a Unix socket
only (as in nbdkit); nbdkit_peer_name works for TCP and Unix sockets;
export_description and dump_plugin are not called; nbdkit_nanosleep is not
cut short by shutdown; interned strings live until the server exits.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shlex
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Mapping
from typing import Any, ClassVar

from ..backend import (
    FLAG_FAST_ZERO,
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
from ._callbacks import CallbackConnection
from ._cc_runtime import (
    CONFIG_HELP,
    DEFAULT_CC,
    DEFAULT_CFLAGS,
    DESCRIPTION,
    LONGNAME,
    MAGIC_CONFIG_KEY,
    OP,
    Failure,
    LoadedPlugin,
    compile_c,
    failure,
    ffi,
    forget_client,
    register_client,
    text,
)

log = logging.getLogger("pynbd.plugins.cc")
_FALLBACK = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP})


def _peer(address: object) -> bytes:
    """The client's address as a struct sockaddr, for nbdkit_peer_name (b"" if unknown)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), int(address[1])
        ip = ipaddress.ip_address(host.split("%")[0])
        if ip.version == 4:
            return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)
        scope = int(address[3]) if len(address) >= 4 else 0
        return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + ip.packed
                + struct.pack("=I", scope))
    if isinstance(address, (str, bytes)):
        path = address.encode() if isinstance(address, str) else address
        return struct.pack("=H", socket.AF_UNIX) + path + b"\0"
    return b""


class CcConnection(CallbackConnection):
    """One client's handle from the plugin's open."""

    def __init__(self, plugin: LoadedPlugin, ctx: OpenContext) -> None:
        self.plugin = plugin
        self.ctx = ctx
        self.client_id = register_client(ctx)
        peer = _peer(ctx.client_address)
        pid, uid, gid = ctx.peer_credentials or (-1, -1, -1)  # known for Unix-socket clients
        self.conn = plugin.lib.pynbd_cc_conn_new(plugin.struct, ctx.export_name.encode(),
                                                 int(ctx.tls), self.client_id, peer, len(peer),
                                                 pid, uid, gid)
        self.size = -1
        try:
            plugin.io_call(self.conn, "open", flags=int(ctx.readonly))
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self.plugin.lib.pynbd_cc_conn_free(self.conn)
        self.conn = ffi.NULL
        forget_client(self.client_id)

    def has(self, name: str) -> bool:
        return self.plugin.has(name)

    def answer(self, name: str) -> int:
        return int(self.plugin.io_call(self.conn, name))

    # ------------------------------------------------------------ what it can do
    def get_size(self) -> int:
        self.size = self.plugin.io_call(self.conn, "get_size")
        return self.size

    def block_size(self) -> tuple[int, int, int]:
        if not self.plugin.has("block_size"):
            return (0, 0, 0)
        sizes = ffi.new("uint32_t[3]")
        self.plugin.io_call(self.conn, "block_size", ptr=sizes)
        return int(sizes[0]), int(sizes[1]), int(sizes[2])

    # ------------------------------------------------------------ data
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.plugin.io_call(self.conn, "pread", len(buf), offset, flags, ffi.from_buffer(buf))

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if not self.plugin.has("pwrite"):
            super().pwrite(buf, offset, flags)
            return
        self.plugin.io_call(self.conn, "pwrite", len(buf), offset, flags, ffi.from_buffer(buf))

    def flush(self, flags: int) -> None:
        if self.plugin.has("flush"):
            self.plugin.io_call(self.conn, "flush", flags=flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        if not self.plugin.has("trim"):
            super().trim(count, offset, flags)
            return
        self.plugin.io_call(self.conn, "trim", count, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if self.zero_method() and self.plugin.has("zero"):
            try:
                self.plugin.call(self.conn, "zero", count, offset, flags)
                return
            except Failure as fail:
                if fail.err not in _FALLBACK:
                    raise self.plugin.io_failure("zero", fail) from None
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "zero: not faster than writing")
        super().zero(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        if self.plugin.has("cache"):
            self.plugin.io_call(self.conn, "cache", count, offset, flags)
        else:
            super().cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        if not self.plugin.has("extents"):
            return list(super().extents(count, offset, flags))
        lib = self.plugin.lib
        end = self.size if self.size >= 0 else offset + count
        found = lib.pynbd_cc_extents_new(offset, end)
        try:
            self.plugin.io_call(self.conn, "extents", count, offset, flags, found)
            n = lib.pynbd_cc_extents_count(found)
            items: Any = ffi.unpack(lib.pynbd_cc_extents_array(found), n) if n else []
            extents = [Extent(int(e.offset), int(e.length), bool(e.type & 1), bool(e.type & 2))
                       for e in items]
        finally:
            lib.pynbd_cc_extents_free(found)
        if not extents:
            raise io_error(errno.EIO, f"{self.plugin.name}: extents: the plugin returned no extent")
        return extents

    def close(self) -> None:
        if self.conn == ffi.NULL:
            return
        try:
            if self.plugin.has("close"):
                self.plugin.io_call(self.conn, "close")
        finally:
            self._release()


class CcPlugin(Plugin):
    name = "cc"
    magic_param = "script"
    params = (
        Param("script", "str", "the C source file, or - for standard input"),
        Param("CC", "str", "the C compiler", default=DEFAULT_CC),
        Param("CFLAGS", "str", "compiler flags replacing the default", default=DEFAULT_CFLAGS),
        Param("EXTRA_CFLAGS", "str", "compiler flags added to CFLAGS", default=""),
    )
    accept_unknown_params = True
    # Set on classes made for one already built plugin (pynbd serve ./foo.so).
    loaded: ClassVar[LoadedPlugin | None] = None

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        values = dict(values or {})
        pairs: list[tuple[str, str]] = list(values.get(UNKNOWN_PAIRS, []))
        if self.loaded is not None:
            self.plugin = self.loaded
        else:
            script = values.get("script")
            if script is None and pairs and pairs[0][0] == "":
                script = pairs.pop(0)[1]  # the file after CC=... or CFLAGS=...
            if not script:
                raise ConfigError("cc: the C source file must be given "
                                  "(pynbd serve cc plugin.c [KEY=VALUE ...])")
            cflags = shlex.split(values.get("CFLAGS") or DEFAULT_CFLAGS)
            cflags += shlex.split(values.get("EXTRA_CFLAGS") or "")
            self.plugin = build(str(script), values.get("CC") or DEFAULT_CC, cflags)
        self._thread_model = ThreadModel(min(max(self.plugin.declared_thread_model, 0), 3))
        self._config_strings: list[tuple[Any, Any]] = []
        if self.plugin.has("load"):
            self.plugin.configure("load")
        for key, value in pairs:
            self._config(key, value)

    def _config(self, key: str, value: str) -> None:
        if key == "":
            key = self.plugin.string(MAGIC_CONFIG_KEY)
            if not key:
                raise ConfigError(f"{self.plugin.name}: expected key=value, got {value!r} "
                                  "(the plugin has no magic_config_key)")
        if not self.plugin.has("config"):
            raise ConfigError(f"{self.plugin.name}: this plugin takes no parameters "
                              f"(it has no config callback), got {key}={value}")
        # nbdkit's parameters live as long as the server: plugins keep the pointers.
        strings = (ffi.new("char[]", key.encode()), ffi.new("char[]", value.encode()))
        self._config_strings.append(strings)
        self.plugin.configure("config", s1=strings[0], s2=strings[1])

    @classmethod
    def for_path(cls, path: str) -> type[Plugin]:
        """The plugin class for an already built nbdkit plugin (a .so with plugin_init)."""
        if not os.path.exists(path):
            raise ConfigError(f"plugin file {path!r} does not exist")
        loaded = LoadedPlugin(os.path.abspath(path))
        about = [loaded.string(LONGNAME) or loaded.name, loaded.string(DESCRIPTION),
                 f"An nbdkit plugin ({path}), served by pynbd's cc plugin.",
                 loaded.string(CONFIG_HELP)]
        return type(f"CcPlugin_{loaded.name}", (cls,), {
            "name": loaded.name, "params": (), "magic_param": None, "loaded": loaded,
            "__module__": f"pynbd_cc_{loaded.name}",  # no such module: --help prints __doc__
            "__doc__": "\n\n".join(text for text in about if text)})

    # ------------------------------------------------------------ life cycle
    def config_complete(self) -> None:
        if self.plugin.has("config_complete"):
            self.plugin.configure("config_complete")
        if self.plugin.has("thread_model"):
            value = self.plugin.configure("thread_model")
            if value not in range(4):
                raise ConfigError(f"{self.plugin.name}: thread_model returned {value}, "
                                  "not one of NBDKIT_THREAD_MODEL_*")
            self._thread_model = min(self._thread_model, ThreadModel(value))

    def get_thread_model(self) -> ThreadModel:
        return self._thread_model

    def requests_are_short(self) -> bool:
        """Short unless the plugin imports something that may wait (see the manual)."""
        if self.plugin.waits:
            log.debug("%s: requests may wait: %s", self.plugin.name, self.plugin.waits)
        return self.plugin.waits is None

    def get_ready(self) -> None:
        if self.plugin.has("get_ready"):
            self.plugin.configure("get_ready")

    def after_fork(self) -> None:
        if self.plugin.has("after_fork"):
            self.plugin.configure("after_fork")

    def unload(self) -> None:
        for name in ("cleanup", "unload"):
            if self.plugin.has(name):
                self.plugin.call(self.plugin.global_conn, name)

    # ------------------------------------------------------------ per client
    def _client_call(self, ctx: OpenContext, name: str, **args: Any) -> tuple[int, str]:
        """A callback before open, with a connection made for ``ctx`` (and freed)."""
        lib = self.plugin.lib
        conn = lib.pynbd_cc_conn_new(self.plugin.struct, ctx.export_name.encode(), int(ctx.tls),
                                     0, ffi.NULL, 0, -1, -1, -1)
        try:
            result = int(lib.pynbd_cc_call(conn, OP[name], args.get("count", 0), 0,
                                           int(ctx.readonly), args.get("ptr", ffi.NULL),
                                           ffi.NULL, ffi.NULL))
            if result == -1:
                raise self.plugin.io_failure(name, failure())
            return result, text(lib.pynbd_cc_conn_result(conn))
        finally:
            lib.pynbd_cc_conn_free(conn)

    def _preconnect(self, ctx: OpenContext) -> None:
        if self.plugin.has("preconnect") and not ctx.extra.get("cc.preconnected"):
            ctx.extra["cc.preconnected"] = True
            self._client_call(ctx, "preconnect")

    def list_exports(self, ctx: OpenContext) -> list[Export]:
        self._preconnect(ctx)
        if not self.plugin.has("list_exports"):
            return super().list_exports(ctx)
        lib = self.plugin.lib
        exports = lib.pynbd_cc_exports_new()
        try:
            self._client_call(ctx, "list_exports", ptr=exports)
            found: list[Export] = []
            name, description = ffi.new("const char **"), ffi.new("const char **")
            while lib.pynbd_cc_exports_get(exports, len(found), name, description) == 0:
                export = self.default_export(ctx) if name[0] == ffi.NULL else text(name[0])
                found.append(Export(export, text(description[0])))
        finally:
            lib.pynbd_cc_exports_free(exports)
        return found

    def default_export(self, ctx: OpenContext) -> str:
        self._preconnect(ctx)
        if not self.plugin.has("default_export"):
            return ""
        return self._client_call(ctx, "default_export")[1]

    def open(self, ctx: OpenContext) -> Connection:
        self._preconnect(ctx)
        return CcConnection(self.plugin, ctx)


def build(script: str, cc: str, cflags: list[str]) -> LoadedPlugin:
    """Compile ``script`` (``-``: standard input) in a private directory and load it."""
    workdir = tempfile.mkdtemp(prefix="pynbd-cc-")
    try:
        source = script
        if script == "-":
            source = os.path.join(workdir, "plugin.c")
            with open(source, "wb") as f:
                f.write(sys.stdin.buffer.read())
        elif not os.path.isfile(script):
            raise ConfigError(f"cc: {script}: no such file")
        output = os.path.join(workdir, "plugin.so")
        compile_c(source, output, cc, cflags)
        return LoadedPlugin(output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


PLUGIN = CcPlugin
