"""Exceptions raised by the sans-IO protocol core."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something the NBD protocol does not allow.

    The message says what was expected and what arrived; the connection
    that raised it cannot be used any further.
    """
