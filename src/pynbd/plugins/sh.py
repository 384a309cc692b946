"""sh: a plugin written as a shell script (or any executable), as nbdkit-sh-plugin(3).

    pynbd serve sh ./plugin.sh [KEY=VALUE | VALUE ...]
    pynbd serve sh - <<'EOF'                       (the script on stdin)
      case "$1" in
        get_size) echo 1M ;;
        pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
        *) exit 2 ;;
      esac
    EOF

Parameters
    script=PATH     the executable (the magic parameter); ``-`` reads it from
                    stdin (run by /bin/sh unless it starts with ``#!``)
    timeout=SECONDS how long one method may run before it is killed with its
                    whole process group and the request fails (pynbd only;
                    default: no limit)
    KEY=VALUE       passed to the script as ``config KEY VALUE``, in order
    VALUE           a bare word becomes ``config MAGIC VALUE`` where MAGIC is
                    what the script's ``magic_config_key`` method prints

For every call the script runs as ``SCRIPT METHOD ARGS...`` with ``$tmpdir``
set to a directory it may keep state in (shared by all calls, removed when
the server exits). Exit status: 0 done, 1 (or 4-127) error, 2 method not
implemented, 3 false. On error the script may print an errno name first on
stderr (``echo 'ENOSPC out of room' >&2; exit 1``): the client gets that
errno, otherwise EIO; the message is logged.

Methods and arguments (readonly and tls are ``true``/``false``)
    load | unload | get_ready | after_fork | config_complete
    magic_config_key          print the key bare words stand for
    config KEY VALUE
    thread_model              print serialize_connections, serialize_all_requests
                              (the default), serialize_requests or parallel
    preconnect READONLY
    list_exports READONLY TLS print names, one a line; a first line of
                              INTERLEAVED (name, description, ...) or
                              NAMES+DESCRIPTIONS (all names, then all descriptions)
                              changes the layout
    default_export READONLY TLS
    open READONLY EXPORTNAME TLS   print the handle (default: empty)
    close H
    dump_plugin               print KEY=VALUE lines for ``--dump-plugin``
    export_description H      print the export's description (sent to clients)
    get_size H                print the size (``1M`` style allowed; required)
    block_size H              print minimum preferred maximum
    can_write | can_flush | can_trim | can_zero | can_extents | can_multi_conn |
    is_rotational | can_fast_zero H    exit 0 for true, 3 for false
    can_fua | can_cache H     print none, emulate or native
    pread H COUNT OFFSET      print exactly COUNT bytes (required)
    pwrite H COUNT OFFSET FLAGS   the data is on stdin
    flush H | trim H COUNT OFFSET FLAGS | zero H COUNT OFFSET FLAGS |
    cache H COUNT OFFSET
    extents H COUNT OFFSET FLAGS  print "OFFSET LENGTH [TYPE]" lines; TYPE is a
                              number or words hole,zero

FLAGS is a comma-separated list of fua, may_trim, req_one and fast. As in
nbdkit, a script must answer the can_* methods to get writes, flush, trim,
zero and extents called (a missing can_* means false), can_cache must print
native for cache to be called, a missing zero or one failing with
ENOTSUP/EOPNOTSUPP is emulated with pwrite, and can_fua defaults to emulate
when can_flush is true.

Bad scripts: a script that does not exist or is not executable is refused
at start-up; pread output of the wrong length, unparseable output, and a
method killed by ``timeout=`` fail that request only (EIO), and the server
goes on serving.

    pynbd serve sh ./disk.sh timeout=10
    pynbd serve -f -U - sh ./disk.sh --run 'qemu-img info "$uri"'
"""

from __future__ import annotations

import abc
import contextlib
import enum
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..backend import (
    CACHE_NONE,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    FUA_EMULATE,
    FUA_NONE,
    ConfigError,
    Connection,
    Export,
    Extent,
    OpenContext,
    Param,
    Plugin,
    ThreadModel,
    io_error,
    parse_size,
)
from ..backend.params import UNKNOWN_PAIRS

log = logging.getLogger("pynbd.plugins.sh")

