"""luks filter over LUKS1 images from cryptsetup and qemu-img: the same bytes as nbdkit's luks
filter both ways, qemu-img compare, every keyslot, the passphrase forms and bad input."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from luks_helpers import (
    CHEAP_LUKS1,
    SECRET,
    copy_in,
    copy_out,
    cryptsetup_format,
    key_file,
    qemu_luks,
    qemu_opts,
    random_file,
    refused_at_start,
)
from stack_helpers import nbdsh_outcomes

from nbdtest import SERVE, nbdsh, run, served

MiB = 1 << 20


def luks(path: str, *params: str, server: str = "pynbd", **kw):
    return served("--filter=luks", "file", path, *(params or (f"passphrase={SECRET}",)),
                  server=server, **kw)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("cipher,bits,hash_name", [
    ("aes-xts-plain64", 512, "sha256"),
    ("aes-xts-plain64", 256, "sha1"),
    ("aes-cbc-plain64", 256, "sha512"),
    ("aes-cbc-plain", 128, "sha256"),
])
def test_same_bytes_as_nbdkit_both_ways(tmp_path, cipher, bits, hash_name):
    # (nbdkit 1.32 has no ESSIV: the qemu tests below cover aes-cbc-essiv:sha256.)
    image = cryptsetup_format(tmp_path, "disk.img", 6 * MiB, "--type", "luks1", *CHEAP_LUKS1,
                              "--cipher", cipher, "--key-size", str(bits), "--hash", hash_name)
    first, first_data = random_file(tmp_path, "a.raw", 2 * MiB)
    with luks(image) as srv:  # pynbd writes, nbdkit reads
        copy_in(first, srv.uri)
    with luks(image, server="nbdkit") as srv:
        theirs = copy_out(srv.uri, str(tmp_path / "n.raw"))
        assert theirs[:2 * MiB] == first_data
        nbdsh(srv.uri, f"h.pwrite(b'N' * 1024, {3 * MiB})")  # nbdkit writes, pynbd reads
    with luks(image) as srv:
        out = copy_out(srv.uri, str(tmp_path / "p.raw"))
    assert len(out) == len(theirs) and out[:2 * MiB] == first_data
    assert out[3 * MiB:3 * MiB + 1024] == b"N" * 1024


def test_sector_alignment_like_nbdkit_and_unaligned_clients_served(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 4 * MiB, "--type", "luks1", *CHEAP_LUKS1)
    sizes = "print(h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED))"
    answers = []
    for server in ("pynbd", "nbdkit"):
        with luks(image, server=server) as srv:
            answers.append(nbdsh(srv.uri, sizes).split()[0])
    assert answers == ["512", "512"]
    # A filter above that shifts requests off the sectors: whole sectors are read and
    # re-encrypted around them. (Not compared with nbdkit: 1.32's luks filter garbles the
    # start of the sector that an unaligned write begins in, e.g. pwrite(b'c' * 512, 512)
    # below an offset=100 filter destroys bytes 512-611.)
    calls = ["h.pwrite(b'a' * 1024, 0)", "h.pwrite(b'b' * 512, 1024)", "h.zero(4096, 4096)",
             "h.pwrite(b'c' * 9216, 512)", "h.zero(1024 * 1024, 9728)"]
    with served("--filter=offset", "--filter=luks", "file", image, "offset=100",
                f"passphrase={SECRET}") as srv:
        assert nbdsh_outcomes(srv.uri, calls) == ["ok"] * len(calls)
        shifted = nbdsh(srv.uri, "import sys; sys.stdout.write(h.pread(12288, 0).hex())")
    with luks(image, server="nbdkit") as srv:  # nbdkit decrypts what was written
        direct = nbdsh(srv.uri, "import sys; sys.stdout.write(h.pread(12800, 0)[100:12388].hex())")
    assert shifted == direct
    assert bytes.fromhex(shifted) == b"a" * 512 + b"c" * 9216 + bytes(2560)


def test_qemu_made_image_read_and_written(tmp_path):
    image = qemu_luks(tmp_path, "q.img", "4M", "cipher-alg=aes-256", "cipher-mode=cbc",
                      "ivgen-alg=essiv", "ivgen-hash-alg=sha256", "hash-alg=sha1")
    raw, data = random_file(tmp_path, "r.raw", 4 * MiB)
    run(["qemu-img", "convert", "-n", "-f", "raw", raw, "--target-image-opts",
         f"driver=luks,key-secret=s,file.filename={image}", "--object", f"secret,id=s,data={SECRET}"])
    with luks(image) as srv:
        assert copy_out(srv.uri, str(tmp_path / "out.raw")) == data
        nbdsh(srv.uri, f"h.pwrite(b'P' * 8192, {MiB})")
    with open(raw, "r+b") as f:
        f.seek(MiB)
        f.write(b"P" * 8192)
    run(["qemu-img", "compare", "-q", *qemu_opts(image), f"driver=raw,file.filename={raw}"])


def test_cryptsetup_essiv_image_against_qemu(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 4 * MiB, "--type", "luks1", *CHEAP_LUKS1,
                              "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256",
                              "--hash", "sha512")
    raw, _ = random_file(tmp_path, "r.raw", 2 * MiB)
    with luks(image) as srv:
        copy_in(raw, srv.uri)
    run(["qemu-img", "compare", "-q", *qemu_opts(image), f"driver=raw,file.filename={raw}"])


def test_any_keyslot(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 4 * MiB, "--type", "luks1", *CHEAP_LUKS1)
    other = key_file(tmp_path, "slot five", "key5")
    run(["cryptsetup", "luksAddKey", "-q", "--key-file", key_file(tmp_path), *CHEAP_LUKS1,
         "--key-slot", "5", image, other])
    run(["cryptsetup", "luksKillSlot", "-q", "--key-file", other, image, "0"])
    with luks(image, "passphrase=slot five") as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'5' * 512, 0)"]) == ["ok"]
    with luks(image, f"passphrase=+{other}", server="nbdkit") as srv:
        assert nbdsh(srv.uri, "print(h.pread(512, 0) == b'5' * 512)").strip() == "True"


def test_passphrase_forms(tmp_path):
    image = qemu_luks(tmp_path, "q.img", "1M")
    nbdinfo = ["--run", 'nbdinfo --size "$uri"']
    serve = [*SERVE, "-U", "-", "--filter=luks", "file", image]
    assert run([*serve, f"passphrase=+{key_file(tmp_path)}", *nbdinfo]).stdout == b"1048576\n"
    assert run([*serve, "passphrase=-", *nbdinfo], input=f"{SECRET}\n".encode()).stdout == b"1048576\n"
    env = {**os.environ, "LUKS_KEY": SECRET}
    assert run([*serve, "passphrase-env=LUKS_KEY", *nbdinfo], env=env).stdout == b"1048576\n"
    read_end, write_end = os.pipe()
    os.write(write_end, SECRET.encode())
    os.close(write_end)
    result = subprocess.run([*serve, f"passphrase=-{read_end}", *nbdinfo], pass_fds=(read_end,),
                            capture_output=True, timeout=60)
    os.close(read_end)
    assert result.stdout == b"1048576\n", result.stderr


def test_wrong_passphrase_refused_at_start_nothing_written(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 4 * MiB, "--type", "luks1", *CHEAP_LUKS1)
    run(["cryptsetup", "luksAddKey", "-q", "--key-file", key_file(tmp_path), *CHEAP_LUKS1,
         "--key-slot", "3", image, key_file(tmp_path, "another", "k3")])
    before = digest(image)
    line = refused_at_start(tmp_path, image, "passphrase=wrong")
    assert line.rstrip().endswith("luks: the passphrase matches no keyslot (tried keyslots 0, 3)"), line
    assert digest(image) == before


def test_header_changed_under_a_running_server_refuses_that_client(tmp_path):
    """The volume is opened at start; a client's open checks the header again, so an image
    replaced by one the passphrase does not open refuses the client (EACCES, one log line)
    and the server goes on serving the next client once the header is back."""
    image = cryptsetup_format(tmp_path, "disk.img", 4 * MiB, "--type", "luks1", *CHEAP_LUKS1)
    other = cryptsetup_format(tmp_path, "other.img", 4 * MiB, "--type", "luks1", *CHEAP_LUKS1,
                              secret="not ours")
    with open(image, "rb") as f:
        header = f.read(1 * MiB)
    with luks(image) as srv:
        with open(other, "rb") as src, open(image, "r+b") as dst:
            dst.write(src.read(1 * MiB))
        result = run(["nbdinfo", "--size", srv.uri], check=False)
        assert result.returncode != 0 and srv.proc.poll() is None
        with open(image, "r+b") as dst:
            dst.write(header)
        assert run(["nbdinfo", "--size", srv.uri]).stdout.strip().isdigit()
    log = srv.stderr()
    assert "luks: the passphrase matches no keyslot (tried keyslot 0): Permission denied" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("params,message", [
    (["passphrase=+/nonexistent/key"], "luks: passphrase: cannot read /nonexistent/key: No such file"),
    (["passphrase=+EMPTY"], "luks: the passphrase from file"),
    (["passphrase="], "luks: the passphrase from passphrase= is empty"),
    (["passphrase=-"], "luks: the passphrase from standard input is empty"),
    (["passphrase-env=PYNBD_TEST_UNSET"], "environment variable 'PYNBD_TEST_UNSET' is not set"),
    ([], "luks: give one of passphrase="),
    (["passphrase=a", "passphrase-env=HOME"], "luks: give one of passphrase="),
])
def test_bad_passphrase_parameters(tmp_path, params, message):
    empty = key_file(tmp_path, "", "empty")
    params = [p.replace("EMPTY", empty) for p in params]
    result = run([*SERVE, "-f", "-U", str(tmp_path / "s"), "--filter=luks", "file", "/dev/null",
                  *params], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_unsupported_cipher_is_named(tmp_path):
    image = qemu_luks(tmp_path, "q.img", "1M")
    with open(image, "r+b") as f:
        f.seek(8)
        f.write(b"twofish".ljust(32, b"\0"))
    assert ("luks: unsupported cipher 'twofish-xts-plain64' (only aes is supported)"
            in refused_at_start(tmp_path, image))


def test_not_luks_is_refused(tmp_path):
    assert "luks: not a LUKS image" in refused_at_start(tmp_path, random_file(tmp_path, "plain.raw", MiB)[0])
