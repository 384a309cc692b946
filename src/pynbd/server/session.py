"""One client connection's life: handshake, transmission, close.

``Session.run`` drives the sans-IO handshake (``proto.server_handshake``)
over the client's ``Channel``, answering its questions from the stack
(``StackCatalog``: list the exports, open one). When the handshake is over it
builds the transmission phase from three parts:

- the protocol core, ``ServerTransmission``, holding what the client was told;
- a ``RequestRunner`` that checks, runs and answers each request on the
  stack's top layer;
- a ``RequestReader`` that receives requests in batches and hands each to the
  runner directly (inline) or to a ``WorkerPool`` (see ``dispatch.plan``, the
  one rule that decides) — except reads and writes, when the stack ends in a
  plugin that answers them later (``async_requests``): those are started at
  once and answered from the plugin's thread.

It ends when the client disconnects or breaks the protocol, and always
closes the stack's layers and the socket. Nothing in a session's failure
reaches the server or any other session.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from ..backend import OpenContext
from ..backend.layer import Layer
from ..backend.stack import Stack
from ..proto.constants import FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES
from ..proto.errors import ProtocolError
from ..proto.machine import NeedData, Send
from ..proto.server_handshake import (
    Closed,
    ListExports,
    ListMetaContexts,
    OpenExport,
    Ready,
    ServerHandshake,
    StartTLS,
)
from ..proto.server_transmission import ServerTransmission, Terms
from .async_requests import AsyncRequestPath, async_plugin
from .catalog import StackCatalog, UnknownExport
from .channel import Channel, ClientGone, ReplyBatch
from .dispatch import Dispatch, WorkerPool, serialized
from .reader import RequestReader
from .runner import RequestRunner

log = logging.getLogger("pynbd.server")

DEFAULT_HANDSHAKE_TIMEOUT = 60.0  # seconds a client has to finish the handshake (--timeout)


@dataclass
class SessionConfig:
    """What every session of one server shares."""

    stack: Stack
    dispatch: Dispatch
    readonly: bool = False
    tls: str = "off"
    ssl_context: ssl.SSLContext | None = None
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT  # --timeout (None: no limit)
    keepalive: bool = False  # --keepalive: TCP keepalives on clients' sockets
    exportname: str | None = None  # -e: the only name served
    description: str = ""
    global_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES  # --mask-handshake
    structured_replies: bool = True  # --no-sr: False
    meta_contexts: bool = True  # --no-meta-contexts: False


class Session:
    """Serves one connected client until it disconnects."""

    def __init__(self, sock: socket.socket, config: SessionConfig, address: object = None) -> None:
        self.channel = Channel(sock, address)
        self.config = config
        self.address = address
        self.ending = threading.Event()  # set when the client goes or the server stops (ctx.extra)
        self.top: Layer | None = None  # the opened stack, once the client chose an export

    def run(self) -> None:
        """Handshake, serve, clean up. Never raises."""
        try:
            ready = self._timed_handshake()
            if ready is not None:
                self._transmission(ready)
        except ClientGone as exc:
            if self.channel.expired:
                log.warning("client %s did not finish the handshake in %g s; dropped", self.address,
                            self.config.handshake_timeout)
            else:
                log.debug("client %s went away: %s", self.address, exc)
        except ProtocolError as exc:
            log.warning("client %s: protocol error: %s; disconnecting", self.address, exc)
        except Exception:  # noqa: BLE001 (a session never takes the server down)
            log.exception("client %s: unexpected error", self.address)
        finally:
            self._close()

    def _timed_handshake(self) -> Ready | None:
        """The handshake, given --timeout seconds to finish (TLS handshake included)."""
        timeout = self.config.handshake_timeout
        if timeout is None:
            return self._handshake()
        self.channel.set_deadline(time.monotonic() + timeout)
        ready = self._handshake()
        self.channel.set_deadline(None)
        return ready

    def stop(self) -> None:
        """Stop serving (from another thread): the reader sees the end of the stream."""
        self.ending.set()
        self.channel.stop_reading()

    def _close(self) -> None:
        top, self.top = self.top, None
        if top is not None:
            try:
                top.close()
            except Exception:  # noqa: BLE001
                log.exception("client %s: closing the stack failed", self.address)
        self.channel.close()

    # ------------------------------------------------------------- handshake
    def _handshake(self) -> Ready | None:
        cfg = self.config
        channel = self.channel
        ctx = OpenContext(readonly=cfg.readonly, client_address=self.address,
                          peer_credentials=self.channel.peer_credentials(),
                          extra={"disconnect": self.stop,  # plugins may drop their client
                                 "ending": self.ending})  # backend.shutdown.sleep waits on it
        catalog = StackCatalog(cfg.stack, ctx, cfg.description)
        hs = ServerHandshake(tls=cfg.tls, forced_export=cfg.exportname, global_flags=cfg.global_flags,
                             structured_replies=cfg.structured_replies, meta_contexts=cfg.meta_contexts)
        channel.send([hs.greeting()])
        while True:
            event = hs.next_event()
            if isinstance(event, NeedData):
                hs.receive_data(channel.recv_bytes(event.size))
            elif isinstance(event, Send):
                channel.send([event.data])
            elif isinstance(event, ListExports):
                hs.exports_listed(catalog.list_exports())
            elif isinstance(event, OpenExport):
                self._open(catalog, hs, event)
            elif isinstance(event, ListMetaContexts):
                hs.meta_contexts_listed(catalog.list_meta_contexts(event.name))
            elif isinstance(event, StartTLS):
                channel.send([event.data])
                assert cfg.ssl_context is not None, "STARTTLS accepted without a TLS context"
                channel.start_tls(cfg.ssl_context)
                ctx.tls = True
                hs.tls_established()
            elif isinstance(event, Ready):
                if event.reply:
                    channel.send([event.reply])
                return event
            elif isinstance(event, Closed):
                log.debug("client %s: handshake ended: %s", self.address, event.reason)
                if event.reply:
                    channel.send([event.reply])
                return None

    def _open(self, catalog: StackCatalog, hs: ServerHandshake, event: OpenExport) -> None:
        """Answer the handshake's OpenExport: keep the stack open for GO, else close it."""
        try:
            top, info = catalog.open_export(event.name)
        except UnknownExport as exc:
            hs.export_refused(str(exc), unknown=True)
            return
        except OSError as exc:
            hs.export_refused(f"cannot open export {event.name!r}: {exc.strerror or exc}",
                              unknown=False)
            return
        if event.keep:
            if self.top is not None:
                self.top.close()
            self.top = top
        else:
            top.close()
        hs.export_opened(info)

    # ------------------------------------------------------------- transmission
    def _transmission(self, ready: Ready) -> None:
        top = self.top
        assert top is not None, "the handshake ended without an open export"
        info = ready.export
        log.debug("client %s: serving export %r, %d bytes", self.address, info.name, info.size)
        tx = ServerTransmission(Terms(size=info.size, flags=info.flags, block_size=info.block_size,
                                      structured=ready.structured_replies,
                                      extended=ready.extended_headers, contexts=ready.meta_contexts))
        dispatch = self.config.dispatch
        channel = self.channel
        pool: WorkerPool | None = None
        batch: ReplyBatch | None = None
        if dispatch.inline:
            batch = ReplyBatch(channel)
            execute = serialized(RequestRunner(top, tx, batch.send, self.address).run,
                                 dispatch.request_lock)
        else:
            pool = WorkerPool(dispatch.workers, RequestRunner(top, tx, channel.send, self.address).run,
                              on_gone=self.stop, name=f"nbd-worker-{self.address}")
            execute = pool.submit
        reads, writes = async_plugin(self.config.stack, top)
        later = None if reads is None and writes is None else \
            AsyncRequestPath(reads, writes, tx, channel, execute, self.address)
        disconnected = False
        try:
            if later is None:
                disconnected = RequestReader(channel, tx, execute, batch).run()
            else:
                disconnected = RequestReader(channel, tx, later.execute, batch, later.reader_kick,
                                             later.completions).run()
        finally:
            self.ending.set()  # requests still sleeping (delay filter) end now
            try:
                if later is not None:
                    later.finish(disconnected)
                with contextlib.suppress(ClientGone):  # replies still queued have nobody to go to
                    if batch is not None:
                        batch.flush()
            finally:
                if pool is not None:
                    pool.close()
                self.stop()
