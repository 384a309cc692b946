"""log: write every request and its result to a file, in nbdkit's format.

    pynbd serve --filter=log file disk.img logfile=disk.log
    pynbd serve --filter=cow --filter=log file disk.img logfile=below-cow.log
    pynbd serve --filter=log memory 1G logscript='echo $type $act $offset >&2'

Parameters (logfile, logscript or both; with neither the filter logs nothing)
    logfile=FILE       where the log goes
    logappend=BOOL     append to FILE instead of truncating it (default false)
    logscript=SCRIPT   run SCRIPT (bash, else /bin/sh) for every log line, with
                       shell variables $type (ENTER, LEAVE or PRINT), $act
                       (Read, Connect, ...), $connection, $id, $return, $error
                       and the line's other fields ($offset, $count, ...,
                       ``extents`` a bash array), as nbdkit's log filter does;
                       its status is ignored, and requests wait for it

Each line starts with a local timestamp (``2024-05-01 10:12:13.123456``);
lines about one client carry ``connection=N``. A request is logged twice:
when it starts, ending in ``...``, and when it ends, starting with ``...``,
with ``return=0`` or ``return=-1 error=ENOSPC``; ``id=N`` pairs them (requests
run in parallel, so lines can interleave)::

    2024-05-01 10:12:13.000001 connection=1 Connect export="" tls=0 size=0x100000 \\
        minsize=0x0 prefsize=0x0 maxsize=0x0 write=1 flush=1 rotational=0 trim=1 \\
        zero=2 fua=2 extents=1 cache=2 fast_zero=1
    2024-05-01 10:12:13.000002 connection=1 Read id=1 offset=0x0 count=0x200 ...
    2024-05-01 10:12:13.000003 connection=1 ...Read id=1 return=0
    2024-05-01 10:12:13.000004 connection=1 Extents id=2 offset=0x0 count=0x10000 req_one=0 ...
    2024-05-01 10:12:13.000005 connection=1 ...Extents id=2 extents=(0x0 0x10000 "hole,zero") return=0
    2024-05-01 10:12:13.000006 connection=1 Disconnect transactions=2

Actions: ListExports, Ready, Fork, Connect, Read, Write (``fua=``), Zero
(``trim= fua= fast=``), Trim (``fua=``), Extents (``req_one=``), Cache, Flush,
Disconnect. Placed first, the filter shows what clients asked for; placed
lower in the stack it shows what the filters above turned that into. Each
line is flushed as it is written, so ``tail -f`` follows it live.
"""

from __future__ import annotations

import errno
import itertools
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import datetime
from typing import IO, TypeVar

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    ConfigError,
    Connection,
    Export,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    errno_of,
)

T = TypeVar("T")


