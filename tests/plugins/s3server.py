"""A local S3-compatible server for the S3 plugin's tests: moto in server mode on 127.0.0.1.

    from s3server import moto_s3

    with moto_s3() as s3:                      # s3.url, s3.client (boto3), s3.env
        s3.client.create_bucket(Bucket="b")
        served("S3", f"endpoint-url={s3.url}", "bucket=b", "key=k", env=s3.env)
    with moto_s3(check_credentials=True) as s3:  # every access key is refused

Credentials are dummies, given to boto3 through ``s3.env`` (AWS_* variables),
which the pynbd server and nbdkit's S3 plugin read alike (``s3.env_for(server)``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3

from nbdtest import wait_for
from pynbd.process import stop_process

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class MotoS3:
    url: str
    client: Any
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    def env_for(self, server: str) -> dict[str, str]:
        """The environment for a server: nbdkit's S3 plugin (the system Python embedded)
        must find the system's python3 first on PATH, or it looks for boto3 elsewhere."""
        if server == "nbdkit":
            return {**self.env, "PATH": f"/usr/bin:{self.env['PATH']}"}
        return self.env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_s3(check_credentials: bool = False) -> Iterator[MotoS3]:
    """moto's S3 on a fresh port; ``check_credentials`` turns its IAM checks on."""
    port = _free_port()
    env = {**os.environ, **CREDENTIALS}
    server_env = dict(env)
    if check_credentials:
        server_env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=server_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"moto exited with {proc.returncode}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, message="moto is not listening")
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        yield MotoS3(url, client, env, proc)
    finally:
        stop_process(proc)
