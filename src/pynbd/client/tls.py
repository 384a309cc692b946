"""TLS for the client: an SSLContext from a libnbd/nbdkit certificates directory.

With ``tls-certificates=DIR`` the directory holds ``ca-cert.pem`` (the CA
that signed the server) and, when the server checks clients,
``client-cert.pem`` and ``client-key.pem``. Without it the system's trusted
CAs are used. ``tls-verify-peer=false`` accepts any server certificate.
"""

from __future__ import annotations

import errno
import os
import ssl

from .errors import NBDError


def client_context(cert_dir: str | None, verify_peer: bool, check_hostname: bool) -> ssl.SSLContext:
    """Build the client's TLS context; NBDError if the directory is unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        _load(context, cert_dir)
    except (OSError, ssl.SSLError) as exc:
        raise NBDError(errno.EINVAL, f"tls-certificates {cert_dir}: {exc}") from None
    context.check_hostname = verify_peer and check_hostname
    context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return context


def _load(context: ssl.SSLContext, cert_dir: str | None) -> None:
    if cert_dir is None:
        context.load_default_certs()
        return
    if not os.path.isdir(cert_dir):
        raise FileNotFoundError(errno.ENOENT, "not a directory")
    ca = os.path.join(cert_dir, "ca-cert.pem")
    if os.path.exists(ca):
        context.load_verify_locations(ca)
    else:
        context.load_default_certs()
    cert, key = os.path.join(cert_dir, "client-cert.pem"), os.path.join(cert_dir, "client-key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        context.load_cert_chain(cert, key)