def shell_quote(text: str) -> str:
    """Double-quoted as nbdkit writes strings in the log."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{escaped}"'


def describe_extent(ext: Extent) -> str:
    kind = ",".join(word for word, on in (("hole", ext.hole), ("zero", ext.zero)) if on)
    return f'0x{ext.offset:x} 0x{ext.length:x} "{kind}"'


class LogWriter:
    """One log file shared by every connection; a lock keeps lines whole."""

    def __init__(self, path: str | None, append: bool, script: str | None = None) -> None:
        self.path = path
        self.script = script
        self.append = append
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._connections = itertools.count(1)

    def new_connection(self) -> int:
        """The next connection number (itertools.count is atomic under the GIL)."""
        return next(self._connections)

    def open(self) -> None:
        with self._lock:
            self._ensure_open()

    def _ensure_open(self) -> IO[str] | None:
        """The open file (the lock is held); only the first open may truncate."""
        if self._file is None and self.path is not None:
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
            self.append = True
        return self._file

    def write(self, text: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
        with self._lock:
            out = self._ensure_open()
            if out is not None:
                out.write(f"{stamp} {text}\n")
                out.flush()
            if self.script is not None:
                _run_logscript(self.script, text)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


_FIELD = re.compile(r'([A-Za-z_]+)=(\([^)]*\)|"(?:[^"\\]|\\.)*"|\S*)')
_SHELL = shutil.which("bash") or "/bin/sh"


def _run_logscript(script: str, line: str) -> None:
    """Run ``logscript=`` for one log line, its fields set as shell variables."""
    connection, _, rest = line.partition(" ") if line.startswith("connection=") else ("", "", line)
    action, _, fields = rest.partition(" ")
    kind = "LEAVE" if action.startswith("...") else "ENTER" if fields.endswith("...") else "PRINT"
    assigns = [f"type={kind}", f"act={action.lstrip('.')}"]
    if connection:
        assigns.append(connection)
    assigns += [f"{key}={value}" for key, value in _FIELD.findall(fields)]
    subprocess.run([_SHELL, "-c", "\n".join([*assigns, script])], stdin=subprocess.DEVNULL, check=False)


class LogConnection(FilterConnection["LogFilter"]):
    def __init__(self, next: Connection, filter: LogFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.out = filter.writer
        self.prefix = f"connection={self.out.new_connection()}"
        self.ids = itertools.count(1)
        self.transactions = 0
        minimum, preferred, maximum = next.block_size()
        self.out.write(
            f"{self.prefix} Connect export={shell_quote(ctx.export_name)} "
            f"tls={int(ctx.tls)} size=0x{next.get_size():x} minsize=0x{minimum:x} "
            f"prefsize=0x{preferred:x} maxsize=0x{maximum:x} write={int(next.can_write())} "
            f"flush={int(next.can_flush())} rotational={int(next.is_rotational())} "
            f"trim={int(next.can_trim())} zero={2 if next.can_zero() else 0} "
            f"fua={int(next.can_fua())} extents={int(next.can_extents())} "
            f"cache={int(next.can_cache())} fast_zero={int(next.can_fast_zero())}")

    def _call(self, action: str, fields: str, fn: Callable[[], T],
              result: Callable[[T], str] | None = None) -> T:
        """Log the start of a request, run ``fn``, log how it ended (``result`` describes
        what it returned)."""
        request = next(self.ids)
        self.transactions += 1
        self.out.write(f"{self.prefix} {action} id={request} {fields}...")
        try:
            value = fn()
        except BaseException as exc:
            name = errno.errorcode.get(errno_of(exc), "EIO")
            self.out.write(f"{self.prefix} ...{action} id={request} return=-1 error={name}")
            raise
        described = "" if result is None else result(value)
        self.out.write(f"{self.prefix} ...{action} id={request} {described}return=0")
        return value

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._call("Read", f"offset=0x{offset:x} count=0x{len(buf):x} ",
                   lambda: self.next.pread(buf, offset, flags))

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._call("Write", f"offset=0x{offset:x} count=0x{len(buf):x} fua={_bit(flags, FLAG_FUA)} ",
                   lambda: self.next.pwrite(buf, offset, flags))

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._call("Zero", f"offset=0x{offset:x} count=0x{count:x} trim={_bit(flags, FLAG_MAY_TRIM)} "
                           f"fua={_bit(flags, FLAG_FUA)} fast={_bit(flags, FLAG_FAST_ZERO)} ",
                   lambda: self.next.zero(count, offset, flags))

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._call("Trim", f"offset=0x{offset:x} count=0x{count:x} fua={_bit(flags, FLAG_FUA)} ",
                   lambda: self.next.trim(count, offset, flags))

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._call("Cache", f"offset=0x{offset:x} count=0x{count:x} ",
                   lambda: self.next.cache(count, offset, flags))

    def flush(self, flags: int) -> None:
        self._call("Flush", "", lambda: self.next.flush(flags))

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        return self._call(
            "Extents", f"offset=0x{offset:x} count=0x{count:x} req_one={_bit(flags, FLAG_REQ_ONE)} ",
            lambda: list(self.next.extents(count, offset, flags)),
            lambda found: f"extents=({' '.join(describe_extent(e) for e in found)}) ")

    def close(self) -> None:
        try:
            self.out.write(f"{self.prefix} Disconnect transactions={self.transactions}")
        finally:
            super().close()


def _bit(flags: int, flag: int) -> int:
    return 1 if flags & flag else 0


class LogFilter(Filter):
    short_requests = True
    name = "log"
    params = (
        Param("logfile", "path", "the file the log is written to"),
        Param("logappend", "bool", "append to the file instead of truncating it", default=False),
        Param("logscript", "str", "a shell script run for every log line"),
    )
    logfile: str | None
    logappend: bool
    logscript: str | None
    connection = LogConnection

    def config_complete(self) -> None:
        self.writer = LogWriter(self.logfile, self.logappend, self.logscript)
        self.list_ids = itertools.count(1)

    def get_ready(self) -> None:
        try:
            self.writer.open()
        except OSError as exc:
            raise ConfigError(f"log: cannot open logfile {self.logfile}: {exc.strerror}") from None
        self.writer.write("Ready")

    def after_fork(self) -> None:
        self.writer.write("Fork")

    def list_exports(self, next_list: Callable[[OpenContext], list[Export]],
                     ctx: OpenContext) -> list[Export]:
        request = next(self.list_ids)
        self.writer.write(f"ListExports id={request} readonly={int(ctx.readonly)} tls={int(ctx.tls)} ...")
        try:
            exports = next_list(ctx)
        except BaseException as exc:
            name = errno.errorcode.get(errno_of(exc), "EIO")
            self.writer.write(f"...ListExports id={request} return=-1 error={name}")
            raise
        names = " ".join(shell_quote(e.name) for e in exports)
        self.writer.write(f"...ListExports id={request} exports=({names}) return=0")
        return exports

    def unload(self) -> None:
        self.writer.close()
