"""The transmission phase's reading loop: receive requests in batches, hand them on.

One thread per connection receives as many bytes as the socket has (a client
with 16 requests in flight usually delivers several at once), parses every
complete request in the buffer with the protocol core, and hands each to
``execute`` — the ``RequestRunner`` itself when requests run inline, or a
``WorkerPool``'s ``submit`` (see ``dispatch``). Inline replies collect in the
``ReplyBatch`` and leave together when the reader is about to wait, or
after every ``REPLIES_PER_SEND`` requests: one send per 16 replies is fewer
system calls, but the client, holding no replies, has nothing to send
meanwhile; sent in groups of 8, the client refills its queue while the
server works through the rest (measured on two cores: 4 KiB random writes at
queue depth 16, file plugin, 85k → 110k IOPS).

Write payloads reach ``execute`` as memoryviews into the receive buffer; one
larger than the buffer is received into its own. A compact write over the
maximum payload is received and dropped, and the request is refused.

Polling before sleeping (as qemu's iothreads poll, ``poll-max-ns``): a
client that sends its next request only after the reply to the last one
(synchronous I/O, queue depth 1) would have the reader fall asleep in
``recv`` after every reply and be woken for every request; on a machine
whose CPUs are otherwise idle, that wake-up costs more than serving the
request. So after a batch of one request, when the client's last request
came within ``BUSY_GAP_NS`` of the previous reply, the reader first polls
the socket (non-blocking receives) for up to ``POLL_NS`` before it sleeps.
An idle or slow client costs no CPU, and only one reader of the process
polls at a time, so polling never takes more than one CPU from the clients.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from time import perf_counter_ns

from ..proto.server_transmission import DISC, ServerTransmission
from .channel import Channel, ReplyBatch
from .dispatch import Execute

RECV_SIZE = 1 << 20  # receive buffer; larger write payloads get their own
REPLIES_PER_SEND = 8  # inline replies leave at least this often within a batch
POLL_NS = 50_000  # how long a reader polls for the next request before it sleeps
BUSY_GAP_NS = 1_000_000  # a client whose requests came closer than this gets polled for
POLL_SLOT = threading.Lock()  # held by the one reader of the process that polls


class RequestReader:
    """Reads one connection's requests until NBD_CMD_DISC or the end of the stream.

    ``batch`` is the inline replies' arena (None when workers send replies).
    ``kick``, when requests are answered later (``async_requests``), is called
    whenever the batch is flushed: it sends the requests started meanwhile.
    """

    def __init__(self, channel: Channel, tx: ServerTransmission, execute: Execute,
                 batch: ReplyBatch | None, kick: Callable[[], None] | None = None,
                 completions: tuple[int, Callable[[], None], Callable[[], bool]] | None = None
                 ) -> None:
        self.channel = channel
        self.tx = tx
        self.execute = execute
        self.batch = batch
        self.kick = kick
        # completions, (fd, reap, busy): before each receive while ``busy()`` (requests
        # are in flight), wait for the client or for ``fd``, and call ``reap`` when ``fd``
        # is readable (``PolledCompletions``). With none in flight nothing can complete:
        # the reader waits in its receive alone (the signals of completions it reaped
        # while submitting would only wake it once more).
        self.reaping: tuple[select.poll, int, Callable[[], None], Callable[[], bool]] | None = None
        if completions is not None:
            poller = select.poll()
            poller.register(channel.fileno(), select.POLLIN)
            poller.register(completions[0], select.POLLIN)
            self.reaping = (poller, *completions)
        self.scratch = bytearray(RECV_SIZE)  # inline reads land here
        self.polling = False  # whether the client's requests came close together lately

    def _flush(self) -> None:
        if self.kick is not None:
            self.kick()
        if self.batch is not None:
            self.batch.flush()

    def run(self) -> bool:
        """Serve until the client disconnects: True after NBD_CMD_DISC, False at the
        end of the stream."""
        channel = self.channel
        tx = self.tx
        header_size = tx.header_size
        parse = tx.parse_request
        max_payload = tx.max_payload
        execute = self.execute
        scratch = self.scratch
        batch = self.batch
        # (Not while requests are answered on another thread: polling would take the GIL from it.)
        can_probe = batch is not None and channel.can_probe and self.kick is None
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        start = end = 0
        more_pending = False
        served = 0  # requests served since the last waiting receive
        while True:
            while end - start >= header_size:
                flags, cmd, cookie, offset, length, need = parse(buf, start)
                payload = None
                body = start + header_size
                if need:
                    if need > max_payload:
                        in_buffer = min(need, end - body)
                        self._flush()
                        self._discard(need - in_buffer)
                        start = body + in_buffer
                    elif end - body >= need:
                        payload = view[body:body + need]
                        start = body + need
                    elif header_size + need > RECV_SIZE:
                        self._flush()
                        payload = self._read_large(view[body:end], need)
                        start = end = 0
                    else:
                        break  # wait for the rest of the payload
                else:
                    start = body
                if cmd == DISC:
                    return True
                execute(flags, cmd, cookie, offset, length, payload, scratch)
                served += 1
                if not served % REPLIES_PER_SEND:
                    self._flush()
            if start == end:
                start = end = 0
            elif start and RECV_SIZE - end < RECV_SIZE // 4:
                buf[:end - start] = buf[start:end]
                end -= start
                start = 0
            if can_probe and served > 1 and not more_pending and batch is not None and batch.pending:
                # The client keeps several requests in flight: before sending
                # the replies, take whatever requests arrived meanwhile, so
                # that their replies share the same send. (With one request
                # at a time the probe would only add latency.)
                n = channel.probe(view[end:])
                if n > 0:
                    end += n
                    more_pending = True
                    continue
            lone = served == 1
            more_pending = False
            served = 0
            self._flush()
            n = self._receive(view[end:], lone)
            if n == 0:
                return False
            end += n

    def _receive(self, view: memoryview, lone: bool) -> int:
        """Wait for more bytes: poll first where that pays (module docstring), then sleep."""
        channel = self.channel
        can_poll = channel.can_probe and self.kick is None  # (see run's can_probe)
        if lone and self.polling and POLL_SLOT.acquire(blocking=False):
            try:
                deadline = perf_counter_ns() + POLL_NS
                while perf_counter_ns() < deadline:
                    n = channel.probe(view)
                    if n > 0:
                        return n
            finally:
                POLL_SLOT.release()
        reaping = self.reaping
        if reaping is not None and reaping[3]():
            self._await_client_reaping(reaping[0], reaping[1], reaping[2])
        asleep = perf_counter_ns()
        n = channel.recv_some(view)
        self.polling = can_poll and perf_counter_ns() - asleep < BUSY_GAP_NS
        return n

    def _await_client_reaping(self, poller: select.poll, fd: int, reap: Callable[[], None]) -> None:
        """Until the client's socket is readable: reap completions whenever ``fd`` is."""
        while True:
            ready = poller.poll()
            client = False
            for which, _ in ready:
                if which == fd:
                    reap()
                else:
                    client = True
            if client:
                return

    def _read_large(self, have: memoryview, length: int) -> memoryview:
        """A write payload bigger than the receive buffer, in its own buffer."""
        payload = memoryview(bytearray(length))
        payload[:len(have)] = have
        self.channel.recv_exact(payload[len(have):])
        return payload

    def _discard(self, left: int) -> None:
        """Drain an oversized write payload the server refuses."""
        sink = memoryview(self.scratch)
        while left:
            n = min(left, len(sink))
            self.channel.recv_exact(sink[:n])
            left -= n
