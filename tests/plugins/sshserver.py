"""OpenSSH's sshd for the ssh plugin's tests, on 127.0.0.1 with throwaway keys.

    from sshserver import sshd

    with sshd(tmp_path) as ssh:     # ssh.port, ssh.identity, ssh.known_hosts, ssh.user
        served("ssh", "host=127.0.0.1", f"port={ssh.port}", f"identity={ssh.identity}", ...)

The server runs as the test's own process (``sshd -D -e``) with a config in a
temporary directory: a fresh ed25519 host key, one authorized user key (for
the current user), SFTP served by internal-sftp, no passwords. ``known_hosts``
lists the host key; ``wrong_known_hosts`` lists another key for the same
address (a host key mismatch).
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nbdtest import run, wait_for
from pynbd.process import stop_process

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    identity: str
    known_hosts: str
    wrong_known_hosts: str
    user: str
    directory: Path


def _keygen(path: Path) -> str:
    """A new ed25519 key pair at ``path``; the public key line."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pynbd-test", "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sshd(directory: Path) -> Iterator[Sshd]:
    d = directory / "sshd"
    d.mkdir()
    host_pub = _keygen(d / "host_key")
    other_pub = _keygen(d / "other_host_key")
    user_pub = _keygen(d / "user_key")
    (d / "authorized_keys").write_text(user_pub + "\n")
    port = _free_port()
    for name, key in (("known_hosts", host_pub), ("wrong_known_hosts", other_pub)):
        kind, blob = key.split()[:2]
        (d / name).write_text(f"[127.0.0.1]:{port} {kind} {blob}\n")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"sshd exited with {proc.returncode}: {err}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, message="sshd is not listening")
        yield Sshd(port, str(d / "user_key"), str(d / "known_hosts"), str(d / "wrong_known_hosts"),
                   getpass.getuser(), d)
    finally:
        stop_process(proc)
