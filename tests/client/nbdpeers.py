"""Servers nobody here wrote, for client and tool tests: qemu-nbd, nbd-server, TLS keys.

    from client.nbdpeers import qemu_nbd, nbd_server, make_qcow2, make_pki
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nbdtest import run, wait_for, wait_for_socket


def make_qcow2(directory: Path) -> Path:
    """A 4 MiB qcow2 with 64 KiB of 0x01 at 0 and a zeroed cluster at 1 MiB."""
    image = directory / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 1M 64k", str(image)])
    return image


@contextmanager
def qemu_nbd(image: Path, *args: str, fmt: str = "qcow2") -> Iterator[str]:
    sock = image.parent / f"qemu-{os.getpid()}-{time.monotonic_ns()}.sock"
    proc = subprocess.Popen(["qemu-nbd", "-k", str(sock), "--persistent", "-f", fmt, *args,
                             str(image)], stderr=subprocess.PIPE)
    try:
        wait_for_socket(str(sock), proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def nbd_server(image: Path, name: str = "disk") -> Iterator[str]:
    """nbd-server on a Unix socket exporting ``image`` as ``name``; yields its URI."""
    directory = image.parent
    sock, pidfile, conf = directory / "ns.sock", directory / "ns.pid", directory / "ns.conf"
    conf.write_text(f"[generic]\nuser = root\ngroup = root\nallowlist = true\nunixsock = {sock}\n"
                    f"[{name}]\nexportname = {image}\n")
    run(["nbd-server", "-C", str(conf), "-p", str(pidfile)])
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() and _accepts(sock),
             message=f"nbd-server did not start accepting on {sock}")
    pid = int(pidfile.read_text())
    try:
        yield f"nbd+unix:///{name}?socket={sock}"
    finally:
        os.kill(pid, signal.SIGTERM)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def make_pki(directory: Path) -> Path:
    """A CA and a server certificate for localhost, in nbdkit's file layout."""
    d = directory / "pki"
    d.mkdir()

    def ssl(*args: str) -> None:
        run(["openssl", *args])

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca-key.pem"),
        "-out", str(d / "ca-cert.pem"), "-days", "2", "-subj", "/CN=pynbd test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server-key.pem"),
        "-out", str(d / "server.csr"), "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca-cert.pem"),
        "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-out", str(d / "server-cert.pem"),
        "-days", "2", "-extfile", str(d / "ext"))
    return d
