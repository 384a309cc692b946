"""The run-time half of the cc plugin: compiling C, the nbdkit shim, loading plugins.

``shim()`` compiles ``cc_include/pynbd-cc-shim.c`` once per process into a
private temporary directory and loads it ``RTLD_GLOBAL``, so that an nbdkit
plugin loaded afterwards finds its ``nbdkit_*`` functions there. ``compile_c``
builds a plugin from source; ``load_plugin`` calls a shared object's
``plugin_init``. Calls into C go through cffi's ABI mode, which releases the
GIL for the duration of each call.

``waits(path)`` reads the plugin's dynamic imports from its ELF file (the
libraries it needs and the functions it calls): a plugin that calls nothing
that may wait (a sleep, a poll, sockets, pipes, a subprocess, a condition
variable, or a library outside the C library and the compression ones) has
short requests, which the server runs where it reads them (see
``Plugin.short_requests``).
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cffi

from ..backend import ConfigError, OpenContext, io_error
from ..backend.params import parse_bool, parse_size, read_secret

log = logging.getLogger("pynbd.plugins.cc")

INCLUDE = Path(__file__).with_name("cc_include")
SHIM_SOURCE = INCLUDE / "pynbd-cc-shim.c"
DEFAULT_CC = "cc"
DEFAULT_CFLAGS = "-g -O2 -fPIC -shared"

# The callbacks, numbered as in the shim's enum.
OPS = ("load unload dump_plugin config config_complete thread_model get_ready after_fork "
       "cleanup preconnect list_exports default_export open close export_description get_size "
       "block_size can_write can_flush is_rotational can_trim can_zero can_fast_zero can_fua "
       "can_multi_conn can_extents can_cache pread pwrite flush trim zero cache extents").split()
OP = {name: number for number, name in enumerate(OPS)}
NAME, LONGNAME, VERSION, DESCRIPTION, CONFIG_HELP, MAGIC_CONFIG_KEY = range(6)

ffi = cffi.FFI()
ffi.cdef("""
struct nbdkit_plugin;
struct nbdkit_extents;
struct nbdkit_exports;
struct pynbd_conn;
struct pynbd_extent { uint64_t offset, length; uint32_t type; };

void pynbd_cc_init (void *log, void *parse_size, void *parse_bool, void *read_password,
                    void *shutdown, void *disconnect, int debug);
struct pynbd_conn *pynbd_cc_conn_new (struct nbdkit_plugin *p, const char *export_name,
    int is_tls, uint64_t id, const void *peer, size_t peer_len,
    int64_t pid, int64_t uid, int64_t gid);
void pynbd_cc_conn_free (struct pynbd_conn *c);
const char *pynbd_cc_conn_result (struct pynbd_conn *c);
int pynbd_cc_failure (char *msg, size_t len, int *called);
struct nbdkit_extents *pynbd_cc_extents_new (uint64_t start, uint64_t end);
void pynbd_cc_extents_free (struct nbdkit_extents *x);
size_t pynbd_cc_extents_count (const struct nbdkit_extents *x);
const struct pynbd_extent *pynbd_cc_extents_array (const struct nbdkit_extents *x);
struct nbdkit_exports *pynbd_cc_exports_new (void);
void pynbd_cc_exports_free (struct nbdkit_exports *x);
int pynbd_cc_exports_get (const struct nbdkit_exports *x, size_t i,
                          const char **name, const char **description);
struct nbdkit_plugin *pynbd_cc_plugin_init (void *init, int *api);
int pynbd_cc_has (const struct nbdkit_plugin *p, int op);
const char *pynbd_cc_string (const struct nbdkit_plugin *p, int which);
int64_t pynbd_cc_call (struct pynbd_conn *c, int op, uint64_t count, uint64_t offset,
                       uint32_t flags, void *ptr, const char *s1, const char *s2);
void *plugin_init (void);
""")


def text(ptr: Any) -> str:
    """A C string as text (empty for NULL)."""
    if ptr == ffi.NULL:
        return ""
    value = ffi.string(ptr)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def compile_c(source: str, output: str, cc: str, cflags: Sequence[str]) -> None:
    """Run the compiler; its messages go to our stderr. ConfigError if it fails."""
    command = [*shlex.split(cc), *cflags, "-I", str(INCLUDE), "-o", output, source]
    log.debug("compiling: %s", shlex.join(command))
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise ConfigError(f"cc: the C compiler {cc!r} is not installed (install gcc, "
                          f"e.g. 'apt-get install gcc', or name one with CC=...)") from None
    except PermissionError as exc:
        raise ConfigError(f"cc: cannot run the C compiler {cc!r}: {exc.strerror}") from None
    if result.returncode != 0:
        raise ConfigError(f"cc: {source}: compilation failed ({shlex.split(cc)[0]} exited "
                          f"with status {result.returncode}; its errors are above)")


# ---------------------------------------------------------------- may the plugin wait?
# Functions a plugin calls to wait on something open-ended: time, other processes,
# the network, pipes (files are read with pread), other threads.
WAITING_FUNCTIONS = frozenset("""
    sleep usleep nanosleep clock_nanosleep nbdkit_nanosleep
    poll ppoll select pselect epoll_wait epoll_pwait epoll_pwait2
    connect accept accept4 recv recvfrom recvmsg recvmmsg send sendto sendmsg sendmmsg
    read readv write writev getaddrinfo gethostbyname
    fork vfork system popen posix_spawn posix_spawnp wait waitpid wait3 wait4 waitid
    pthread_cond_wait pthread_cond_timedwait pthread_cond_clockwait pthread_join
    sem_wait sem_timedwait sem_clockwait flock lockf
