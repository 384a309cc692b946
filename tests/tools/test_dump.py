"""pynbd dump against nbddump: byte-identical output."""

import pytest

from nbdtest import PYNBD, run, served

DUMP = [*PYNBD, "dump"]


@pytest.mark.parametrize("data", [
    ["1 2 3 @0x100 104 101 108 108 111 @0x1000 1 @0x1400 0"],  # text, folds, short tail
    ["1", "size=4096"],                                      # folded tail, last line shown
    ["1", "size=4004"],                                      # short last line after a fold
    ["@0x200000 1 2 3", "size=3000001"],                     # data past the first chunk
    ["(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 255 128)*3000"],  # no folding at all
])
@pytest.mark.parametrize("length", [None, "100", "64", "4097"])
def test_same_bytes_as_nbddump(data, length):
    opts = [] if length is None else ["-n", length]
    with served("data", *data, server="nbdkit") as srv:
        theirs = run(["nbddump", *opts, srv.uri]).stdout
        ours = run([*DUMP, *opts, srv.uri]).stdout
    assert ours == theirs


def test_pynbd_server_and_captive():
    with served("memory", "64K") as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x41 16 16", srv.uri])
        ours = run([*DUMP, srv.uri]).stdout
        assert ours == run(["nbddump", srv.uri]).stdout
    assert b"|AAAAAAAAAAAAAAAA|" in ours
    captive = run([*DUMP, "-n", "16", "--", "[", "nbdkit", "data", "65 66", "]"]).stdout
    assert captive.startswith(b"0000000000: 41 42") and captive.count(b"\n") == 1


def test_bad_inputs():
    for args in (["nbd+unix:///"], ["nbd://127.0.0.1:1/"], ["-n", "lots", "nbd://x/"]):
        result = run([*DUMP, *args], check=False)
        assert result.returncode == 1 and result.stderr.count(b"\n") == 1
        assert result.stderr.startswith(b"pynbd dump: ")
