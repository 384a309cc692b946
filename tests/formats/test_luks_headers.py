"""formats/luks on bytes in memory: headers written and read back, damaged copies, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from pynbd.formats import evp, luks

CHEAP_ARGON = dict(iterations=1, memory=64, cpus=1)


class Image:
    """A bytearray image with the read/write callables the format module takes."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data


def luks2_image(kdf_type: str = "argon2id", sector_size: int = 512) -> Image:
    image = Image(17 << 20)
    if kdf_type == "pbkdf2":
        kdf = luks.Kdf("pbkdf2", os.urandom(32), "sha256", 1000)
    else:
        kdf = luks.Kdf(kdf_type, os.urandom(32), **CHEAP_ARGON)
    luks.format_luks2(image.write, b"secret", luks.CipherSpec.parse("aes", "xts-plain64"), 64,
                      kdf, "sha256", 1000, sector_size)
    return image


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_bytes", [16, 32, 64])
def test_af_split_and_merge_are_inverse(hash_name, key_bytes):
    key = os.urandom(key_bytes)
    material = luks.af_split(key, 4000, hash_name)
    assert len(material) == key_bytes * 4000
    assert luks.af_merge(material, key_bytes, 4000, hash_name) == key


@pytest.mark.parametrize("mode,key_bytes", [("xts-plain64", 64), ("xts-plain64", 32),
                                            ("cbc-essiv:sha256", 32), ("cbc-plain64", 16),
                                            ("cbc-plain", 32)])
def test_luks1_written_then_unlocked(mode, key_bytes):
    image = Image(3 << 20)
    spec = luks.CipherSpec.parse("aes", mode)
    made = luks.format_luks1(image.write, b"pass", spec, key_bytes, "sha1", 1000, 1000)
    volume = luks.read_volume(image.read)
    assert (volume.version, str(volume.cipher), volume.key_bytes) == (1, f"aes-{mode}", key_bytes)
    assert volume.data_offset == made.data_offset == luks.luks1_layout(key_bytes)[1] * 512
    slot, key = luks.unlock(volume, image.read, b"pass")
    assert slot == 0 and len(key) == key_bytes
    with pytest.raises(luks.WrongPassphrase, match=r"matches no keyslot \(tried keyslot 0\)"):
        luks.unlock(volume, image.read, b"Pass")


def test_sector_cipher_round_trip_and_iv_per_sector():
    cipher = luks.SectorCipher(luks.CipherSpec.parse("aes", "xts-plain64"), os.urandom(64), 4096)
    plain = bytes(8192)
    data = bytearray(plain)
    cipher.encrypt(memoryview(data), 7)
    assert data[:4096] != data[4096:]  # same plaintext, different sectors
    cipher.decrypt(memoryview(data), 7)
    assert data == plain
    with pytest.raises(ValueError, match="whole number"):
        cipher.decrypt(memoryview(data)[:100], 0)


@pytest.mark.parametrize("kdf_type", ["argon2id", "argon2i", "pbkdf2"])
def test_luks2_written_then_unlocked(kdf_type):
    image = luks2_image(kdf_type, 4096)
    volume = luks.read_volume(image.read)
    assert (volume.version, volume.sector_size, volume.data_offset) == (2, 4096, 16 << 20)
    assert volume.keyslots[0].kdf.type == kdf_type and volume.notes == []
    assert volume.payload_size(len(image.data)) == 1 << 20
    assert luks.unlock(volume, image.read, b"secret")[0] == 0
    with pytest.raises(luks.WrongPassphrase):
        luks.unlock(volume, image.read, b"nope")


def _metadata(image: Image, offset: int) -> dict:
    return json.loads(image.data[offset + 4096:offset + 16384].split(b"\0", 1)[0])


def _rewrite_json(image: Image, offset: int, text: bytes) -> None:
    """Replace a header copy's JSON and fix its checksum (a well-formed but wrong copy)."""
    area = bytearray(image.data[offset:offset + 16384])
    area[4096:] = text.ljust(16384 - 4096, b"\0")
    area[448:512] = bytes(64)
    area[448:480] = hashlib.sha256(area).digest()
    image.data[offset:offset + 16384] = area


