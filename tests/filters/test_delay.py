"""delay filter: every parameter, per-operation delays, and parallel requests
delayed in parallel (four reads issued together with rdelay=2 take about 2 s).

Timings: a delay is a lower bound, asserted as such. What must not be
delayed, or not delayed twice, is compared with the delay itself — the time
it would take if it were — never with a guess at how fast this machine is.
"""

from __future__ import annotations

import textwrap

import pytest

from nbdtest import run, served

ALL_PARAMS = ["rdelay=10ms", "wdelay=0.01", "zerodelay=10ms", "trimdelay=10ms",
              "extentsdelay=10ms", "cachedelay=10ms", "delay-read=1ms", "delay-write=1ms",
              "delay-zero=1ms", "delay-trim=1ms", "delay-extents=1ms", "delay-cache=1ms",
              "delay-open=10ms", "delay-close=10ms", "fastzero=true"]


def libnbd(uri: str, body: str) -> str:
    code = ("import nbd, time\n"
            f"h.add_meta_context('base:allocation'); h.connect_uri('{uri}')\n"
            + textwrap.dedent(body))
    return run(["nbdsh", "-c", code]).stdout.decode()


def test_every_parameter_is_accepted():
    with served("--filter=delay", "memory", "1M", *ALL_PARAMS) as srv:
        out = libnbd(srv.uri, """
            h.pwrite(b"q" * 512, 0); h.zero(512, 512); h.trim(512, 1024); h.cache(512, 0)
            h.block_status(4096, 0, lambda *a: 0)
            print(h.pread(2, 0).decode())
        """)
    assert out.strip() == "qq"


def test_parallel_reads_are_delayed_in_parallel():
    delay, reads = 2.0, 4
    with served("--filter=delay", "memory", "1M", f"rdelay={delay:g}") as srv:
        out = libnbd(srv.uri, f"""
            bufs = [nbd.Buffer(4096) for _ in range({reads})]
            start = time.monotonic()
            cookies = [h.aio_pread(buf, i * 65536) for i, buf in enumerate(bufs)]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            assert all(h.aio_command_completed(c) for c in cookies)
            print(time.monotonic() - start)
        """)
    elapsed = float(out)
    assert elapsed >= delay, f"{reads} reads took {elapsed:.2f} s, less than one delay"
    # had any read waited for another to finish, they would take two delays at least
    assert elapsed < 2 * delay, f"{reads} parallel reads took {elapsed:.2f} s: some ran serially"


@pytest.mark.parametrize("param, call", [
    ("rdelay", "h.pread(512, 0)"),
    ("wdelay", "h.pwrite(b'x' * 512, 0)"),
    ("zerodelay", "h.zero(512, 0)"),
    ("trimdelay", "h.trim(512, 0)"),
    ("extentsdelay", "h.block_status(512, 0, lambda *a: 0)"),
    ("cachedelay", "h.cache(512, 0)"),
    ("delay-write", "h.pwrite(b'x' * 512, 0)"),
])
def test_each_operation_waits_its_delay(param, call):
    delay = 0.5
    with served("--filter=delay", "memory", "1M", f"{param}={delay * 1000:g}ms") as srv:
        out = libnbd(srv.uri, f"""
            start = time.monotonic()
            {call}
            print(time.monotonic() - start)
            for _ in range(3):
                start = time.monotonic()
                h.flush()
                print(time.monotonic() - start)
        """)
    delayed, *flushes = (float(x) for x in out.split())
    assert delayed >= delay
    # a delayed flush would take the delay every time; a busy machine may stall one
    assert min(flushes) < delay, f"flushes took {flushes} s: delayed too"


def test_delay_open():
    with served("--filter=delay", "memory", "1M", "delay-open=500ms") as srv:
        out = run(["nbdsh", "-c", (
            "import time; start = time.monotonic(); "
            f"h.connect_uri('{srv.uri}'); print(time.monotonic() - start)")]).stdout
    assert float(out) >= 0.5


def test_fastzero_false_refuses_fast_zero_while_delayed():
    with served("--filter=delay", "memory", "1M", "zerodelay=200ms", "fastzero=false") as srv:
        out = libnbd(srv.uri, """
            try:
                h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)
                print("succeeded")
            except nbd.Error as e:
                print(e.errnum)
            h.zero(512, 0)
            print("ok")
        """)
    assert out.split() == ["95", "ok"]  # ENOTSUP, and a slow zero still works


def test_malformed_delay_is_a_config_error():
    from nbdtest import SERVE

    result = run([*SERVE, "-f", "-U", "-", "--filter=delay", "memory", "1M", "rdelay=-1"],
                 check=False)
    assert result.returncode == 1 and "rdelay" in result.stderr.decode()
