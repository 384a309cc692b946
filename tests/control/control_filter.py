"""counting: a test filter that offers control commands (loaded by path).

    pynbd serve --control=CTL --filter=tests/control/control_filter.py memory 1M

It counts the reads and writes that pass through it, and registers:

    counter show           {"reads": N, "writes": N}
    counter reset          null
    note add TEXT          adds a note; returns how many there are
    note list              [{"n": 1, "text": ...}, ...]
    echo [WORDS...]        the words back, as a list
    fail refuse            a refusal (ControlError)
    fail crash             a bug (RuntimeError)
    fail unjsonable        a result that is not JSON (a set)
    fail block             waits until "fail release" (a slow command)
    fail release           lets "fail block" return

``clash=true`` also registers ``status``, which the server already has;
``unlistable=true`` makes listing the exports fail (EHOSTUNREACH).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence

from pynbd.backend import (
    Command,
    ControlError,
    Export,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)


class CountingConnection(FilterConnection["CountingFilter"]):
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.filter.count("reads")
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.filter.count("writes")
        self.next.pwrite(buf, offset, flags)


class CountingFilter(Filter):
    name = "counting"
    params = (Param("clash", "bool", "also register 'status'", default=False),
              Param("unlistable", "bool", "listing exports fails", default=False))
    connection = CountingConnection
    clash: bool
    unlistable: bool

    def list_exports(self, next_list: Callable[[OpenContext], list[Export]],
                     ctx: OpenContext) -> list[Export]:
        if self.unlistable:
            raise io_error(errno.EHOSTUNREACH, "listing exports")
        return next_list(ctx)

    def get_ready(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"reads": 0, "writes": 0}
        self.notes: list[str] = []
        self.released = threading.Event()

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def control_commands(self) -> Sequence[Command]:
        commands = [
            Command(("counter", "show"), (), "reads and writes seen", self.show),
            Command(("counter", "reset"), (), "start counting again", self.reset),
            Command(("note", "add"), ("TEXT",), "remember a note", self.add_note),
            Command(("note", "list"), (), "the notes", self.list_notes),
            Command(("echo",), ("*WORDS",), "the words back", lambda *words: list(words)),
            Command(("fail", "refuse"), (), "a refusal", self.refuse),
            Command(("fail", "crash"), (), "a bug", self.crash),
            Command(("fail", "unjsonable"), (), "not JSON", lambda: {1, 2}),
            Command(("fail", "block"), (), "wait for release", lambda: self.released.wait(30)),
            Command(("fail", "release"), (), "release block", self.released.set),
        ]
        if self.clash:
            commands.append(Command(("status",), (), "a clash", self.show))
        return commands

    def show(self) -> object:
        with self.lock:
            return dict(self.counts)

    def reset(self) -> None:
        with self.lock:
            self.counts = {"reads": 0, "writes": 0}

    def add_note(self, text: str) -> int:
        with self.lock:
            self.notes.append(text)
            return len(self.notes)

    def list_notes(self) -> object:
        with self.lock:
            return [{"n": n, "text": text} for n, text in enumerate(self.notes, start=1)]

    def refuse(self) -> None:
        raise ControlError("refused on purpose")

    def crash(self) -> None:
        raise RuntimeError("a bug on purpose")
