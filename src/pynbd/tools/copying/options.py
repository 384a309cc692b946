"""The command line of ``pynbd copy``: nbdcopy's options, getopt style.

Options and the two endpoints may come in any order; ``--`` ends the
options, and ``[ CMD ARGS ... ]`` is one endpoint (a captive server) whose
words are never read as options. Long options take their value as
``--name=VALUE`` or ``--name VALUE``, short ones as ``-C4`` or ``-C 4``;
``--progress`` alone is a flag, ``--progress=FD`` names a descriptor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ...backend.params import parse_size
from ...client.uri import is_uri
from .blkhash import ALGORITHMS, DEFAULT_ALGORITHM, DEFAULT_BLOCK

KiB, MiB = 1024, 1024 * 1024
MIN_REQUEST, MAX_REQUEST = 4096, 32 * MiB
MIN_SPARSE = 512


class UsageError(Exception):
    """A bad command line: one line for the user, exit status 1."""


@dataclass(frozen=True)
class Spec:
    """What the user named as a source or destination."""

    kind: str  # "nbd", "captive", "null", "stdio" or "local"
    text: str  # as typed (the captive command joined), for messages
    command: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"[ {self.text} ]" if self.kind == "captive" else self.text


@dataclass
class CopyOptions:
    """Everything the command line decided."""

    source: Spec | None = None
    destination: Spec | None = None
    allocated: bool = False
    blkhash: tuple[str, int] | None = None  # (algorithm, block size)
    blkhash_file: str | None = None
    connections: int = 4
    destination_is_zero: bool = False
    dirty_bitmap: str | None = None
    flush: bool = False
    extents: bool = True
    progress: bool = False
    progress_fd: int | None = None
    queue_size: int = 16 * MiB
    request_size: int = 1 * MiB  # nbdcopy's is 256K; fewer, larger requests cost Python less
    requests: int = 64
    sparse: int = 4096
    synchronous: bool = False
    threads: int = 0
    verbose: bool = False
    help: bool = False
    version: bool = False
    positional: list[Spec] = field(default_factory=list)

    @property
    def requests_in_flight(self) -> int:
        """Requests per connection, bounded by the queue size as nbdcopy does."""
        return max(1, min(self.requests, self.queue_size // self.request_size))


def _positive(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError:
            raise UsageError(f"{name}: could not parse: {text}") from None
        if value < 1:
            raise UsageError(f"{name}: could not parse: {text}")
        return value
    return parse


def _request_size(text: str) -> int:
    value = _positive("--request-size")(text)
    if value & (value - 1) or not MIN_REQUEST <= value <= MAX_REQUEST:
        raise UsageError(f"--request-size: must be a power of 2 within {MIN_REQUEST}-{MAX_REQUEST}")
    return value


def _sparse(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise UsageError(f"--sparse: could not parse: {text}") from None
    if value and (value & (value - 1) or value < MIN_SPARSE):
        raise UsageError(f"--sparse: must be a power of 2 and >= {MIN_SPARSE}")
    return value


def _blkhash(text: str) -> tuple[str, int]:
    """``ALGO`` or ``ALGO/BLOCKSIZE``."""
    algorithm, slash, size = text.partition("/")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"--blkhash: unknown digest {algorithm!r} (one of {', '.join(ALGORITHMS)})")
    if not slash:
        return algorithm, DEFAULT_BLOCK
    try:
        block = parse_size(size)
    except ValueError:
        raise UsageError(f"--blkhash: could not parse block size: {size}") from None
    if block < MIN_SPARSE or block & (block - 1) or block > MAX_REQUEST:
        raise UsageError(f"--blkhash: block size must be a power of 2 within {MIN_SPARSE}-{MAX_REQUEST}")
    return algorithm, block


def _threads(text: str) -> int:
    try:
        return max(0, int(text))
    except ValueError:
        raise UsageError(f"--threads: could not parse: {text}") from None


def _progress_fd(text: str) -> int:
    if not text.isdigit():
        raise UsageError(f"--progress: expected a file descriptor number, got {text!r}")
    return int(text)


# name -> (attribute, parser); parser None means a flag set to True (or False for --no-*)
_VALUED: dict[str, tuple[str, Callable[[str], int]]] = {
    "connections": ("connections", _positive("--connections")),
    "queue-size": ("queue_size", _positive("--queue-size")),
    "request-size": ("request_size", _request_size),
    "requests": ("requests", _positive("--requests")),
    "sparse": ("sparse", _sparse),
    "threads": ("threads", _threads),
}
_FLAGS: dict[str, tuple[str, bool]] = {
    "allocated": ("allocated", True), "destination-is-zero": ("destination_is_zero", True),
    "target-is-zero": ("destination_is_zero", True), "flush": ("flush", True),
    "no-extents": ("extents", False), "progress": ("progress", True),
    "synchronous": ("synchronous", True), "verbose": ("verbose", True),
    "help": ("help", True), "version": ("version", True),
}
_SHORT = {"C": "connections", "R": "requests", "S": "sparse", "T": "threads",
          "p": "progress", "v": "verbose", "V": "version", "h": "help"}


def spec_for(text: str) -> Spec:
    """Classify one endpoint word."""
    if text == "-":
        return Spec("stdio", text)
    if text == "null:":
        return Spec("null", text)
    if is_uri(text):
        return Spec("nbd", text)
    return Spec("local", text)


class _Parser:
    def __init__(self, argv: list[str]) -> None:
        self.argv, self.i = argv, 0
        self.opts = CopyOptions()

    def parse(self) -> CopyOptions:
        only_positional = False
        while self.i < len(self.argv):
            word = self.argv[self.i]
            self.i += 1
            if word == "[":
                self._captive()
            elif only_positional or word == "-" or not word.startswith("-"):
                self.opts.positional.append(spec_for(word))
            elif word == "--":
                only_positional = True
            elif word.startswith("--"):
                self._long(word[2:])
            else:
                self._short(word[1:])
        return self.opts

    def _captive(self) -> None:
        try:
            end = self.argv.index("]", self.i)
        except ValueError:
            raise UsageError("captive server: '[' without a matching ']'") from None
        command = tuple(self.argv[self.i:end])
        if not command:
            raise UsageError("captive server: nothing between '[' and ']'")
        self.i = end + 1
        self.opts.positional.append(Spec("captive", " ".join(command), command))

    def _value(self, name: str, attached: str | None) -> str:
        if attached is not None:
            return attached
        if self.i >= len(self.argv):
            raise UsageError(f"option '{name}' requires an argument")
        self.i += 1
        return self.argv[self.i - 1]

    def _long(self, body: str) -> None:
        name, eq, value = body.partition("=")
        attached = value if eq else None
        if name == "blkhash":
            self.opts.blkhash = _blkhash(DEFAULT_ALGORITHM if attached is None else attached)
        elif name == "blkhash-file":
            self.opts.blkhash_file = self._value("--blkhash-file", attached)
        elif name == "progress" and attached is not None:
            self.opts.progress, self.opts.progress_fd = True, _progress_fd(attached)
        elif name == "dirty-bitmap":
            self.opts.dirty_bitmap = self._value("--dirty-bitmap", attached)
            if not self.opts.dirty_bitmap:
                raise UsageError("--dirty-bitmap: expected a bitmap name")
        elif name in _VALUED:
            attr, parse = _VALUED[name]
            setattr(self.opts, attr, parse(self._value(f"--{name}", attached)))
        elif name in _FLAGS and attached is None:
            attr, on = _FLAGS[name]
            setattr(self.opts, attr, on)
        elif name in _FLAGS:
            raise UsageError(f"option '--{name}' doesn't allow an argument")
        else:
            raise UsageError(f"unrecognized option '--{name}'")

    def _short(self, cluster: str) -> None:
        for k, letter in enumerate(cluster):
            name = _SHORT.get(letter)
            if name is None:
                raise UsageError(f"invalid option -- '{letter}'")
            if name in _VALUED:
                rest = cluster[k + 1:] or None
                attr, parse = _VALUED[name]
                setattr(self.opts, attr, parse(self._value(f"-{letter}", rest)))
                return
            attr, on = _FLAGS[name]
            setattr(self.opts, attr, on)


def parse_args(argv: list[str]) -> CopyOptions:
    """Parse the command line; UsageError for anything wrong with it."""
    opts = _Parser(list(argv)).parse()
    if opts.help or opts.version:
        return opts
    if len(opts.positional) != 2:
        raise UsageError("expected two arguments, SOURCE and DESTINATION; see --help")
    opts.source, opts.destination = opts.positional
    if opts.source.kind == "null":
        raise UsageError("null: can only be the destination")
    if opts.blkhash_file is not None and opts.blkhash is None:
        opts.blkhash = DEFAULT_ALGORITHM, DEFAULT_BLOCK
    if opts.blkhash is not None and opts.blkhash_file is None and opts.destination.kind == "stdio":
        raise UsageError("--blkhash would be printed into the copy on stdout: use --blkhash-file")
    if opts.blkhash is not None and opts.dirty_bitmap is not None:
        raise UsageError("--blkhash needs the whole image: it cannot go with --dirty-bitmap")
    return opts