def test_damaged_primary_uses_the_secondary_and_says_so():
    image = luks2_image()
    image.data[5000] ^= 0xFF  # inside the primary's JSON area: its checksum fails
    volume = luks.read_volume(image.read)
    assert volume.notes == ["LUKS2 primary header is damaged (checksum mismatch): using the secondary copy"]
    assert luks.unlock(volume, image.read, b"secret")[0] == 0


def test_primary_magic_gone_finds_the_secondary():
    image = luks2_image()
    image.data[0:4096] = bytes(4096)
    volume = luks.read_volume(image.read)
    assert "primary header is damaged (bad magic or version)" in volume.notes[0]
    assert luks.unlock(volume, image.read, b"secret")[0] == 0


def test_both_copies_damaged_is_refused():
    image = luks2_image()
    image.data[5000] ^= 0xFF
    image.data[16384 + 5000] ^= 0xFF
    with pytest.raises(luks.LuksError, match=r"both LUKS2 header copies are damaged \(primary: "
                                             r"checksum mismatch; secondary: checksum mismatch\)"):
        luks.read_volume(image.read)


def test_malformed_json_in_both_copies_is_refused():
    image = luks2_image()
    for offset in (0, 16384):
        _rewrite_json(image, offset, b'{"keyslots": {')
    with pytest.raises(luks.LuksError, match="both .* malformed JSON metadata"):
        luks.read_volume(image.read)


def test_newer_secondary_wins():
    image = luks2_image()
    meta = _metadata(image, 16384)
    meta["segments"]["0"]["iv_tweak"] = "8"
    _rewrite_json(image, 16384, json.dumps(meta).encode())
    struct.pack_into(">Q", image.data, 16384 + 16, 2)  # a higher seqid
    _rewrite_json(image, 16384, json.dumps(meta).encode())
    volume = luks.read_volume(image.read)
    assert volume.iv_tweak == 8 and "using the secondary (sequence 2)" in volume.notes[0]


@pytest.mark.parametrize("change,message", [
    (lambda m: m["segments"]["0"].update(encryption="serpent-xts-plain64"),
     "unsupported cipher 'serpent-xts-plain64'"),
    (lambda m: m["segments"]["0"].update(encryption="aes-ecb"), "unsupported cipher mode 'aes-ecb'"),
    (lambda m: m["segments"]["0"].update(encryption="aes-xts-benbi"), "unsupported IV generator"),
    (lambda m: m["digests"]["0"].update(hash="whirlpool"), "unsupported hash 'whirlpool'"),
    (lambda m: m["segments"]["0"].update(type="linear"), "unsupported segment type 'linear'"),
    (lambda m: m["config"].update(requirements={"mandatory": ["online-reencrypt-v2"]}),
     "unsupported LUKS2 requirements: online-reencrypt-v2"),
])
def test_unsupported_volume_is_named(change, message):
    image = luks2_image()
    meta = _metadata(image, 0)
    change(meta)
    for offset in (0, 16384):
        _rewrite_json(image, offset, json.dumps(meta).encode())
    with pytest.raises(luks.UnsupportedLuks, match=message.replace("(", r"\(")):
        luks.read_volume(image.read)


@pytest.mark.parametrize("change,message", [
    (lambda s: s["kdf"].update(type="scrypt"), "unsupported KDF 'scrypt'"),
    (lambda s: s.update(type="luks3"), "unsupported keyslot type 'luks3'"),
    (lambda s: s["af"].update(hash="md4"), "unsupported hash 'md4'"),
])
def test_unsupported_keyslot_is_named(change, message):
    image = luks2_image()
    meta = _metadata(image, 0)
    change(meta["keyslots"]["0"])
    _rewrite_json(image, 0, json.dumps(meta).encode())
    _rewrite_json(image, 16384, json.dumps(meta).encode())
    volume = luks.read_volume(image.read)
    with pytest.raises(luks.UnsupportedLuks, match=f"no usable keyslot \\(keyslot 0: {message}"):
        luks.unlock(volume, image.read, b"secret")