_FLAG_WORDS = ((FLAG_FUA, "fua"), (FLAG_MAY_TRIM, "may_trim"), (FLAG_REQ_ONE, "req_one"),
               (FLAG_FAST_ZERO, "fast"))
_LEVELS = {"none": 0, "emulate": 1, "native": 2}
_THREAD_MODELS = {model.name.lower(): model for model in ThreadModel}
_ENOTSUP = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
_KILL_WAIT = 5.0


class Status(enum.Enum):
    OK = 0
    MISSING = 2
    FALSE = 3


def _truth(value: bool) -> str:
    return "true" if value else "false"


def flag_words(flags: int) -> str:
    """nbdkit's flags argument: ``fua,may_trim`` and so on."""
    return ",".join(word for bit, word in _FLAG_WORDS if flags & bit)


def parse_error(stderr: bytes) -> tuple[int, str]:
    """(errno, message) from a failed method's stderr: a leading errno name, else EIO."""
    text = stderr.decode(errors="replace").strip()
    word, rest = (text.split(None, 1) + ["", ""])[:2]
    name = word.upper()
    value = getattr(errno, name, None) if name.startswith("E") else None
    if isinstance(value, int):
        return value, rest.strip()
    return errno.EIO, text


def _first_line(out: bytes) -> str:
    text = out.decode(errors="replace")
    return text[:-1] if text.endswith("\n") else text


class Runner(abc.ABC):
    """Runs methods of a script as child processes, with the sh plugin's conventions.

    ``argv(method)`` says how to start a method (None: it is missing); the
    sh plugin runs one executable, the eval plugin one snippet per method.
    """

    def __init__(self, label: str, env: Mapping[str, str], timeout: float | None) -> None:
        self.label = label
        self.env = dict(env)
        self.timeout = timeout

    @abc.abstractmethod
    def argv(self, method: str) -> list[str] | None:
        """How to start ``method``; each runner (sh's script, eval's snippets) says."""

    def has(self, method: str) -> bool:
        return self.argv(method) is not None

    def run(self, method: str, *args: str, stdin: bytes | memoryview | None = None,
            quiet: frozenset[int] = frozenset()) -> tuple[Status, bytes]:
        """Run a method: (OK|MISSING|FALSE, stdout); an error raises OSError(errno)."""
        argv = self.argv(method)
        if argv is None:
            return Status.MISSING, b""
        code, out, err = self._spawn(method, [*argv, method, *args], stdin)
        if code in (0, 2, 3):
            return Status(code), out
        number, message = parse_error(err)
        if number not in quiet:
            log.error("%s: %s: %s", self.label, method, message or f"exit status {code}")
        raise io_error(number, f"{self.label}: {method}: {message or f'exit status {code}'}")

    def _spawn(self, method: str, argv: list[str], stdin: bytes | memoryview | None
               ) -> tuple[int, bytes, bytes]:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                                    start_new_session=True)
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise io_error(errno.EIO, f"{self.label}: cannot run {method}: {exc.strerror}") from None
            return self._spawn(method, ["/bin/sh", *argv], stdin)  # no #! line: a shell script
        try:
            # communicate() takes any buffer (it writes a memoryview of it); typeshed
            # says bytes, and copying a memoryview to bytes would copy the request.
            out, err = proc.communicate(stdin, timeout=self.timeout)  # type: ignore[arg-type]
        except subprocess.TimeoutExpired:
            self._kill(proc)
            log.error("%s: %s: killed after %gs (timeout=)", self.label, method, self.timeout)
            raise io_error(errno.ETIMEDOUT, f"{self.label}: {method} timed out") from None
        return proc.returncode, out, err

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group already exited
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()  # a child left its own group: do not wait on its pipes
            proc.wait()

    # ------------------------------------------------------------ typed helpers
    def expect(self, method: str, *args: str, required: bool = False,
               stdin: bytes | memoryview | None = None,
               quiet: frozenset[int] = frozenset()) -> bytes | None:
        """stdout of a method that must not answer 'false'; None if it is missing."""
        status, out = self.run(method, *args, stdin=stdin, quiet=quiet)
        if status is Status.FALSE:
            raise io_error(errno.EIO, f"{self.label}: {method} exited 3 (false), which it may not")
        if status is Status.MISSING:
            if required:
                raise io_error(errno.EIO, f"{self.label}: the {method} method is required")
            return None
        return out

    def boolean(self, method: str, *args: str, default: bool) -> bool:
        status, _ = self.run(method, *args)
        return default if status is Status.MISSING else status is Status.OK

    def configure(self, method: str, *args: str) -> bytes | None:
        """A start-up method: errors become ConfigError."""
        try:
            return self.expect(method, *args)
        except OSError as exc:
            raise ConfigError(exc.strerror or str(exc)) from None