""".split())
# Libraries that compute and never wait (the C library's and the compressors).
COMPUTING_LIBRARIES = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so",
                       "libgcc_s.so", "ld-linux", "libzstd.so", "libz.so", "liblzma.so",
                       "libbz2.so")
_SHT_DYNAMIC, _SHT_DYNSYM, _DT_NEEDED = 6, 11, 1


def elf_imports(path: str) -> tuple[list[str], set[str]]:
    """The libraries a shared object needs (DT_NEEDED) and the symbols it imports."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise ValueError(f"{path}: not an ELF file")
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    addr = "Q" if wide else "I"
    shoff, = struct.unpack_from(order + addr, data, 40 if wide else 32)
    shentsize, shnum = struct.unpack_from(order + "HH", data, 58 if wide else 46)
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link
    section = struct.Struct(order + ("IIQQQQI" if wide else "IIIIIII"))
    sections = [section.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]

    def string(table: int, offset: int) -> str:
        start = sections[table][4] + offset
        return data[start:data.index(b"\0", start)].decode("utf-8", "replace")

    needed: list[str] = []
    symbols: set[str] = set()
    # Elf64_Dyn: d_tag, d_val; Elf64_Sym: st_name, st_info, st_other, st_shndx, ...
    dyn = struct.Struct(order + ("qQ" if wide else "iI"))
    sym = struct.Struct(order + ("IBBH16x" if wide else "I8xBBH"))
    for _, kind, _, _, offset, size, link in sections:
        if kind == _SHT_DYNAMIC:
            for tag, value in dyn.iter_unpack(data[offset:offset + size]):
                if tag == _DT_NEEDED:
                    needed.append(string(link, value))
        elif kind == _SHT_DYNSYM:
            for name, _, _, index in sym.iter_unpack(data[offset:offset + size]):
                if name and index == 0:  # SHN_UNDEF: defined elsewhere
                    symbols.add(string(link, name))
    return needed, symbols


def waits(path: str) -> str | None:
    """Why the plugin's requests may wait (what it imports), or None: they never do."""
    try:
        needed, symbols = elf_imports(path)
    except (OSError, ValueError, struct.error) as exc:
        return f"its imports are unknown ({exc})"
    libraries = [name for name in needed if not name.startswith(COMPUTING_LIBRARIES)]
    if libraries:
        return "it uses " + ", ".join(libraries)
    functions = sorted(symbols & WAITING_FUNCTIONS)
    return "it calls " + ", ".join(functions) if functions else None


# ---------------------------------------------------------------- Python's side of the shim
_clients: dict[int, OpenContext] = {}
_clients_lock = threading.Lock()
_next_id = [1]


def register_client(ctx: OpenContext) -> int:
    """An id for ``nbdkit_disconnect`` to find this client by."""
    with _clients_lock:
        number = _next_id[0]
        _next_id[0] += 1
        _clients[number] = ctx
    return number


def forget_client(number: int) -> None:
    with _clients_lock:
        _clients.pop(number, None)


@ffi.callback("void(int, const char *)")
def _log(level: int, msg: Any) -> None:
    message = text(msg)
    if level:
        log.error("%s", message)
    else:
        log.debug("%s", message)


@ffi.callback("int(const char *, int64_t *)", error=-1)
def _parse_size(value: Any, out: Any) -> int:
    try:
        out[0] = parse_size(text(value))
    except ValueError:
        return -1
    return 0


@ffi.callback("int(const char *)", error=-1)
def _parse_bool(value: Any) -> int:
    try:
        return int(parse_bool(text(value)))
    except ValueError:
        return -1


@ffi.callback("int(const char *, char *, size_t)", error=-1)
def _read_password(value: Any, buf: Any, size: int) -> int:
    try:
        data = read_secret(text(value)).encode()
    except (OSError, ValueError, EOFError) as exc:
        log.error("nbdkit_read_password: %s", exc)
        return -1
    if len(data) >= size:
        return -1
    ffi.memmove(buf, data, len(data))
    return len(data)


@ffi.callback("void(void)")
def _shutdown() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


@ffi.callback("void(uint64_t, int)")
def _disconnect(number: int, force: int) -> None:
    with _clients_lock:
        ctx = _clients.get(number)
    stop: Callable[[], None] | None = ctx.extra.get("disconnect") if ctx is not None else None
    if stop is not None:
        stop()


_shim: list[Any] = []
_shim_lock = threading.Lock()


