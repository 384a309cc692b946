"""ssh: a disk image on another machine, read and written over SSH (SFTP).

    pynbd serve ssh disk.img host=server.example.com            # ~/disk.img there
    pynbd serve ssh host=server path=/var/lib/images/vm.img user=bob identity=$HOME/.ssh/id_ed25519
    pynbd serve ssh host=server path=scratch.img create=true create-size=10G
    pynbd serve -r ssh disk.img host=server --filter=cow

Parameters (nbdkit's names)
    host=HOST               the SSH server (required)
    path=PATH               the file there (the magic parameter); relative to
                            the user's home directory unless it starts with /
    port=PORT               the SSH port (default 22)
    user=USER               the remote user (default: the local user)
    password=PASSWORD       log in with a password (+FILE, - and -FD read it)
    identity=FILE           a private key to log in with (repeatable; tried
                            before the keys in ~/.ssh and an ssh-agent's)
    known-hosts=FILE        the host keys to check the server's against
                            (default ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts)
    verify-remote-host=false  do not check the server's host key (dangerous)
    timeout=SECS            give up connecting after this long (default 30)
    compression=true        compress the SSH connection (for slow links)
    create=true             create (or empty) the file, create-size=SIZE bytes
    create-size=SIZE        long, with mode create-mode=0600 (octal), when the
    create-mode=MODE        first client connects

Behaviour
    - Each client gets its own SSH connection and SFTP session; its requests
      run one at a time on it (as nbdkit's plugin does). Large reads are
      pipelined (many SFTP reads in flight).
    - The server is reached once when pynbd starts, so an unreachable host, a
      refused login and a host key that does not match the known hosts are
      reported then, in one line. A host key that is not known at all is
      refused too, unless verify-remote-host=false.
    - Writes are done when the server acknowledged them; SFTP has no flush
      pynbd can ask for (flush is not offered). Errors are EIO with the
      server's message, logged.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import socket
import threading
from typing import Any

from ..backend import ConfigError, Connection, OpenContext, Param, Plugin, ThreadModel

log = logging.getLogger("pynbd.plugins.ssh")

_BIG_READ = 32768  # larger reads are pipelined (SFTP requests of 32 KiB)


def load_paramiko() -> Any:
    try:
        import paramiko  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("ssh: needs paramiko (pip install 'pynbd[ssh]')") from None
    return paramiko


class SshConnection(Connection):
    """One client's SSH connection, SFTP session and open file."""

    def __init__(self, client: Any, sftp: Any, file: Any, writable: bool) -> None:
        self.client = client
        self.sftp = sftp
        self.file = file
        self.writable = writable
        self.size = int(file.stat().st_size)

    def get_size(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return self.writable

    def can_flush(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return self.writable

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        try:
            if len(buf) <= _BIG_READ:
                self.file.seek(offset)
                data = self.file.read(len(buf))
            else:
                data = b"".join(self.file.readv([(offset, len(buf))]))
        except (OSError, EOFError) as exc:
            raise self.failed("read", offset, len(buf), exc) from None
        if len(data) != len(buf):
            raise OSError(errno.EIO, f"ssh: short read at {offset}: {len(data)} of {len(buf)} bytes")
        buf[:] = data

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        try:
            self.file.seek(offset)
            self.file.write(buf)
        except (OSError, EOFError) as exc:
            raise self.failed("write", offset, len(buf), exc) from None

    def failed(self, what: str, offset: int, count: int, exc: Exception) -> OSError:
        log.error("ssh: %s of %d bytes at %d failed: %s", what, count, offset, exc)
        return OSError(errno.EIO, f"ssh: {what} at {offset} failed: {exc}")

    def close(self) -> None:
        for thing in (self.file, self.sftp, self.client):
            try:
                thing.close()
            except (OSError, EOFError) as exc:
                log.debug("ssh: closing: %s", exc)


class SshPlugin(Plugin):
    name = "ssh"
    magic_param = "path"
    # One SFTP session per client, used by one request at a time (as nbdkit).
    thread_model = ThreadModel.SERIALIZE_REQUESTS
    params = (
        Param("host", "str", "the SSH server", required=True),
        Param("path", "str", "the remote file", required=True),
        Param("port", "int", "SSH port", default=22),
        Param("user", "str", "remote user name"),
        Param("password", "secret", "password (+FILE, - or -FD to read it)"),
        Param("identity", "path", "private key file", repeat=True),
        Param("known-hosts", "path", "known hosts file"),
        Param("verify-remote-host", "bool", "check the server's host key", default=True),
        Param("timeout", "duration", "seconds to wait for the server", default=30.0),
        Param("compression", "bool", "compress the connection", default=False),
        Param("create", "bool", "create the remote file", default=False),
        Param("create-size", "size", "size of the created file"),
        Param("create-mode", "str", "permissions of the created file (octal)", default="0600"),
    )
    host: str
    path: str
    port: int
    user: str | None
    password: str | None
    identity: list[str]
    known_hosts: str | None
    verify_remote_host: bool
    timeout: float
    compression: bool
    create: bool
    create_size: int | None
    create_mode: str

    def config_complete(self) -> None:
        if self.create and self.create_size is None:
            raise ConfigError("ssh: create=true needs create-size=")
        try:
            self.mode = int(self.create_mode, 8)
        except ValueError:
            raise ConfigError(f"ssh: create-mode: {self.create_mode!r} is not an octal mode") from None
        for key in self.identity:
            if not os.path.exists(key):
                raise ConfigError(f"ssh: identity: {key} does not exist")
        self.paramiko = load_paramiko()
        self.login = self.user or getpass.getuser()
        self.created = False
        self.create_lock = threading.Lock()

    def get_ready(self) -> None:
        try:
            client = self.connect()
        except OSError as exc:
            raise ConfigError(exc.strerror or str(exc)) from None
        client.close()

    def where(self) -> str:
        return f"{self.login}@{self.host}:{self.port}"

    def connect(self) -> Any:
        """A logged-in SSHClient; OSError (one line) if the server cannot be reached or refuses."""
        paramiko = self.paramiko
        client = paramiko.SSHClient()
        try:
            if self.known_hosts is not None:
                client.load_host_keys(self.known_hosts)
            else:
                client.load_system_host_keys()
            client.set_missing_host_key_policy(
                paramiko.RejectPolicy() if self.verify_remote_host else paramiko.AutoAddPolicy())
            client.connect(self.host, port=self.port, username=self.login, password=self.password,
                           key_filename=self.identity or None, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout,
                           compress=self.compression)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise OSError(errno.EIO, f"ssh: {self.where()}: the host key does not match the known "
                          f"hosts (possible man-in-the-middle attack): got {exc.key.get_name()} "
                          f"{exc.key.get_base64()[:16]}...") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise OSError(errno.EACCES, f"ssh: {self.where()}: login refused: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, socket.timeout):
                reason = f"timed out after {self.timeout:g} s"
            raise OSError(errno.EIO, f"ssh: {self.where()}: {reason}") from None
        return client

    def open(self, ctx: OpenContext) -> Connection:
        client = self.connect()
        try:
            sftp = client.open_sftp()
            self.create_once(sftp)
            writable = not ctx.readonly
            try:
                remote = sftp.open(self.path, "r+" if writable else "r")
            except PermissionError:
                writable = False
                remote = sftp.open(self.path, "r")
            return SshConnection(client, sftp, remote, writable)
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            client.close()
            raise OSError(errno.EIO, f"ssh: {self.where()}: {self.path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None

    def create_once(self, sftp: Any) -> None:
        """create=true: make the file, once, when the first client connects (as nbdkit)."""
        if not self.create:
            return
        with self.create_lock:
            if self.created:
                return
            with sftp.open(self.path, "w") as new:
                new.truncate(self.create_size)
            sftp.chmod(self.path, self.mode)
            self.created = True
