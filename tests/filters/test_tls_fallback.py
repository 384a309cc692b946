"""tls-fallback: plaintext clients read the notice, TLS clients the disk —
compared with nbdkit."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from stack_helpers import BOTH

from nbdtest import run, served

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """One self-signed certificate for localhost, serving as its own CA."""
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", "server-key.pem", "-out", "server-cert.pem", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], cwd=directory, check=True,
                   capture_output=True)
    shutil.copy(directory / "server-cert.pem", directory / "ca-cert.pem")
    return directory


READ = "print(h.get_size(), h.is_read_only(), bytes(h.pread(80, 0)).rstrip(b'\\\\0'))"


@pytest.mark.parametrize("readme", [[], ["tlsreadme=go away"]])
def test_plaintext_and_tls_clients_match_nbdkit(certs, readme):
    outcomes = []
    for server in BOTH:
        with served("--filter=tls-fallback", "pattern", "1M", *readme, server=server,
                    options=["--tls=on", f"--tls-certificates={certs}"]) as srv:
            plain = run(["nbdsh", "-c", f"h.set_export_name('other'); h.connect_unix({srv.socket!r})",
                         "-c", READ]).stdout
            listed = run(["nbdinfo", "--list", "--json", srv.uri]).stdout.count(b'"export-name"')
            secure = run(["nbdsh", "-c", f"h.set_tls(nbd.TLS_REQUIRE); "
                          f"h.set_tls_certificates({str(certs)!r}); h.connect_unix({srv.socket!r})",
                          "-c", READ]).stdout
            outcomes.append((plain, listed, secure))
    assert outcomes[0] == outcomes[1]
    plain, _, secure = outcomes[0]
    assert plain.split()[:2] == [b"512", b"True"] and secure.split()[:2] == [b"1048576", b"True"]
