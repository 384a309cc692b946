"""Running one request against the stack and sending its reply.

``RequestRunner.run`` is the whole life of a request once parsed: the
protocol core (``proto.server_transmission``) checks it against what the
client was told; the top layer of the stack (a checked ``backend.Layer``)
runs it; the core frames the reply; ``send`` sends it (the reading thread's
``ReplyBatch``, or the channel itself from a worker thread).

NBD command flags become the backend's request flags here: FUA stays FUA
(a layer that only emulates FUA gets write + flush from its boundary),
write-zeroes without NO_HOLE may trim, FAST_ZERO and REQ_ONE pass on.

Every read reaches the top layer's ``pread_buffers`` or ``pread``: holes in
a read reply come only from the views of ``ZERO_BUFFER`` a layer returns,
never from asking ``extents`` behind the layers' backs.

Failures: an ``OSError`` from the stack is the request's error (its errno
mapped to the few NBD allows, its message sent in an error chunk where the
client reads chunks); any other exception is a bug in a layer — logged with
its traceback, EIO for that request, and the server carries on.
``ClientGone`` (the reply could not be sent) goes up to the caller.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import TypeVar

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    ZERO_BUFFER,
    ContextExtent,
    Extent,
    clip_extents,
)
from ..backend.layer import Layer
from ..proto.constants import BASE_ALLOCATION
from ..proto.server_transmission import (
    BLOCK_STATUS,
    CACHE,
    F_DF,
    F_FAST_ZERO,
    F_FUA,
    F_NO_HOLE,
    F_REQ_ONE,
    FLUSH,
    MAX_EXTENTS_PER_REPLY,
    READ,
    TRIM,
    WRITE,
    ZERO,
    Refusal,
    ServerTransmission,
)
from .channel import Buffer, ClientGone

log = logging.getLogger("pynbd.server")

Send = Callable[[Sequence[Buffer]], None]


class RequestRunner:
    """Runs one connection's requests on ``top`` and sends the replies with ``send``."""

    def __init__(self, top: Layer, tx: ServerTransmission, send: Send, address: object) -> None:
        self.top = top
        self.tx = tx
        self.send = send
        self.address = address
        self.size = tx.size

    def run(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
            payload: memoryview | None, scratch: bytearray) -> None:
        """Check, run and answer one request. ``scratch`` is a reusable read buffer."""
        tx = self.tx
        contexts = None
        if cmd == BLOCK_STATUS and payload is not None:  # the payload chooses the contexts
            selection = tx.block_status_selection(payload)
            if isinstance(selection, Refusal):
                self.send((tx.error(cookie, cmd, selection.errno, selection.message, offset),))
                return
            length, contexts = selection
        refusal = tx.check(flags, cmd, offset, length)
        if refusal is not None:
            log.debug("client %s: command %d at %d+%d refused: %s", self.address, cmd, offset,
                      length, refusal.message)
            self.send((tx.error(cookie, cmd, refusal.errno, refusal.message, offset),))
            return
        top = self.top
        try:
            if cmd == READ:
                self._read(cookie, offset, length, flags, scratch)
                return
            if cmd == WRITE:
                # (a write arrives without payload only when over the maximum: refused above)
                top.pwrite(payload, offset, FLAG_FUA if flags & F_FUA else 0)  # type: ignore[arg-type]
            elif cmd == ZERO:
                top.zero(length, offset, (FLAG_FUA if flags & F_FUA else 0)
                         | (0 if flags & F_NO_HOLE else FLAG_MAY_TRIM)
                         | (FLAG_FAST_ZERO if flags & F_FAST_ZERO else 0))
            elif cmd == TRIM:
                top.trim(length, offset, FLAG_FUA if flags & F_FUA else 0)
            elif cmd == FLUSH:
                top.flush(0)
            elif cmd == CACHE:
                top.cache(length, offset, 0)
            elif cmd == BLOCK_STATUS:
                self._block_status(cookie, offset, length, flags, contexts)
                return
        except ClientGone:
            raise
        except OSError as exc:
            log.debug("client %s: command %d failed: %s", self.address, cmd, exc)
            self.send((tx.error(cookie, cmd, exc.errno or errno.EIO, exc.strerror or str(exc),
                                offset),))
            return
        except Exception as exc:  # noqa: BLE001 (a bug in a layer fails one request)
            log.exception("client %s: command %d at %d+%d raised", self.address, cmd, offset, length)
            self.send((tx.error(cookie, cmd, errno.EIO, f"{type(exc).__name__}: {exc}", offset),))
            return
        self.send((tx.ok(cookie, offset),))

    def _read(self, cookie: int, offset: int, length: int, flags: int, scratch: bytearray) -> None:
        tx = self.tx
        buffers = self.top.pread_buffers(length, offset, 0)
        if buffers is not None:
            self.send(tx.read_chunks(cookie, offset, buffers, ZERO_BUFFER, not flags & F_DF))
            return
        view = memoryview(scratch)[:length] if len(scratch) >= length else memoryview(bytearray(length))
        self.top.pread(view, offset, 0)
        self.send((tx.read_header(cookie, offset, length), view))

    def _block_status(self, cookie: int, offset: int, length: int, flags: int,
                      contexts: list[int] | None) -> None:
        """Answer each negotiated context (or those ``contexts`` names) in one reply."""
        length = min(length, self.size - offset)
        if length <= 0:
            raise OSError(errno.EINVAL, "block status past the end of the export")
        req_one = bool(flags & F_REQ_ONE)
        layer_flags = FLAG_REQ_ONE if req_one else 0
        names = self.tx.terms.contexts
        answers = []
        for context_id in names if contexts is None else contexts:
            name = names[context_id]
            if name == BASE_ALLOCATION:
                descriptors = _descriptors(clip_extents(self.top.extents(length, offset, layer_flags),
                                                        offset, length, req_one))
            else:
                descriptors = _descriptors(clip_extents(self.top.block_status(name, length, offset,
                                                                              layer_flags),
                                                        offset, length, req_one))
            if not descriptors:
                raise OSError(errno.EIO, f"no {name} status at the requested offset")
            answers.append((context_id, descriptors))
        self.send((self.tx.block_status(cookie, offset, answers),))


X = TypeVar("X", Extent, ContextExtent)


def _descriptors(extents: Iterable[X]) -> list[tuple[int, int]]:
    """(length, status) pairs for a reply, at most as many as one reply may carry."""
    return [(ext.length, ext.state) for ext in islice(extents, MAX_EXTENTS_PER_REPLY)]
