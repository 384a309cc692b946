"""luks filter over LUKS2 images from cryptsetup: data that `cryptsetup reencrypt --encrypt`
encrypted, writes that cryptsetup re-encrypts, argon2 and PBKDF2 keyslots, 4096-byte sectors,
damaged header copies, unsupported keyslots."""

from __future__ import annotations

import hashlib

import pytest
from luks_helpers import (
    CHEAP_ARGON2,
    SECRET,
    copy_in,
    copy_out,
    cryptsetup_format,
    key_file,
    random_file,
    refused_at_start,
)
from stack_helpers import nbdsh_outcomes

from nbdtest import nbdsh, run, served

MiB = 1 << 20


def luks(path: str, *params: str):
    return served("--filter=luks", "file", path, *(params or (f"passphrase={SECRET}",)))


@pytest.mark.parametrize("sector", ["512", "4096"])
def test_reencrypt_encrypt_reads_back_the_plain_data(tmp_path, sector):
    image, plain = random_file(tmp_path, "disk.img", 12 * MiB)
    run(["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "-q", "--reduce-device-size",
         "8M", "--sector-size", sector, *CHEAP_ARGON2, "--key-file", key_file(tmp_path), image])
    with luks(image) as srv:
        out = copy_out(srv.uri, str(tmp_path / "out.raw"))
        assert nbdsh(srv.uri, "print(h.get_block_size(nbd.SIZE_MINIMUM))").strip() == sector
    assert len(out) == 8 * MiB and out[:4 * MiB] == plain[:4 * MiB]  # the last 8M were given up


@pytest.mark.parametrize("options", [
    ("--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "64",
     "--sector-size", "4096"),
    ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha512",
     "--sector-size", "512"),
    (*CHEAP_ARGON2, "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--sector-size", "512"),
])
def test_pynbd_writes_cryptsetup_reencrypts_pynbd_reads(tmp_path, options):
    image = cryptsetup_format(tmp_path, "disk.img", 22 * MiB, "--type", "luks2", *options)
    raw, data = random_file(tmp_path, "r.raw", 6 * MiB)
    with luks(image) as srv:
        copy_in(raw, srv.uri)
    # cryptsetup decrypts every sector with the old key and encrypts it with a new one.
    run(["cryptsetup", "reencrypt", "-q", "--force-offline-reencrypt", *CHEAP_ARGON2,
         "--key-file", key_file(tmp_path), image])
    with luks(image) as srv:
        assert copy_out(srv.uri, str(tmp_path / "out.raw"))[:6 * MiB] == data


def test_any_keyslot_and_wrong_passphrase(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 18 * MiB, "--type", "luks2", *CHEAP_ARGON2)
    other = key_file(tmp_path, "slot seven", "k7")
    run(["cryptsetup", "luksAddKey", "-q", "--key-file", key_file(tmp_path), "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-slot", "7", image, other])
    with luks(image, "passphrase=slot seven") as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'7' * 4096, 0)"]) == ["ok"]
    with luks(image) as srv:
        assert nbdsh(srv.uri, "print(h.pread(4096, 0) == b'7' * 4096)").strip() == "True"
    log = refused_at_start(tmp_path, image, "passphrase=nope")
    assert "luks: the passphrase matches no keyslot (tried keyslots 0, 7)" in log


def corrupt(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_primary_header_uses_the_secondary(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 18 * MiB, "--type", "luks2", *CHEAP_ARGON2)
    corrupt(image, 4096 + 10)  # in the primary's JSON: its checksum no longer matches
    with luks(image) as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b's' * 4096, 0)"]) == ["ok"]
    assert ("luks: LUKS2 primary header is damaged (checksum mismatch): using the secondary copy"
            in srv.stderr())
    corrupt(image, 0)  # the primary's magic too: the secondary is found by its own
    with luks(image) as srv:
        assert nbdsh(srv.uri, "print(h.pread(4096, 0) == b's' * 4096)").strip() == "True"
    assert "primary header is damaged (bad magic or version)" in srv.stderr()


def test_both_header_copies_damaged_is_refused(tmp_path):
    image = cryptsetup_format(tmp_path, "disk.img", 18 * MiB, "--type", "luks2", *CHEAP_ARGON2)
    corrupt(image, 4096 + 10)
    corrupt(image, 16384 + 4096 + 10)
    log = refused_at_start(tmp_path, image)
    assert ("luks: both LUKS2 header copies are damaged (primary: checksum mismatch; "
            "secondary: checksum mismatch)") in log


def rewrite_json(path: str, change) -> None:
    """Change the JSON text of both header copies and give each a valid checksum again."""
    with open(path, "r+b") as f:
        area = bytearray(f.read(32768))
        for offset in (0, 16384):
            header = area[offset:offset + 16384]
            text = change(bytes(header[4096:]).rstrip(b"\0"))
            header[4096:] = text.ljust(16384 - 4096, b"\0")
            header[448:512] = bytes(64)
            header[448:480] = hashlib.sha256(header).digest()
            area[offset:offset + 16384] = header
        f.seek(0)
        f.write(area)


@pytest.mark.parametrize("change,message", [
    (lambda text: text.replace(b'"argon2id"', b'"scrypt"'),
     "luks: no usable keyslot (keyslot 0: unsupported KDF 'scrypt')"),
    (lambda text: text[:100],
     "luks: both LUKS2 header copies are damaged (primary: malformed JSON metadata"),
    (lambda text: text.replace(b'"aes-xts-plain64"', b'"serpent-xts-plain64"'),
     "luks: unsupported cipher 'serpent-xts-plain64' (only aes is supported)"),
])
def test_bad_metadata_is_named(tmp_path, change, message):
    image = cryptsetup_format(tmp_path, "disk.img", 18 * MiB, "--type", "luks2", *CHEAP_ARGON2)
    rewrite_json(image, change)
    assert message in refused_at_start(tmp_path, image)


def test_argon2id_with_several_lanes(tmp_path):
    """cryptsetup's default KDF shape (argon2id, time 4, 4 threads) at a test-sized 64 MiB; the
    full 1 GiB default and its opening time against cryptsetup are measured in bench/."""
    image = cryptsetup_format(tmp_path, "disk.img", 18 * MiB, "--type", "luks2", "--pbkdf", "argon2id",
                              "--pbkdf-force-iterations", "4", "--pbkdf-memory", "65536",
                              "--pbkdf-parallel", "4")
    with luks(image) as srv:
        assert run(["nbdinfo", "--size", srv.uri]).stdout == b"%d\n" % (2 * MiB)
