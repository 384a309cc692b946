"""pynbd info against nbdinfo: the same servers, the same answers."""

import json
from contextlib import contextmanager

import pytest

from client.nbdpeers import make_pki, make_qcow2, nbd_server, qemu_nbd
from nbdtest import PYNBD, run, served

INFO = [*PYNBD, "info"]
# Fields nbdinfo 1.14 prints that pynbd must print identically.
FIELDS = ["export-name", "description", "content", "uri", "contexts", "is_rotational",
          "is_read_only", "can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
          "can_multi_conn", "can_trim", "can_zero", "block_size_minimum", "block_size_preferred",
          "block_size_maximum", "export-size", "export-size-str"]


@contextmanager
def server(kind, tmp_path):
    if kind == "pynbd":
        with served("memory", "4M") as srv:
            yield srv.uri
    elif kind == "nbdkit":
        with served("data", "1 2 3 @1048576 4", "size=4M", server="nbdkit") as srv:
            yield srv.uri
    elif kind == "qemu-nbd":
        with qemu_nbd(make_qcow2(tmp_path), "-A", "-D", "a qcow2 disk") as uri:
            yield uri
    else:
        image = tmp_path / "disk.img"
        image.write_bytes(b"\x55\xaa" * 1024 + bytes(2 * 1024 * 1024))
        with nbd_server(image) as uri:
            yield uri


def both(args):
    theirs = run(["nbdinfo", *args]).stdout.decode()
    ours = run([*INFO, *args]).stdout.decode()
    return theirs, ours


KINDS = ["pynbd", "nbdkit", "qemu-nbd", "nbd-server"]


@pytest.mark.parametrize("kind", KINDS)
def test_json_fields_match_nbdinfo(kind, tmp_path):
    with server(kind, tmp_path) as uri:
        theirs, ours = both(["--json", uri])
    theirs, ours = json.loads(theirs), json.loads(ours)
    for key in ("protocol", "TLS"):
        assert ours[key] == theirs[key]
    if kind != "pynbd":  # libnbd 1.14 has no extended headers; pynbd serve offers them
        assert ours["structured"] == theirs["structured"]
    mine, other = ours["exports"][0], theirs["exports"][0]
    fields = FIELDS
    if kind == "nbd-server":
        # nbd-server 3.24 answers NBD_OPT_INFO with size 0 and nbdinfo believes it;
        # pynbd info takes the size NBD_OPT_GO reports, so size and content differ.
        fields = [f for f in FIELDS if f not in ("content", "export-size", "export-size-str")]
        assert mine["export-size"] == 2 * 1024 * 1024 + 2048
    for key in fields:
        assert mine.get(key) == other.get(key), key


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_text_output_matches_nbdinfo(kind, tmp_path):
    with server(kind, tmp_path) as uri:
        theirs, ours = both([uri])
    assert ours == theirs


@pytest.mark.parametrize("kind", ["pynbd", "nbdkit", "qemu-nbd"])
@pytest.mark.parametrize("options", [["--map"], ["--map", "--totals"], ["--map", "--json"],
                                     ["--map", "--totals", "--json"]])
def test_map_lines_match_nbdinfo(kind, options, tmp_path):
    with server(kind, tmp_path) as uri:
        if kind == "pynbd":
            run(["qemu-io", "-f", "raw", "-c", "write -P 7 64k 64k", uri])
        theirs, ours = both([*options, uri])
    assert ours == theirs


def test_map_without_structured_replies_fails_like_nbdinfo(tmp_path):
    with server("nbd-server", tmp_path) as uri:
        assert run(["nbdinfo", "--map", uri], check=False).returncode == 1
        assert "does not support metadata context" in one_line_error(["--map", uri])


def test_qemu_allocation_depth_map(tmp_path):
    with server("qemu-nbd", tmp_path) as uri:
        theirs, ours = both(["--map=qemu:allocation-depth", uri])
    assert ours == theirs and "local" in ours


def test_list_and_size(tmp_path):
    with server("qemu-nbd", tmp_path) as uri:
        assert both(["--list", uri])[0] == both(["--list", uri])[1]
        assert run([*INFO, "--size", uri]).stdout == b"4194304\n"


@pytest.mark.parametrize("flag, expect", [
    (["--can", "read"], 0), (["--can", "write"], 2), (["--is", "read-only"], 0),
    (["--can", "zero"], 2), (["--can", "structured-reply"], 0), (["--is", "tls"], 2),
    (["--can", "multi-conn"], 0),
])
def test_can_and_is_exit_codes(flag, expect):
    with served("memory", "1M", server="nbdkit", options=["-r"]) as srv:
        code = run([*INFO, *flag, srv.uri], check=False).returncode
        assert code == run(["nbdinfo", *flag, srv.uri], check=False).returncode == expect


def test_captive_server_and_no_content(tmp_path):
    image = make_qcow2(tmp_path)
    out = run([*INFO, "--no-content", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(image), "]"])
    text = out.stdout.decode()
    assert "export-size: 4194304 (4M)" in text and "content:" not in text
    out = run([*INFO, "--content", "--json", "[", "nbdkit", "data", "1 2 3", "]"])
    assert json.loads(out.stdout)["exports"][0]["content"]


def one_line_error(args):
    result = run([*INFO, *args], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1 and err.startswith("pynbd info: "), err
    return err


def test_bad_inputs_give_one_line(tmp_path):
    assert "invalid NBD URI" in one_line_error(["nbd:/x"])
    assert "unknown scheme" in one_line_error(["ftp://host/"])
    assert "Connection refused" in one_line_error(["nbd://127.0.0.1:1/"])
    assert "No such file" in one_line_error([f"nbd+unix:///?socket={tmp_path}/none"])
    with server("qemu-nbd", tmp_path) as uri:
        assert "no such export" in one_line_error([uri.replace(":///", ":///missing")])
    assert "does not support metadata context" in one_line_error(
        ["--map=qemu:nope", "--", "[", "nbdkit", "memory", "1M", "]"])
    pki = make_pki(tmp_path)
    with served("memory", "1M", server="nbdkit",
                options=["--tls=require", f"--tls-certificates={pki}"]) as srv:
        assert "requires TLS" in one_line_error([srv.uri])
        secure = f"nbds+unix:///?socket={srv.socket}&tls-certificates={pki}"
        assert run([*INFO, "--is", "tls", secure], check=False).returncode == 0
