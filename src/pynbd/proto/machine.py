"""What the client and server handshake machines share: their two I/O events
and the plumbing of a byte-fed state machine with a table of moves.

    class MyHandshake(ByteMachine):
        transitions = {State.A: {State.B}, State.B: set()}

        def next_event(self):
            data = self._take(self._needed())   # bytes, or a NeedData event
            if isinstance(data, NeedData):
                return data
            ...
            self._goto(State.B)                 # LocalProtocolError if the table forbids it

``NeedData(size)`` asks the driver for exactly ``size`` more bytes (never
more, so the first byte of a TLS handshake or of the first request is never
swallowed); ``Send(data)`` hands it bytes for the peer. Each side adds the
events only it has (StartTLS, Ready...) in its own module.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from .errors import LocalProtocolError

S = TypeVar("S", bound=enum.Enum)


@dataclass(frozen=True)
class NeedData:
    """Feed exactly ``size`` more bytes with receive_data()."""

    size: int


@dataclass(frozen=True)
class Send:
    """Bytes to send to the peer."""

    data: bytes


class ByteMachine(Generic[S]):
    """Buffers received bytes and moves ``state`` only along ``transitions``."""

    transitions: ClassVar[Mapping[Any, Collection[Any]]] = {}

    def __init__(self, state: S) -> None:
        self.state = state
        self._buffer = b""

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def _take(self, need: int) -> bytes | NeedData:
        """The next ``need`` bytes, or the NeedData event asking for the rest."""
        if len(self._buffer) < need:
            return NeedData(need - len(self._buffer))
        data, self._buffer = self._buffer[:need], self._buffer[need:]
        return data

    def _goto(self, state: S) -> None:
        """The one place that changes state: refuses any move the table does not list
        (a bug in the machine, hence LocalProtocolError)."""
        if state not in self.transitions[self.state]:
            raise LocalProtocolError(f"handshake cannot go from {self.state.value} to {state.value}")
        self.state = state
