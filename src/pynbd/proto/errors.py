"""Exceptions raised by the sans-IO protocol core, the h11 way.

Two different things go wrong with a protocol state machine, and callers
handle them differently, so they are two classes:

- ``RemoteProtocolError``: the **peer** sent something the NBD protocol does
  not allow (a bad magic, a truncated option, a payload over the limit). The
  connection is finished; log it and drop the peer.
- ``LocalProtocolError``: **our own code** used the machine wrongly (fed data
  after the handshake ended, answered a question that was not asked, called
  on after an earlier error). That is a bug in the caller.

Both derive from ``ProtocolError``. A state machine that raises either moves
to its error state, and every later call raises ``LocalProtocolError`` naming
the original failure: a half-processed protocol never silently carries on.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Something broke the NBD protocol; see the two subclasses."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the NBD protocol does not allow.

    The message says what was expected and what arrived; the connection
    that raised it cannot be used any further.
    """


class LocalProtocolError(ProtocolError):
    """This side misused a protocol machine (a bug in the caller)."""