def shim() -> Any:
    """The loaded shim library (compiled on first use in this process)."""
    with _shim_lock:
        if not _shim:
            workdir = tempfile.mkdtemp(prefix="pynbd-cc-")
            try:
                library = os.path.join(workdir, "pynbd-cc-shim.so")
                compile_c(str(SHIM_SOURCE), library, os.environ.get("CC", DEFAULT_CC),
                          ["-O2", "-fPIC", "-shared", "-pthread"])
                lib: Any = ffi.dlopen(library, os.RTLD_NOW | os.RTLD_GLOBAL)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            lib.pynbd_cc_init(_log, _parse_size, _parse_bool, _read_password, _shutdown,
                              _disconnect, int(log.isEnabledFor(logging.DEBUG)))
            _shim.append(lib)
        return _shim[0]


class Failure(Exception):
    """A callback returned -1: the errno for the client and the plugin's message."""

    def __init__(self, err: int, message: str, called: bool) -> None:
        super().__init__(message)
        self.err = err
        self.message = message
        self.called = called


def failure() -> Failure:
    """What the last failed call on this thread left: errno, message, nbdkit_error called."""
    buf = ffi.new("char[1024]")
    called = ffi.new("int *")
    err = shim().pynbd_cc_failure(buf, 1024, called)
    return Failure(err or errno.EIO, text(buf), bool(called[0]))


class LoadedPlugin:
    """An nbdkit plugin's struct, loaded from a shared object."""

    def __init__(self, path: str) -> None:
        lib = shim()
        self.path = path
        try:
            self.dl: Any = ffi.dlopen(path, os.RTLD_LAZY | os.RTLD_LOCAL)
        except OSError as exc:
            raise ConfigError(f"cc: cannot load {path}: {exc}") from None
        try:
            init = getattr(self.dl, "plugin_init")  # noqa: B009 (cffi's Lib is typed without it)
        except AttributeError:
            raise ConfigError(f"cc: {path} is not an nbdkit plugin: it has no plugin_init "
                              "(is NBDKIT_REGISTER_PLUGIN missing?)") from None
        api = ffi.new("int *")
        self.struct = lib.pynbd_cc_plugin_init(ffi.cast("void *", init), api)
        if self.struct == ffi.NULL:
            if api[0]:
                raise ConfigError(f"cc: {path}: the plugin uses nbdkit API version {api[0]}; "
                                  "pynbd supports versions 1 and 2")
            raise ConfigError(f"cc: {path}: plugin_init returned NULL")
        self.api_version = int(api[0])
        # The struct's first fields: _struct_size (uint64), _api_version, _thread_model (int).
        header = ffi.cast("int *", self.struct)
        self.declared_thread_model = int(header[3])
        self.lib = lib
        self.callbacks = frozenset(name for name in OPS if lib.pynbd_cc_has(self.struct, OP[name]))
        self.name = self.string(NAME) or os.path.basename(path)
        self.global_conn = lib.pynbd_cc_conn_new(self.struct, b"", 0, 0, ffi.NULL, 0, -1, -1, -1)
        self.waits = waits(path)

    def string(self, which: int) -> str:
        return text(self.lib.pynbd_cc_string(self.struct, which))

    def has(self, name: str) -> bool:
        return name in self.callbacks

    def call(self, conn: Any, name: str, count: int = 0, offset: int = 0, flags: int = 0,
             ptr: Any = ffi.NULL, s1: Any = ffi.NULL, s2: Any = ffi.NULL) -> int:
        """Run a callback; on -1 raise ``Failure``."""
        result = int(self.lib.pynbd_cc_call(conn, OP[name], count, offset, flags, ptr, s1, s2))
        if result == -1:
            raise failure()
        return result

    def io_call(self, conn: Any, name: str, count: int = 0, offset: int = 0, flags: int = 0,
                ptr: Any = ffi.NULL) -> int:
        """``call`` for a client: a failure becomes an OSError with the plugin's errno."""
        result = int(self.lib.pynbd_cc_call(conn, OP[name], count, offset, flags, ptr,
                                            ffi.NULL, ffi.NULL))
        if result == -1:
            raise self.io_failure(name, failure())
        return result

    def io_failure(self, name: str, fail: Failure) -> OSError:
        if not fail.called:
            log.error("%s: %s failed without calling nbdkit_error (%s)", self.name, name,
                      os.strerror(fail.err))
        else:  # as nbdkit does, the plugin's message goes to the log
            log.error("%s: %s: error: %s", self.name, name, fail.message)
        return io_error(fail.err, f"{self.name}: {name}: {fail.message}" if fail.message
                        else f"{self.name}: {name}")

    def configure(self, name: str, **args: Any) -> int:
        """A start-up callback; a failure becomes a ConfigError with the plugin's message."""
        try:
            return self.call(self.global_conn, name, **args)
        except Failure as fail:
            why = fail.message or f"failed without calling nbdkit_error ({os.strerror(fail.err)})"
            raise ConfigError(f"{self.name}: {name}: {why}") from None
