"""pynbd luks format: images that cryptsetup, qemu-img, nbdkit and the luks filter accept."""

from __future__ import annotations

import os
import re

import pytest

from nbdtest import PYNBD, nbdsh, run, served

LUKS = [*PYNBD, "luks"]
SECRET = "tool secret"
CHEAP = ("--iter-time", "10")
CHEAP_ARGON2 = ("--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "2")
MiB = 1 << 20


def key_file(tmp_path, secret: str = SECRET) -> str:
    path = tmp_path / "key"
    path.write_text(secret)
    return str(path)


def luks_dump(path: str) -> dict[str, str]:
    """cryptsetup luksDump's "Name: value" lines, as a dict (first occurrence of each)."""
    text = run(["cryptsetup", "luksDump", path]).stdout.decode()
    fields: dict[str, str] = {}
    for match in re.finditer(r"^\s*([A-Za-z][A-Za-z ]*?):\s*(.*?)\s*$", text, re.M):
        fields.setdefault(match.group(1), match.group(2))
    return fields


def cryptsetup_accepts(path: str, tmp_path) -> None:
    """cryptsetup opens the image with SECRET and refuses another passphrase."""
    run(["cryptsetup", "open", "--test-passphrase", "--key-file", key_file(tmp_path), path])
    wrong = run(["cryptsetup", "open", "--test-passphrase", "--key-file",
                 key_file(tmp_path, "not it"), path], check=False)
    assert wrong.returncode != 0


@pytest.mark.parametrize("options,dump", [
    (("--type", "luks1", *CHEAP),
     {"Version": "1", "Cipher name": "aes", "Cipher mode": "xts-plain64", "MK bits": "512",
      "Hash spec": "sha256", "Payload offset": "4096"}),
    (("--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha1",
      *CHEAP),
     {"Version": "1", "Cipher mode": "cbc-essiv:sha256", "MK bits": "256", "Hash spec": "sha1"}),
    (("--type", "luks2", *CHEAP, *CHEAP_ARGON2),
     {"Version": "2", "cipher": "aes-xts-plain64", "sector": "512 [bytes]", "PBKDF": "argon2id",
      "Memory": "32768", "Threads": "2", "offset": "16777216 [bytes]"}),
    (("--type", "luks2", "--pbkdf", "pbkdf2", "--sector-size", "4096", "--hash", "sha512", *CHEAP),
     {"Version": "2", "sector": "4096 [bytes]", "PBKDF": "pbkdf2", "Hash": "sha512"}),
    (("--type", "luks2", "--pbkdf", "argon2i", "--cipher", "aes-cbc-plain64", "--key-size", "128",
      *CHEAP, *CHEAP_ARGON2),
     {"cipher": "aes-cbc-plain64", "PBKDF": "argon2i", "Key": "128 bits"}),
])
def test_cryptsetup_describes_and_accepts(tmp_path, options, dump):
    image = str(tmp_path / "disk.img")
    run([*LUKS, "format", image, "--size", "1M", "--passphrase", f"+{key_file(tmp_path)}", *options])
    fields = luks_dump(image)
    assert {k: fields.get(k) for k in dump} == dump
    cryptsetup_accepts(image, tmp_path)
    # and the luks filter serves the 1 MiB payload
    with served("--filter=luks", "file", image, f"passphrase={SECRET}") as srv:
        assert run(["nbdinfo", "--size", srv.uri]).stdout == b"1048576\n"


def test_luks1_opens_in_qemu_and_nbdkit(tmp_path):
    image = str(tmp_path / "disk.img")
    run([*LUKS, "format", image, "--type", "luks1", "--size", "2M", "--passphrase-env", "K", *CHEAP],
        env={**os.environ, "K": SECRET})
    run(["qemu-io", "--object", f"secret,id=s,data={SECRET}", "--image-opts",
         f"driver=luks,key-secret=s,file.filename={image}", "-c", "write -P 0x51 4096 4096"])
    with served("--filter=luks", "file", image, f"passphrase={SECRET}", server="nbdkit") as srv:
        assert nbdsh(srv.uri, "print(h.pread(4096, 4096) == b'Q' * 4096)").strip() == "True"
    info = run(["qemu-img", "info", "--object", f"secret,id=s,data={SECRET}", "--image-opts",
                f"driver=luks,key-secret=s,file.filename={image}"]).stdout.decode()
    assert "virtual size: 2 MiB" in info


def test_formats_an_existing_file_in_place(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(20 * MiB)
    run([*LUKS, "format", str(image), "--passphrase", SECRET, *CHEAP, *CHEAP_ARGON2])
    assert os.path.getsize(image) == 20 * MiB
    dump = run([*LUKS, "dump", str(image)]).stdout.decode()
    assert "version: LUKS2" in dump and "payload size: 4194304" in dump
    assert "keyslot 0: argon2id time 4 memory 32768 KiB cpus 2" in dump


@pytest.mark.parametrize("args,message", [
    (["format", "{dir}/new.img", "--passphrase", "x"], "new.img: no such file (give --size to create it)"),
    (["format", "{dir}/a.img", "--size", "1M", "--passphrase", ""], "the passphrase is empty"),
    (["format", "{dir}/a.img", "--size", "1M", "--passphrase", "+{dir}/missing"],
     "cannot read passphrase: {dir}/missing: No such file or directory"),
    (["format", "{dir}/a.img", "--size", "1M", "--passphrase", "x", "--cipher", "twofish-xts-plain64"],
     "unsupported cipher 'twofish-xts-plain64' (only aes is supported)"),
    (["format", "{dir}/a.img", "--size", "1M", "--passphrase", "x", "--key-size", "384"],
     "aes-xts-plain64: unsupported key size 384 bits (supported: 256, 512)"),
    (["format", "{dir}/a.img", "--type", "luks1", "--pbkdf", "argon2id", "--size", "1M",
      "--passphrase", "x"], "LUKS1 keyslots use pbkdf2, not argon2id"),
    (["dump", "/dev/null"], "not a LUKS image"),
])
def test_bad_input(tmp_path, args, message):
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    result = run([*LUKS, *args], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith("pynbd luks: ") and message.replace("{dir}", str(tmp_path)) in err
