"""The data language of the ``data`` plugin: parser and lazy disk images.

An expression such as ``'0 1 2 @0x1fe 0x55 0xaa'`` or ``'( 0x55 0xAA )*2048'``
is parsed and evaluated once, at configuration time, into an ``Image``: a
size and a sorted list of non-overlapping ``Segment``s. Bytes between the
segments are zeroes and count as holes. A segment takes its bytes from a
source: a ``bytes``-like object (literals, strings, files, command output)
or a ``Repeat`` of a smaller image, so ``( 0x55 0xAA )*1000000000`` is one
segment of 2 GB that costs a few bytes of memory. Reads fill a memoryview in
place with slicing and doubling copies, never byte by byte.

Semantics follow nbdkit-data-plugin(1): an expression is written at the
current offset and moves it forward; ``@`` moves the offset; the size of a
sequence is the highest offset it reached; a nested expression (group,
name, variable) is written as a whole, its holes included, so it replaces
whatever lay under it; bytes that are all zero (``0``, ``"\\0"``, ``0*N``)
are written as holes, as nbdkit writes them with a zero operation.

Errors are ``ConfigError``s of one line that name the offset in the
expression (``data: unexpected ')' at offset 14``).
"""

from __future__ import annotations

import bisect
import mmap
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from ..backend import ConfigError, fill_zero

PAGE = 32768  # the allocation granule extents are reported in, as nbdkit's sparse array
FLAT_LIMIT = 4 << 20  # periods up to this size are cached flat for fast repetition
MATERIALIZE_LIMIT = 1 << 20  # repetitions of plain bytes up to this size become plain bytes
MAX_DEPTH = 100

Buffer = bytes | bytearray | memoryview | mmap.mmap


# ---------------------------------------------------------------- images


class Repeat:
    """A source that repeats ``image`` forever (segments say how far)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.period = image.size
        self._flat: bytes | None = None

    def flat(self) -> bytes:
        """One period as bytes (computed once)."""
        if self._flat is None:
            buf = bytearray(self.period)
            self.image.read_into(memoryview(buf), 0)
            self._flat = bytes(buf)
        return self._flat

    def __repr__(self) -> str:
        return f"( {' '.join(self.image.describe())} )*"

    def read_into(self, view: memoryview, offset: int) -> None:
        n, period = len(view), self.period
        phase = offset % period
        if period > FLAT_LIMIT:
            pos = 0
            while pos < n:
                take = min(n - pos, period - phase)
                self.image.read_into(view[pos:pos + take], phase)
                pos += take
                phase = 0
            return
        flat = self.flat()
        if phase + n <= period:
            view[:] = flat[phase:phase + n]
            return
        head = min(n, period)
        first = min(head, period - phase)
        view[:first] = flat[phase:phase + first]
        view[first:head] = flat[:head - first]
        filled = head
        while filled < n:  # the first period repeats: double it in place
            take = min(filled, n - filled)
            view[filled:filled + take] = view[:take]
            filled += take

    def spans(self, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
        """Allocated (start, end, surely_nonzero) runs of [lo, hi) in source coordinates."""
        period = self.period
        if not self.image.segments:
            return
        if period <= PAGE:
            # Gaps inside are shorter than a page, so no whole page is a hole.
            yield lo, hi, self.image.has_nonzero()
            return
        k = lo // period
        while k * period < hi:
            base = k * period
            for s, e, nz in self.image.spans(max(lo - base, 0), min(hi - base, period)):
                yield s + base, e + base, nz
            k += 1


Source = bytes | bytearray | memoryview | mmap.mmap | Repeat


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    source: Source
    src_offset: int = 0

    def shifted(self, delta: int) -> Segment:
        return Segment(self.start + delta, self.end + delta, self.source, self.src_offset)

    def clipped(self, lo: int, hi: int) -> Segment:
        start, end = max(self.start, lo), min(self.end, hi)
        return Segment(start, end, self.source, self.src_offset + start - self.start)

    def view(self) -> memoryview:
        """The segment's bytes, from a source that holds them (not a Repeat)."""
        source = self.source
        if isinstance(source, Repeat):
            raise TypeError("a repeating segment has no bytes of its own")
        return memoryview(source)[self.src_offset:self.src_offset + self.end - self.start]


