"""Helpers for the luks tests: images made by cryptsetup and qemu-img, copies through servers.

    from luks_helpers import cryptsetup_format, qemu_luks, copy_out, copy_in, SECRET

cryptsetup works on image files offline (no device-mapper needed) for
luksFormat, luksAddKey, luksDump, open --test-passphrase and reencrypt.
Cheap key-derivation costs keep each image a fraction of a second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nbdtest import SERVE, run

SECRET = "correct horse"
CHEAP_LUKS1 = ("--pbkdf-force-iterations", "1000")
CHEAP_ARGON2 = ("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32")


def key_file(tmp_path, secret: str = SECRET, name: str = "key") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        f.write(secret)
    return path


def cryptsetup_format(tmp_path, name: str, size: int, *options: str, secret: str = SECRET) -> str:
    """A file of ``size`` bytes formatted by cryptsetup luksFormat with ``options``."""
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.truncate(size)
    run(["cryptsetup", "luksFormat", "-q", "--key-file", key_file(tmp_path, secret), *options, path])
    return path


def qemu_luks(tmp_path, name: str, size: str, *options: str) -> str:
    """A LUKS1 image made by qemu-img create -f luks (payload of ``size``)."""
    path = os.path.join(tmp_path, name)
    cmd = ["qemu-img", "create", "-q", "-f", "luks", "--object", f"secret,id=s,data={SECRET}",
           "-o", ",".join(["key-secret=s", "iter-time=10", *options]), path, size]
    for _ in range(4):
        result = run(cmd, check=False)
        # qemu's PBKDF2 benchmark gives up now and then on a busy machine: try it again.
        if b"Unable to get accurate CPU usage" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr.decode()
    return path


def qemu_opts(path: str) -> Sequence[str]:
    """qemu-img arguments that open a LUKS image with SECRET."""
    return ("--object", f"secret,id=s,data={SECRET}", "--image-opts",
            f"driver=luks,key-secret=s,file.filename={path}")


def refused_at_start(tmp_path, image: str, *params: str) -> str:
    """Start a server on a LUKS image it cannot open: it exits 1 with one line before
    listening (no socket is left); that line."""
    sock = os.path.join(tmp_path, "refused.sock")
    result = run([*SERVE, "-f", "-U", sock, "--filter=luks", "file", image,
                  *(params or (f"passphrase={SECRET}",))], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not os.path.exists(sock)
    return err


def copy_out(uri: str, path: str) -> bytes:
    """Read a whole export with nbdcopy into ``path``; its bytes."""
    run(["nbdcopy", uri, path])
    with open(path, "rb") as f:
        return f.read()


def copy_in(path: str, uri: str) -> None:
    """Write a file over the start of an export with nbdcopy."""
    run(["nbdcopy", path, uri])


def random_file(tmp_path, name: str, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path, data