def test_luks1_unsupported_cipher_and_hash_are_named():
    image = Image(3 << 20)
    luks.format_luks1(image.write, b"pass", luks.CipherSpec.parse("aes", "xts-plain64"), 64,
                      "sha256", 1000, 1000)
    image.data[8:40] = b"twofish".ljust(32, b"\0")
    with pytest.raises(luks.UnsupportedLuks, match="unsupported cipher 'twofish-xts-plain64'"):
        luks.read_volume(image.read)
    image.data[8:40] = b"aes".ljust(32, b"\0")
    image.data[72:104] = b"md5".ljust(32, b"\0")
    with pytest.raises(luks.UnsupportedLuks, match="unsupported hash 'md5'"):
        luks.read_volume(image.read)


def test_not_luks():
    with pytest.raises(luks.LuksError, match="not a LUKS image"):
        luks.read_volume(Image(8 << 20).read)


@pytest.mark.parametrize("mode,key_bytes", [("xts-plain64", 64), ("xts-plain64", 32), ("xts-plain", 64),
                                            ("cbc-essiv:sha256", 32), ("cbc-plain64", 24),
                                            ("cbc-plain", 16)])
@pytest.mark.parametrize("sector_size,tweak", [(512, 0), (4096, 8), (512, (1 << 32) - 3)])
def test_c_loop_evp_loop_and_cryptography_paths_agree(mode, key_bytes, sector_size, tweak):
    """The C extension's sector loop (built by the install), the same loop over cffi, and one
    ``cryptography`` Cipher per sector give the same bytes."""
    assert evp.C_LOOP is not None, "pynbd.formats._sectors was not built (no C compiler at install?)"
    spec, key = luks.CipherSpec.parse("aes", mode), os.urandom(key_bytes)
    fast = luks.SectorCipher(spec, key, sector_size, tweak)
    loop = luks.SectorCipher(spec, key, sector_size, tweak)
    loop.evp = evp.EvpSectors(spec.mode, key, c_loop=False)
    slow = luks.SectorCipher(spec, key, sector_size, tweak, use_evp=False)
    assert fast.evp is not None and fast.evp.c_loop is not None and slow.evp is None
    plain = os.urandom(8 * sector_size)
    results = []
    for cipher in (fast, loop, slow):
        one = bytearray(plain)
        cipher.encrypt(memoryview(one), 5)
        results.append(one)
    assert results[0] == results[1] == results[2] != plain
    for cipher in (fast, loop, slow):
        one = bytearray(results[0])
        cipher.decrypt(memoryview(one)[sector_size:], 6)  # a run that starts later
        assert one[sector_size:] == plain[sector_size:]


def test_c_loop_refuses_bad_arguments():
    """Wrong lengths are a ValueError from the extension, never a read past a buffer."""
    sectors = evp.EvpSectors("xts", os.urandom(64))
    with pytest.raises(ValueError, match="not whole sectors, or too few IVs"):
        sectors.run(memoryview(bytearray(1024)), 512, bytes(16), False)
    with pytest.raises(ValueError, match="not whole sectors"):
        sectors.run(memoryview(bytearray(1000)), 512, bytes(32), False)
    with pytest.raises(BufferError):
        sectors.run(memoryview(bytes(512)), 512, bytes(16), False)  # read-only buffer


@pytest.mark.parametrize("change", [
    lambda m: m.update(digests=[]),
    lambda m: m["config"].update(requirements="yes"),
    lambda m: m.update(segments={"0": {"type": "crypt", "offset": "x"}}),
    lambda m: m["segments"]["0"].update(size=[1]),
    lambda m: m["digests"]["0"].update(keyslots=[None]),
    lambda m: m["digests"]["0"].update(salt="***"),
    lambda m: m["keyslots"]["0"].update(af=7),
    lambda m: m["keyslots"]["0"]["kdf"].update(time=0),
    lambda m: m["keyslots"]["0"]["kdf"].update(memory=1),
    lambda m: m["keyslots"]["0"]["area"].update(offset=str(1 << 40)),
    lambda m: m.update(keyslots={"x": {}}),
])
def test_malformed_fields_are_refused_with_one_line(change):
    image = luks2_image()
    meta = _metadata(image, 0)
    change(meta)
    for offset in (0, 16384):
        _rewrite_json(image, offset, json.dumps(meta).encode())
    with pytest.raises(luks.LuksError) as caught:
        volume = luks.read_volume(image.read)
        luks.unlock(volume, image.read, b"secret")
    assert "\n" not in str(caught.value)