class Image:
    """A lazy disk: ``size`` bytes, data in ``segments``, zero holes between."""

    def __init__(self, size: int, segments: list[Segment] | None = None) -> None:
        self.size = size
        self.segments = segments or []
        self._starts = [s.start for s in self.segments]
        self._nonzero: bool | None = None

    def describe(self) -> list[str]:
        """The image as lines of ``@OFFSET DATA`` (for ``-D data.AST=1``); long data cut short."""
        lines = []
        for seg in self.segments:
            if isinstance(seg.source, Repeat):
                text = f"{seg.source!r} [{seg.src_offset}:+{seg.end - seg.start}]"
            else:
                shown = bytes(seg.view()[:32])
                text = repr(shown)[1:] + ("..." if seg.end - seg.start > 32 else "")
            lines.append(f"@{seg.start} {text}")
        lines.append(f"size {self.size}")
        return lines

    @classmethod
    def of_bytes(cls, data: Buffer, zero_is_hole: bool = True) -> Image:
        """An image of ``data``; all-zero literals are a hole, as nbdkit writes them."""
        if zero_is_hole and isinstance(data, (bytes, bytearray)) and data.count(0) == len(data):
            return cls(len(data))
        return cls(len(data), [Segment(0, len(data), data)] if len(data) else [])

    def _first_index(self, offset: int) -> int:
        i = bisect.bisect_right(self._starts, offset) - 1
        return max(i, 0)

    def covering(self, lo: int, hi: int) -> Iterator[Segment]:
        """Segments that intersect [lo, hi), clipped to it."""
        segs = self.segments
        for i in range(self._first_index(lo), len(segs)):
            seg = segs[i]
            if seg.start >= hi:
                break
            if seg.end > lo:
                yield seg.clipped(lo, hi)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes at ``offset``."""
        pos, end = offset, offset + len(view)
        for seg in self.covering(offset, end):
            if seg.start > pos:
                fill_zero(view[pos - offset:seg.start - offset])
            part = view[seg.start - offset:seg.end - offset]
            if isinstance(seg.source, Repeat):
                seg.source.read_into(part, seg.src_offset)
            else:
                part[:] = memoryview(seg.source)[seg.src_offset:seg.src_offset + len(part)]
            pos = seg.end
        if pos < end:
            fill_zero(view[pos - offset:])

    def spans(self, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
        """Allocated runs (start, end, surely_nonzero) within [lo, hi)."""
        for seg in self.covering(lo, hi):
            if isinstance(seg.source, Repeat):
                delta = seg.start - seg.src_offset
                for s, e, nz in seg.source.spans(seg.src_offset, seg.src_offset + seg.end - seg.start):
                    yield s + delta, e + delta, nz
            else:
                yield seg.start, seg.end, False

    def has_nonzero(self) -> bool:
        if self._nonzero is None:
            self._nonzero = any(self._segment_nonzero(seg) for seg in self.segments)
        return self._nonzero

    @staticmethod
    def _segment_nonzero(seg: Segment) -> bool:
        if isinstance(seg.source, Repeat):
            return seg.source.image.has_nonzero()
        part = seg.view()
        return bytes(part).count(0) != len(part)

    def sliced(self, lo: int, hi: int) -> Image:
        return Image(hi - lo, [seg.shifted(-lo) for seg in self.covering(lo, hi)])

    def resized(self, size: int) -> Image:
        return self.sliced(0, size) if size < self.size else Image(size, self.segments)

    def repeated(self, count: int) -> Image:
        total = self.size * count
        if total == 0 or not self.segments:
            return Image(total)
        if count == 1:
            return self
        seg = self.segments[0]
        if (total <= MATERIALIZE_LIMIT and len(self.segments) == 1 and seg.start == 0
                and seg.end == self.size and not isinstance(seg.source, Repeat)):
            return Image(total, [Segment(0, total, bytes(seg.view()) * count)])
        return Image(total, [Segment(0, total, Repeat(self))])


class Builder:
    """Writes images at offsets, later writes replacing earlier ones."""

    def __init__(self) -> None:
        self.offset = 0
        self.size = 0
        self.segments: list[Segment] = []
        self._run: bytearray | None = None  # bytes being appended to the last segment

    def move(self, offset: int) -> None:
        self.offset = offset
        self.size = max(self.size, offset)

    def write(self, image: Image) -> None:
        lo, hi = self.offset, self.offset + image.size
        if image.size == 0:
            return
        if self.segments and self.segments[-1].end > lo:
            self._freeze()
            self._cut(lo, hi)
            self.segments.extend(seg.shifted(lo) for seg in image.segments)
            self.segments.sort(key=lambda s: s.start)
        else:
            for seg in image.segments:
                self._append(seg.shifted(lo))
        self.move(hi)

    def _append(self, seg: Segment) -> None:
        last = self.segments[-1] if self.segments else None
        small = not isinstance(seg.source, Repeat) and seg.end - seg.start <= 4096
        if small and last is not None and last.end == seg.start and self._run is not None:
            self._run += seg.view()
            self.segments[-1] = Segment(last.start, seg.end, self._run)
            return
        self._freeze()
        if small:
            self._run = bytearray(seg.view())
            seg = Segment(seg.start, seg.end, self._run)
        self.segments.append(seg)

    def _freeze(self) -> None:
        if self._run is not None and self.segments:
            last = self.segments[-1]
            self.segments[-1] = Segment(last.start, last.end, bytes(self._run))
        self._run = None

    def _cut(self, lo: int, hi: int) -> None:
        kept: list[Segment] = []
        for seg in self.segments:
            if seg.end <= lo or seg.start >= hi:
                kept.append(seg)
                continue
            if seg.start < lo:
                kept.append(seg.clipped(seg.start, lo))
            if seg.end > hi:
                kept.append(seg.clipped(hi, seg.end))
        self.segments = kept

    def image(self) -> Image:
        self._freeze()
        return Image(self.size, self.segments)


# ---------------------------------------------------------------- parser


def error(message: str, pos: int | None = None, where: str = "") -> ConfigError:
    at = f" at offset {pos}" if pos is not None else ""
    return ConfigError(f"data: {where}{message}{at}")


_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*(?![0-9])|[1-9][0-9]*")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"(le|be)(16|32|64):")
_DELIMS = " \t\r\n()[]:*@\"<\\$#"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "\\": "\\", '"': '"', "'": "'", "?": "?"}


class Stream:
    """A ``<FILE`` or ``<(SCRIPT)`` not read yet, so a slice can limit the read."""

    def __init__(self, reader: Callable[[int | None], Buffer]) -> None:
        self.reader = reader

    def read(self, limit: int | None = None) -> Buffer:
        return self.reader(limit)


Value = Image | Stream


class Parser:
    """Recursive descent over one expression string."""

    def __init__(self, text: str, variables: Mapping[str, str], where: str = "",
                 depth: int = 0) -> None:
        self.text = text
        self.pos = 0
        self.variables = variables
        self.where = where
        self.depth = depth

    def fail(self, message: str, pos: int | None = None) -> ConfigError:
        return error(message, self.pos if pos is None else pos, self.where)

    def parse(self, scope: dict[str, Image] | None = None) -> Image:
        image = self.sequence(dict(scope or {}), closing=None)
        return image

    # -- lexical helpers

    def skip_space(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c.isspace():
                self.pos += 1
            elif c == "#":
                nl = text.find("\n", self.pos)
                self.pos = n if nl < 0 else nl + 1
            else:
                return

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def number(self, what: str, limit: int | None = None) -> int:
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            raise self.fail(f"expected a number after {what}")
        start = self.pos
        self.pos = match.end()
        self.check_delimiter()
        value = _to_int(match.group())
        if limit is not None and value > limit:
            raise self.fail(f"{what} {match.group()} is out of range 0..{limit}", start)
        return value

    def check_delimiter(self) -> None:
        c = self.peek()
        if c and c not in _DELIMS and c != "-":
            raise self.fail(f"unexpected {c!r}")

    # -- grammar

    def sequence(self, scope: dict[str, Image], closing: int | None) -> Image:
        out = Builder()
        while True:
            self.skip_space()
            c = self.peek()
            if not c:
                if closing is not None:
                    raise self.fail("unmatched '('", closing)
                return out.image()
            if c == ")":
                if closing is None:
                    raise self.fail("unexpected ')'")
                self.pos += 1
                return out.image()
            if c == "@":
                self.offset_move(out)
                continue
            start = self.pos
            value = self.postfix(self.primary(scope), scope, start)
            if value is not None:
                out.write(as_image(value))

    def offset_move(self, out: Builder) -> None:
        start = self.pos
        self.pos += 1
        kind = self.peek()
        if kind in "+-^" and kind:
            self.pos += 1
        n = self.number("@")
        if kind == "+":
            out.move(out.offset + n)
        elif kind == "-":
            if n > out.offset:
                raise self.fail(f"@-{n} goes before the start (the offset is {out.offset})", start)
            out.move(out.offset - n)
        elif kind == "^":
            if n == 0 or n & (n - 1):
                raise self.fail(f"@^{n}: the alignment must be a power of 2", start)
            out.move(-(-out.offset // n) * n)
        else:
            out.move(n)

    def primary(self, scope: dict[str, Image]) -> Value:
        c = self.peek()
        start = self.pos
        if c == "(":
            self.pos += 1
            return self.sequence(dict(scope), closing=start)
        if c == '"':
            return Image.of_bytes(self.string())
        if c == "<":
            return self.stream()
        if c == "\\":
            self.pos += 1
            name = self.name()
            if name not in scope:
                raise self.fail(f"\\{name} is not defined", start)
            return scope[name]
        if c == "$":
            return self.variable(scope)
        word = _WORD.match(self.text, self.pos)
        if word:
            self.pos = word.end()
            bits = int(word.group(2))
            value = self.number(word.group(0), (1 << bits) - 1)
            order: Literal["little", "big"] = "little" if word.group(1) == "le" else "big"
            return Image.of_bytes(value.to_bytes(bits // 8, order))
        if _NUMBER.match(self.text, self.pos):
            return Image.of_bytes(bytes((self.number("byte", 255),)))
        raise self.fail(f"unexpected {c!r}")

    def postfix(self, value: Value, scope: dict[str, Image], start: int) -> Value | None:
        while True:
            self.skip_space()
            c = self.peek()
            if c == "*":
                self.pos += 1
                self.skip_space()
                value = as_image(value).repeated(self.number("*"))
            elif c == "[":
                value = self.slice(value, start)
            elif self.text.startswith("->", self.pos):
                self.pos += 2
                self.skip_space()
                if self.peek() != "\\":
                    raise self.fail("expected \\NAME after ->")
                self.pos += 1
                scope[self.name()] = as_image(value)
                return None
            else:
                return value

    def slice(self, value: Value, start: int) -> Image:
        bracket = self.pos
        self.pos += 1
        self.skip_space()
        lo = self.number("[") if self.peek() != ":" else 0
        self.skip_space()
        if self.peek() != ":":
            raise self.fail("expected ':' in [N:M]")
        self.pos += 1
        self.skip_space()
        hi = self.number(":") if self.peek() != "]" else None
        self.skip_space()
        if self.peek() != "]":
            raise self.fail("expected ']' after [N:M]")
        self.pos += 1
        if isinstance(value, Stream):
            if hi is not None and hi < lo:
                raise self.fail(f"[{lo}:{hi}] is not a valid slice", bracket)
            value = Image.of_bytes(value.read(hi), zero_is_hole=False)
        image = value
        hi = image.size if hi is None else hi
        if lo == hi:
            return Image(0)  # an empty slice is valid wherever it points, as in nbdkit
        if not lo <= hi <= image.size:
            raise self.fail(f"[{lo}:{hi}] is not a valid slice of {image.size} bytes", bracket)
        return image.sliced(lo, hi)

    def name(self) -> str:
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.fail("expected a name after \\")
        self.pos = match.end()
        return match.group()

    def string(self) -> bytes:
        start = self.pos
        end = start + 1
        text = self.text
        while True:
            end = text.find('"', end)
            if end < 0:
                raise self.fail("unterminated string", start)
            backslashes = len(text[start + 1:end]) - len(text[start + 1:end].rstrip("\\"))
            if backslashes % 2 == 0:
                break
            end += 1
        self.pos = end + 1
        return _unescape(text[start + 1:end])

    def stream(self) -> Stream:
        start = self.pos
        self.pos += 1
        if self.peek() == "(":
            close = _matching_paren(self.text, self.pos)
            if close < 0:
                raise self.fail("unmatched '(' in <(command)", self.pos)
            command = self.text[self.pos + 1:close]
            self.pos = close + 1
            return Stream(lambda limit: run_command(command, limit, start, self.where))
        end = self.pos
        while end < len(self.text) and not self.text[end].isspace() and self.text[end] not in "[*)":
            end += 1
        path = self.text[self.pos:end]
        if not path:
            raise self.fail("expected a file name after <")
        self.pos = end
        return Stream(lambda limit: read_file(path, limit, start, self.where))

    def variable(self, scope: dict[str, Image]) -> Image:
        start = self.pos
        self.pos += 1
        match = _VAR.match(self.text, self.pos)
        if not match:
            raise self.fail("expected a variable name after $")
        self.pos = match.end()
        name = match.group()
        text = self.variables.get(name, os.environ.get(name))
        if text is None:
            raise self.fail(f"${name}: variable not found", start)
        if self.depth >= MAX_DEPTH:
            raise self.fail(f"${name}: variables nested too deeply", start)
        inner = Parser(text, self.variables, f"{self.where}${name}: ", self.depth + 1)
        return inner.parse(scope)


def _to_int(token: str) -> int:
    """C notation: 0x hexadecimal, leading 0 octal, else decimal."""
    if token[:2].lower() == "0x":
        return int(token, 16)
    return int(token, 8) if token.startswith("0") else int(token)


def as_image(value: Value) -> Image:
    if isinstance(value, Stream):
        return Image.of_bytes(value.read(), zero_is_hole=False)
    return value


def _matching_paren(text: str, open_pos: int) -> int:
    depth = 0
    for match in re.finditer(r"[()]", text[open_pos:]):
        depth += 1 if match.group() == "(" else -1
        if depth == 0:
            return open_pos + match.start()
    return -1


def _unescape(body: str) -> bytes:
    def one(code: str) -> str:
        """The character an escape stands for (``code`` is what follows the backslash)."""
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code[0] in "01234567":
            return chr(int(code, 8) & 0xFF)
        return _ESCAPES.get(code, code)
    # Escapes stand for bytes 0..255; other characters are UTF-8.
    parts = re.split(r"(\\(?:x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.))", body, flags=re.DOTALL)
    out = bytearray()
    for i, part in enumerate(parts):
        if i % 2:
            out += one(part[1:]).encode("latin-1")
        else:
            out += part.encode("utf-8")
    return bytes(out)


# ---------------------------------------------------------------- files and commands


def read_file(path: str, limit: int | None, pos: int, where: str) -> Buffer:
    """A file's bytes: regular files are mapped, others read up to ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise error(f"<{path}: {exc.strerror}", pos, where) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            mapped = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
            return memoryview(mapped)[:limit] if limit is not None else mapped
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read() if limit is None else _read_exactly(f.read, limit)
    except OSError as exc:
        raise error(f"<{path}: {exc.strerror}", pos, where) from None
    finally:
        os.close(fd)


def _read_exactly(read: Callable[[int], bytes], limit: int) -> bytes:
    chunks, got = [], 0
    while got < limit:
        chunk = read(min(limit - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


SHELL = shutil.which("bash") or "/bin/sh"


def run_command(command: str, limit: int | None, pos: int, where: str) -> bytes:
    """The output of ``bash -c command`` (``/bin/sh`` without bash), or its first ``limit`` bytes.

    bash, so that what users type at their prompt (``$((i++))``) works here too.
    """
    proc = subprocess.Popen([SHELL, "-c", command], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        data = proc.stdout.read() if limit is None else _read_exactly(proc.stdout.read, limit)
        stopped = limit is not None and len(data) >= limit
        if stopped:
            proc.kill()
    status = proc.wait()
    if status != 0 and not stopped:
        how = f"was killed by signal {-status}" if status < 0 else f"failed with exit status {status}"
        raise error(f"<(command) {how}", pos, where)
    return data


def evaluate(text: str, variables: Mapping[str, str]) -> Image:
    """Parse and evaluate a whole ``data=`` expression."""
    return Parser(text, variables).parse()
