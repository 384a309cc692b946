"""nbdkit's rules for what a plugin made of callbacks can do.

A plugin written against nbdkit's API (a Python script for the ``python``
plugin, a C file or ``.so`` for ``cc``) answers each ``can_*`` question
with its own ``can_*`` callback when it has one; without one, nbdkit's
backend decides from the data callbacks it has: ``can_write`` is whether
there is a ``pwrite``, ``can_fua`` is "emulate" when there is a ``flush``,
zeroes are always offered (written as zero buffers without a ``zero``), a
fast zero is offered only if zeroes are not emulated, and so on.
``CallbackConnection`` implements those rules once; a subclass says how to
ask: ``has(name)`` and ``answer(name)`` (the callback's integer result).
"""

from __future__ import annotations

import abc

from ..backend import CACHE_NATIVE, CACHE_NONE, FUA_EMULATE, FUA_NONE, Connection


class CallbackConnection(Connection, abc.ABC):
    """The can_* answers of an nbdkit-style plugin (see the module docstring)."""

    # The plugin's can_zero answer, kept because can_fast_zero falls back on it
    # and every zero request needs it (nbdkit's backend keeps it too).
    _can_zero: bool | None = None

    @abc.abstractmethod
    def has(self, name: str) -> bool:
        """Whether the plugin defines the callback ``name``."""

    @abc.abstractmethod
    def answer(self, name: str) -> int:
        """Call the plugin's ``name`` callback (it has it) and return its integer answer."""

    def _bool(self, can: str, plain: str | None = None) -> bool:
        """The plugin's ``can`` callback, or whether it defines ``plain`` when it has none.
        The layer boundary asks each can_* once per connection, as nbdkit does."""
        if self.has(can):
            return self.answer(can) != 0
        return plain is not None and self.has(plain)

    def _level(self, can: str, default: int) -> int:
        return self.answer(can) if self.has(can) else default

    def zero_method(self) -> bool:
        """The plugin's can_zero: whether its zero callback is called (asked once)."""
        if self._can_zero is None:
            self._can_zero = self._bool("can_zero", "zero")
        return self._can_zero

    def can_write(self) -> bool:
        return self._bool("can_write", "pwrite")

    def can_flush(self) -> bool:
        return self._bool("can_flush", "flush")

    def can_trim(self) -> bool:
        return self._bool("can_trim", "trim")

    def can_zero(self) -> bool:
        self.zero_method()  # asked now, so that its failure fails the open
        return True  # zeroing is always offered; without the plugin's zero it is emulated

    def can_fast_zero(self) -> bool:
        if self.has("can_fast_zero"):
            return self._bool("can_fast_zero")
        return not self.zero_method()  # emulated zeroes fail fast requests at once

    def can_extents(self) -> bool:
        return self._bool("can_extents", "extents")

    def can_multi_conn(self) -> bool:
        return self._bool("can_multi_conn")

    def is_rotational(self) -> bool:
        return self._bool("is_rotational")

    def can_fua(self) -> int:
        return self._level("can_fua", FUA_EMULATE if self.has("flush") else FUA_NONE)

    def can_cache(self) -> int:
        return self._level("can_cache", CACHE_NATIVE if self.has("cache") else CACHE_NONE)