class ScriptRunner(Runner):
    """One executable called as SCRIPT METHOD ARGS..."""

    def __init__(self, script: str, env: Mapping[str, str], timeout: float | None) -> None:
        super().__init__(f"sh: {script}", env, timeout)
        self.script = script

    def argv(self, method: str) -> list[str]:
        return [self.script]


class ShConnection(Connection):
    """A client's handle, as the script's open method printed it.

    Each ``can_*`` runs the script's method when asked: the layer boundary
    asks once per connection and remembers the answers. Only the script's
    can_flush and can_zero are kept here too, as nbdkit's sh plugin keeps
    them in its handle: can_fua and can_fast_zero fall back on them, and
    every zero request needs to know whether to run the script's zero.
    """

    def __init__(self, runner: Runner, handle: str) -> None:
        self.runner = runner
        self.h = handle
        self._can_flush: bool | None = None
        self._can_zero: bool | None = None

    def _bool(self, method: str, default: bool = False) -> bool:
        return self.runner.boolean(method, self.h, default=default)

    def _level(self, method: str, default: int) -> int:
        out = self.runner.expect(method, self.h)
        if out is None:
            return default
        word = _first_line(out).strip().lower()
        if word not in _LEVELS:
            raise io_error(errno.EIO, f"{self.runner.label}: {method} printed {word!r}, "
                                      "not none, emulate or native")
        return _LEVELS[word]

    def get_size(self) -> int:
        out = self.runner.expect("get_size", self.h, required=True)
        return self._size("get_size", _first_line(out or b""))

    def _size(self, method: str, text: str) -> int:
        try:
            return parse_size(text.strip())
        except ValueError:
            raise io_error(errno.EIO, f"{self.runner.label}: {method} printed {text!r}, "
                                      "not a size") from None

    def block_size(self) -> tuple[int, int, int]:
        out = self.runner.expect("block_size", self.h)
        if out is None:
            return (0, 0, 0)
        words = out.decode(errors="replace").split()
        if len(words) != 3:
            raise io_error(errno.EIO, f"{self.runner.label}: block_size printed {words!r}, "
                                      "not three sizes")
        minimum, preferred, maximum = (self._size("block_size", w) for w in words)
        return minimum, preferred, maximum

    def can_write(self) -> bool:
        return self._bool("can_write")

    def can_flush(self) -> bool:
        if self._can_flush is None:
            self._can_flush = self._bool("can_flush")
        return self._can_flush

    def can_trim(self) -> bool:
        return self._bool("can_trim")

    def _zero_method(self) -> bool:
        """The script's can_zero: whether its zero method is tried."""
        if self._can_zero is None:
            self._can_zero = self._bool("can_zero")
        return self._can_zero

    def can_zero(self) -> bool:
        self._zero_method()  # asked now, as nbdkit does, so that its failure fails the open
        return True  # without the script's zero, zeroes are written with pwrite

    def can_extents(self) -> bool:
        return self._bool("can_extents")

    def can_multi_conn(self) -> bool:
        return self._bool("can_multi_conn")

    def is_rotational(self) -> bool:
        return self._bool("is_rotational")

    def export_description(self) -> str:
        out = self.runner.expect("export_description", self.h)
        return "" if out is None else _first_line(out).strip()

    def can_fast_zero(self) -> bool:
        status, _ = self.runner.run("can_fast_zero", self.h)
        if status is Status.MISSING:  # as nbdkit: fast when zeroes are emulated (they fail at once)
            return not self._zero_method()
        return status is Status.OK

    def can_fua(self) -> int:
        return self._level("can_fua", FUA_EMULATE if self.can_flush() else FUA_NONE)

    def can_cache(self) -> int:
        return self._level("can_cache", CACHE_NONE)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        out = self.runner.expect("pread", self.h, str(len(buf)), str(offset), required=True) or b""
        if len(out) != len(buf):
            message = (f"{self.runner.label}: pread printed {len(out)} bytes, "
                       f"{len(buf)} were asked for")
            log.error("%s", message)
            raise io_error(errno.EIO, message)
        buf[:] = out

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if self.runner.expect("pwrite", self.h, str(len(buf)), str(offset), flag_words(flags),
                              stdin=buf) is None:
            raise io_error(errno.EROFS, f"{self.runner.label}: pwrite is not implemented")

    def flush(self, flags: int) -> None:
        self.runner.expect("flush", self.h)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.runner.expect("trim", self.h, str(count), str(offset), flag_words(flags))

    def zero(self, count: int, offset: int, flags: int) -> None:
        if self._zero_method():
            try:
                if self.runner.expect("zero", self.h, str(count), str(offset), flag_words(flags),
                                      quiet=_ENOTSUP) is not None:
                    return
            except OSError as exc:
                if exc.errno not in _ENOTSUP:
                    raise
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, f"{self.runner.label}: zero is not faster than writing")
        super().zero(count, offset, flags & ~FLAG_FAST_ZERO)

    def cache(self, count: int, offset: int, flags: int) -> None:
        # Called only when can_cache said native; the boundary emulates the rest.
        self.runner.expect("cache", self.h, str(count), str(offset))

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        out = self.runner.expect("extents", self.h, str(count), str(offset), flag_words(flags))
        if out is None:
            raise io_error(errno.EIO, f"{self.runner.label}: can_extents is true "
                                      "but there is no extents method")
        found = [self._extent(line) for line in out.decode(errors="replace").splitlines()
                 if line.strip()]
        if not found:
            raise io_error(errno.EIO, f"{self.runner.label}: extents printed nothing")
        return found

    def _extent(self, line: str) -> Extent:
        words = line.split()
        if len(words) < 2:
            raise io_error(errno.EIO, f"{self.runner.label}: extents: cannot parse {line!r}")
        start, length = self._size("extents", words[0]), self._size("extents", words[1])
        kind = words[2] if len(words) > 2 else "0"
        bits = int(kind) if kind.isdigit() else (1 if "hole" in kind else 0) | (2 if "zero" in kind else 0)
        return Extent(start, length, bool(bits & 1), bool(bits & 2))

    def close(self) -> None:
        try:
            self.runner.run("close", self.h)
        except OSError as exc:
            log.debug("%s: close: %s", self.runner.label, exc)


