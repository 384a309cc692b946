"""--tls=on|require with --tls-certificates=DIR and --tls-verify-peer, against nbdinfo.

A fixture makes a throwaway CA with openssl, a server certificate for
localhost and a client certificate, laid out as nbdkit and libnbd expect
(ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
client-key.pem in one directory). A second directory holds only the CA: a
client that can check the server but has no certificate of its own.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rawnbd import (
    IHAVEOPT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_TLS_REQD,
    RawClient,
)

from nbdtest import SERVE, run, served

REP_ERR_POLICY = 2**31 + 2

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(name: str, subject: str, usage: str, cwd: Path) -> None:
    """A key and a certificate for ``name``, signed by the CA in ``cwd``."""
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
            "-subj", subject, "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-out", f"{name}-cert.pem",
            "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Path, Path]:
    full = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
            "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=pynbd test CA", cwd=full)
    issue("server", "/CN=localhost", "serverAuth", full)
    issue("client", "/CN=pynbd test client", "clientAuth", full)
    ca_only = tmp_path_factory.mktemp("ca-only")
    shutil.copy(full / "ca-cert.pem", ca_only / "ca-cert.pem")
    return full, ca_only


def tls_uri(srv, certs: Path) -> str:
    return f"nbds+unix:///?socket={srv.socket}&tls-certificates={certs}"


def nbdinfo(uri: str) -> subprocess.CompletedProcess:
    return run(["nbdinfo", "--json", uri], check=False, timeout=60)


def test_tls_on_serves_both_kinds_of_client(pki):
    certs, _ = pki
    with served("memory", "1M", options=["--tls=on", f"--tls-certificates={certs}"]) as srv:
        secure = nbdinfo(tls_uri(srv, certs))
        assert secure.returncode == 0, secure.stderr.decode()
        assert json.loads(secure.stdout)["exports"][0]["export-size"] == 1 << 20
        assert nbdinfo(srv.uri).returncode == 0  # plain text is still allowed


def test_tls_data_round_trip_with_qemu_and_libnbd(pki):
    certs, _ = pki
    with served("memory", "4M", options=["--tls=require", f"--tls-certificates={certs}"]) as srv:
        image = (f"driver=nbd,server.type=unix,server.path={srv.socket},"
                 "tls-creds=tls0,tls-hostname=localhost")
        out = run(["qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
                   "--image-opts", image, "-c", "write -P 0x5c 1M 1M"]).stdout
        assert b"wrote 1048576/1048576" in out
        code = ("h.set_uri_allow_local_file(True); "
                f"h.connect_uri('{tls_uri(srv, certs)}'); "
                "assert h.pread(1 << 20, 1 << 20) == b'\\x5c' * (1 << 20); "
                "h.pwrite(b'\\x01' * 512, 0); print(h.pread(2, 0).hex())")
        assert run(["nbdsh", "-c", code]).stdout.strip() == b"0101"


def test_tls_require_refuses_a_plain_client(pki):
    certs, _ = pki
    with served("memory", "1M", options=["--tls=require", f"--tls-certificates={certs}"]) as srv:
        assert nbdinfo(srv.uri).returncode != 0
        with RawClient.connect(srv.socket) as plain:
            plain.greet()
            assert plain.go()[-1][0] == REP_ERR_TLS_REQD
        assert nbdinfo(tls_uri(srv, certs)).returncode == 0


def test_verify_peer_refuses_a_client_without_certificate(pki):
    certs, ca_only = pki
    options = ["--tls=require", f"--tls-certificates={certs}", "--tls-verify-peer"]
    with served("memory", "1M", options=options) as srv:
        assert nbdinfo(tls_uri(srv, ca_only)).returncode != 0
        good = nbdinfo(tls_uri(srv, certs))
        assert good.returncode == 0, good.stderr.decode()
        assert srv.proc.poll() is None


def test_run_uri_uses_nbds_under_require(pki):
    certs, _ = pki
    result = run([*SERVE, "-U", "-", "--tls=require", f"--tls-certificates={certs}",
                  "memory", "1M", "--run", f'nbdinfo --size "$uri&tls-certificates={certs}"'])
    assert result.stdout.strip() == b"1048576"


def test_missing_certificate_files_are_a_config_error(tmp_path):
    result = run([*SERVE, "-f", "-U", "-", "--tls=on", f"--tls-certificates={tmp_path}",
                  "memory", "1M"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "server-cert.pem" in err and "Traceback" not in err


def test_require_leaks_nothing_before_starttls(pki):
    """INFO, GO and LIST get NBD_REP_ERR_TLS_REQD with no export facts; EXPORT_NAME ends the
    connection without a size."""
    certs, _ = pki
    with served("memory", "1M", options=["--tls=require", f"--tls-certificates={certs}"]) as srv:
        with RawClient.connect(srv.socket) as plain:
            plain.greet()
            for option, data in ((OPT_INFO, b"\0\0\0\0\0\0"), (OPT_GO, b"\0\0\0\0\0\0"), (OPT_LIST, b"")):
                replies = plain.option(option, data)
                assert [r[0] for r in replies] == [REP_ERR_TLS_REQD], option
                assert b"1048576" not in b"".join(r[1] for r in replies)
            plain.send_option(OPT_EXPORT_NAME, b"")
            assert plain.is_closed()


def test_bytes_sent_after_starttls_are_never_read_as_options(pki):
    """The STARTTLS injection class of bug: a GO pipelined after STARTTLS in clear text must not
    be answered; those bytes are the start of the TLS handshake, which then fails."""
    certs, _ = pki
    with served("memory", "1M", options=["--tls=require", f"--tls-certificates={certs}"]) as srv:
        with RawClient.connect(srv.socket) as plain:
            plain.greet()
            go = struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + b"\0" * 6
            plain.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0) + go)
            option, reply, _ = plain.read_option_reply()
            assert (option, reply) == (OPT_STARTTLS, REP_ACK)
            rest = b""
            try:
                while chunk := plain.sock.recv(4096):
                    rest += chunk
            except ConnectionResetError:
                pass  # the server gave up on the "TLS handshake"
            assert struct.pack(">Q", 0x3E889045565A9) not in rest  # no option reply in clear text
        assert nbdinfo(tls_uri(srv, certs)).returncode == 0


def test_starttls_on_a_server_without_tls_is_refused_by_policy():
    with served("memory", "1M") as srv:
        with RawClient.connect(srv.socket) as client:
            client.greet()
            assert client.option(OPT_STARTTLS) == [(REP_ERR_POLICY, b"TLS is not enabled on this server")]
            assert client.go()[-1][0] == REP_ACK  # the session goes on without TLS


def test_tls_psk_says_what_it_needs(tmp_path):
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:0123456789abcdef\n")
    result = run([*SERVE, "-f", "-U", str(tmp_path / "s"), "--tls=require", f"--tls-psk={keys}",
                  "memory", "1M"], check=False)
    assert result.returncode == 1
    error = result.stderr.decode()
    if sys.version_info < (3, 13):
        assert "--tls-psk needs Python 3.13 or later" in error
    missing = run([*SERVE, "-f", "-U", str(tmp_path / "s"), "--tls=require", "memory", "1M"], check=False)
    assert "--tls needs --tls-certificates=DIR or --tls-psk=FILE" in missing.stderr.decode()
