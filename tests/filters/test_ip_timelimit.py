"""ip (clients allowed or refused by address and by Unix peer credentials,
compared with nbdkit) and time-limit (a connection dropped after its time)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from stack_helpers import BOTH

from nbdtest import PYNBD, nbdsh, run, served, wait_for
from pynbd.process import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_tcp(*args: str, server: str) -> Iterator[str]:
    port = free_port()
    base = [*PYNBD, "serve"] if server == "pynbd" else ["nbdkit"]
    proc = subprocess.Popen([*base, "-f", "-i", "127.0.0.1", "-p", str(port), *args],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def accepts() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(accepts)
        yield f"nbd://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def served_ok(uri: str) -> bool:
    return run(["nbdinfo", "--size", uri], check=False).returncode == 0


@pytest.mark.parametrize("rules, expected", [
    (["allow=anyipv6", "deny=all"], False), (["allow=anyipv4", "deny=all"], True),
    (["allow=allunix", "deny=any"], False), (["deny=allipv6"], True),
])
def test_tcp_keyword_rules_match_nbdkit(rules, expected):
    outcomes = []
    for server in BOTH:
        with served_tcp("--filter=ip", "memory", "1M", *rules, server=server) as uri:
            outcomes.append((served_ok(uri), served_ok(uri)))  # a refusal leaves the server serving
    assert outcomes[0] == outcomes[1] == (expected, expected)


@pytest.mark.parametrize("rules, expected", [
    (["allow=127.0.0.1", "deny=all"], True), (["deny=127.0.0.0/8"], False),
    (["deny=10.0.0.0/8,::1"], True), (["allow=::1", "allow=127.0.0.2", "deny=all"], False),
])
def test_tcp_address_rules(rules, expected):
    # (pynbd only: Debian's nbdkit 1.32 cannot parse an IPv4 address in a rule)
    with served_tcp("--filter=ip", "memory", "1M", *rules, server="pynbd") as uri:
        assert (served_ok(uri), served_ok(uri)) == (expected, expected)


@pytest.mark.parametrize("server", BOTH)
def test_unix_credentials(server):
    uid, gid = os.getuid(), os.getgid()
    for rules, expected in (([f"allow=uid:{uid}", "deny=all"], True),
                            ([f"allow=uid:{uid + 4242}", "deny=all"], False),
                            ([f"allow=gid:{gid}", "deny=all"], True),
                            (["deny=anyunix"], False), (["deny=anyipv4"], True)):
        with served("--filter=ip", "memory", "1M", *rules, server=server) as srv:
            assert served_ok(srv.uri) is expected, (rules, server)


def test_bad_rule_is_one_line():
    result = run([*PYNBD, "serve", "--filter=ip", "memory", "1M", "allow=300.1.2.3"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "allow=300.1.2.3" in err and "Traceback" not in err


def test_time_limit_drops_a_connection():
    with served("--filter=time-limit", "memory", "1M", "time-limit=1") as srv:
        start = time.monotonic()
        result = run(["nbdsh", "-u", srv.uri, "-c",
                      "import time\nh.pread(512, 0)\ntime.sleep(2)\nh.pread(512, 0)"], check=False)
        assert result.returncode != 0 and time.monotonic() - start >= 1
        assert nbdsh(srv.uri, "print(len(h.pread(512, 0)))").strip() == "512"  # a new client is fine


def test_time_limit_drops_an_idle_connection():
    with served("--filter=time-limit", "memory", "1M", "time-limit=500ms") as srv:
        client = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c",
                                   "print(1, flush=True)\nimport sys; sys.stdin.read()\n"
                                   "h.pread(512, 0)"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert client.stdout is not None and client.stdout.readline() == b"1\n"
        time.sleep(1)  # idle past the limit: the server hangs up meanwhile
        _, err = client.communicate(b"", timeout=30)
        assert client.returncode != 0
