"""Filters that change no data, only when (or whether) calls may pass.

    class PauseConnection(GuardedConnection["PauseFilter"]):
        def guard(self) -> AbstractContextManager[object]:
            return self.filter.gate.request()     # waits while paused

    class ReadonlyConnection(GuardedConnection["ReadonlyFilter"]):
        guarded = frozenset({"pwrite", "zero", "trim"})
        def guard(self) -> AbstractContextManager[object]:
            self.refuse_if_read_only()            # raises to refuse the call
            return NO_GUARD

Each call named in ``guarded`` (every per-request call by default) runs
inside ``guard()`` and is then passed to the layer below unchanged; extents
are gathered inside it too. Calls not in ``guarded`` are passed through by
the layer boundary itself, at no cost.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar, TypeVar

from .connection import DATA_METHODS, Buffer, ContextExtent, Extent, FilterConnection

F = TypeVar("F")
NO_GUARD: AbstractContextManager[object] = contextlib.nullcontext()


class GuardedConnection(FilterConnection[F], abc.ABC):
    """See the module docstring."""

    guarded: ClassVar[frozenset[str]] = DATA_METHODS

    @abc.abstractmethod
    def guard(self) -> AbstractContextManager[object]:
        """What a guarded call runs in; raise here to refuse the call."""

    def passes_through(self) -> frozenset[str]:
        return super().passes_through() | (DATA_METHODS - self.guarded)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        with self.guard():
            self.next.pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        with self.guard():
            return self.next.pread_buffers(count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        with self.guard():
            self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        with self.guard():
            self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        with self.guard():
            self.next.trim(count, offset, flags)

    def flush(self, flags: int) -> None:
        with self.guard():
            self.next.flush(flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        with self.guard():
            self.next.cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        with self.guard():
            return list(self.next.extents(count, offset, flags))

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
        with self.guard():
            return list(self.next.block_status(context, count, offset, flags))