def parse_exports(out: bytes) -> list[Export]:
    """list_exports output: NAMES (default), INTERLEAVED or NAMES+DESCRIPTIONS."""
    lines = out.decode(errors="replace").splitlines()
    mode = lines[0] if lines else ""
    if mode == "INTERLEAVED":
        body = lines[1:]
        return [Export(body[i], body[i + 1] if i + 1 < len(body) else "")
                for i in range(0, len(body), 2)]
    if mode == "NAMES+DESCRIPTIONS":
        body = lines[1:]
        half = (len(body) + 1) // 2
        names, descriptions = body[:half], body[half:]
        return [Export(name, descriptions[i] if i < len(descriptions) else "")
                for i, name in enumerate(names)]
    return [Export(name) for name in (lines[1:] if mode == "NAMES" else lines)]


class ShPlugin(Plugin):
    name = "sh"
    magic_param: ClassVar[str | None] = "script"  # (eval, a subclass, has none)
    params: ClassVar[Sequence[Param]] = (
        Param("script", "str", "the executable to run for each method ('-': read from stdin)",
              required=True),
        Param("timeout", "duration", "kill a method that runs longer than this (pynbd only)"),
    )
    accept_unknown_params = True

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        values = dict(values or {})
        self.tmpdir = tempfile.mkdtemp(prefix="pynbd-sh")
        self.timeout: float | None = values.get("timeout")
        self._thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS
        try:
            self.runner = self.make_runner(values)
            self.load()
            for key, value in self.user_pairs(values.get(UNKNOWN_PAIRS, [])):
                self._config(key, value)
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise

    def env(self) -> dict[str, str]:
        return {**os.environ, "tmpdir": self.tmpdir}

    def make_runner(self, values: Mapping[str, Any]) -> Runner:
        return ScriptRunner(self._script_path(values["script"]), self.env(), self.timeout)

    def _script_path(self, script: str) -> str:
        if script == "-":
            path = os.path.join(self.tmpdir, "inline-script")
            with open(path, "wb") as f:
                f.write(sys.stdin.buffer.read())
            os.chmod(path, stat.S_IRWXU)
            return path
        path = os.path.abspath(script)
        if not os.path.exists(path):
            raise ConfigError(f"sh: script {script!r} does not exist")
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ConfigError(f"sh: script {script!r} is not executable (try: chmod +x {script})")
        return path

    def dump_plugin(self) -> list[str]:
        """The script's dump_plugin method prints its own lines (nbdkit-sh-plugin(3))."""
        runner: Runner | None = getattr(self, "runner", None)  # None: not configured
        out = runner.configure("dump_plugin") if runner is not None else None
        return out.decode(errors="replace").splitlines() if out else []

    def load(self) -> None:
        self.runner.configure("load")
        out = self.runner.configure("magic_config_key")
        self.magic_key = _first_line(out).strip() if out else ""

    def user_pairs(self, pairs: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
        return pairs

    def _config(self, key: str, value: str) -> None:
        if key == "":
            if not self.magic_key:
                raise ConfigError(f"{self.runner.label}: expected key=value, got {value!r} "
                                  "(the script has no magic_config_key)")
            key = self.magic_key
        try:
            status, _ = self.runner.run("config", key, value)
        except OSError as exc:
            raise ConfigError(exc.strerror or str(exc)) from None
        if status is Status.MISSING:
            raise ConfigError(f"{self.runner.label}: parameter {key}={value} given, but the "
                              "script has no config method to take it")
        if status is Status.FALSE:
            raise ConfigError(f"{self.runner.label}: config {key} exited 3 (false)")

    def config_complete(self) -> None:
        self.runner.configure("config_complete")
        out = self.runner.configure("thread_model")
        if out is not None:
            word = _first_line(out).strip().lower().replace("-", "_")
            self._thread_model = _THREAD_MODELS.get(word, ThreadModel.SERIALIZE_ALL_REQUESTS)

    def get_thread_model(self) -> ThreadModel:
        return self._thread_model

    def get_ready(self) -> None:
        self.runner.configure("get_ready")

    def after_fork(self) -> None:
        self.runner.configure("after_fork")

    def unload(self) -> None:
        try:
            self.runner.run("unload")
        except OSError as exc:
            log.debug("%s: unload: %s", self.runner.label, exc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _preconnect(self, ctx: OpenContext) -> None:
        if not ctx.extra.get("sh.preconnected"):
            ctx.extra["sh.preconnected"] = True
            self.runner.expect("preconnect", _truth(ctx.readonly))

    def list_exports(self, ctx: OpenContext) -> list[Export]:
        self._preconnect(ctx)
        out = self.runner.expect("list_exports", _truth(ctx.readonly), _truth(ctx.tls))
        return super().list_exports(ctx) if out is None else parse_exports(out)

    def default_export(self, ctx: OpenContext) -> str:
        self._preconnect(ctx)
        out = self.runner.expect("default_export", _truth(ctx.readonly), _truth(ctx.tls))
        if out is None:
            return ""
        exports = parse_exports(out)
        return exports[0].name if exports else ""

    def open(self, ctx: OpenContext) -> Connection:
        self._preconnect(ctx)
        out = self.runner.expect("open", _truth(ctx.readonly), ctx.export_name, _truth(ctx.tls))
        return ShConnection(self.runner, "" if out is None else _first_line(out))


PLUGIN = ShPlugin
