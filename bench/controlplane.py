"""The control plane's cost to the data path: fio while a client keeps asking for status.

``control_workloads`` is called by ``run.py``'s ``build()``. Both variants
serve memory 1G filled with the same data; the first with
``--control=PATH`` and one control client asking ``status`` 100 times a
second (far more than a monitoring tool would) for the whole fio run; the
second with no control socket. Target: at least 0.95× (a control client
costs the exports next to nothing: measured on an idle server, a status
request takes about 0.2 ms of the server's CPU, 2% of a core at 100 a
second). A client asking back to back with no pause is another matter:
under the interpreter lock its commands take time from the requests'
threads (0.74× once on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import workloads as w
from servers import ServerSpec, pynbd, running

STATUS = b'{"command": ["status"]}\n'
INTERVAL = 0.01  # seconds between requests


@contextmanager
def polling(path: str) -> Iterator[list[int]]:
    """A client asking ``status`` every INTERVAL seconds; yields [requests answered]."""
    stop = threading.Event()
    answered = [0]

    def poll() -> None:
        with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rb") as replies:
            sock.connect(path)
            while not stop.wait(INTERVAL):
                sock.sendall(STATUS)
                assert "ok" in json.loads(replies.readline())
                answered[0] += 1

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield answered
    finally:
        stop.set()
        thread.join(30)


def control_measure(spec: ServerSpec, control: str | None, data: str,
                    client: Callable[[str], float]) -> Callable[[], float]:
    def measure() -> float:
        with running(spec, "unix") as srv:
            w.fill(srv.uri, data)
            if control is None:
                return client(srv.uri)
            with polling(control) as answered:
                result = client(srv.uri)
            assert answered[0] > 0
            return result
    return measure


def control_workloads(tmp: str, data: str, runtime: float,
                      workload: Callable[..., object], variant: Callable[..., object]) -> list[object]:
    """fio 4k randread qd16 on memory: polled --control ≥ 0.95× no control socket."""
    control = os.path.join(tmp, "bench.ctl")
    with_control = pynbd("pynbd memory, ctl polling", f"--control={control}", "memory", "1G")
    bare = pynbd("pynbd memory", "memory", "1G")

    def client(uri: str) -> float:
        return w.fio(uri, "randread", "4k", 16, 1, runtime)

    return [workload("control plane polled: memory fio randread 4k qd16 j1 [unix]", "IOPS", [
        variant(with_control.label, control_measure(with_control, control, data, client)),
        variant(bare.label, control_measure(bare, None, data, client))], 0.95)]
