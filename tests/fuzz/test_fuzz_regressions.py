"""Every bug the fuzzer found, with the input that found it.

1. ``pynbd copy`` from a server that claims an export of 2**64 - 1 bytes died
   with ``OverflowError: Python int too large to convert to C long`` (a
   traceback) while sizing its destination file. Found by ``client-copy``
   (fuzz_live.ToolTarget): the recorded conversation of a real copy with
   NBD_INFO_EXPORT's size replaced. The client handshake now refuses sizes
   over 2**63 - 1 as libnbd does, so every tool reports one line.
"""

from __future__ import annotations

import struct

import pytest
from fuzz_live import ToolTarget

from nbdtest import wait_for
from pynbd.proto.client_handshake import ClientHandshake, HandshakeConfig
from pynbd.proto.errors import RemoteProtocolError
from pynbd.proto.machine import NeedData

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9


@pytest.fixture(scope="module")
def copy_target():
    target = ToolTarget("copy")
    yield target
    target.close()


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 1])
def test_copy_from_a_server_claiming_an_impossible_size(copy_target, size):
    data = copy_target.with_size(size)
    assert data != copy_target.recorded
    status, message = copy_target.run(data)  # a Finding (or any exception) fails the test
    assert status == 1
    assert "server claims" in message


def test_largest_size_is_still_accepted(copy_target):
    status, _ = copy_target.run(copy_target.with_size((1 << 63) - 1))
    assert status == 1  # the destination file cannot be that large: one line, no traceback


def handshake_with_size(size: int) -> ClientHandshake:
    """A client that sent NBD_OPT_GO and gets an NBD_INFO_EXPORT of ``size`` bytes."""
    hs = ClientHandshake(HandshakeConfig(structured_replies=False, extended_headers=False,
                                         full_info=False))
    server = [struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3),
              struct.pack(">QIII", REPLY_MAGIC, 7, 3, 12) + struct.pack(">HQH", 0, size, 1)]
    stream = b"".join(server)
    while True:
        event = hs.next_event()
        if isinstance(event, NeedData):
            hs.receive_data(stream[:event.size])
            stream = stream[event.size:]


def test_client_handshake_refuses_sizes_over_int64_max():
    with pytest.raises(RemoteProtocolError, match="export of 18446744073709551615 bytes"):
        handshake_with_size((1 << 64) - 1)


def test_cow_export_names_cannot_pile_up_overlays():
    """2. The live-cow target (its health check) found a server holding one more file
    descriptor per distinct export name clients had asked for: 500 names, 500 fds."""
    import os

    import pynbd
    from pynbd.client import NBD

    with pynbd.serve("memory", "1M", filters=["cow"], subprocess=True) as served:
        def fds() -> int:
            return len(os.listdir(f"/proc/{served.pid}/fd"))

        h = NBD()
        h.connect_uri(served.uri)  # the default export's overlay, kept for the server's life
        h.shutdown()
        before = fds()
        for i in range(100):
            h = NBD()
            h.connect_uri(f"nbd+unix:///name{i}?socket={served.socket}")
            h.shutdown()
        wait_for(lambda: fds() - before < 10, timeout=3,
                 message=lambda: f"{fds() - before} more descriptors after 100 export names")
