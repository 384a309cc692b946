"""TLS for the server: an SSLContext from an nbdkit-style certificates directory.

The directory holds ``server-cert.pem`` and ``server-key.pem``, and
``ca-cert.pem`` when client certificates are checked (``--tls-verify-peer``).
"""

from __future__ import annotations

import os
import ssl

from ..backend import ConfigError


def server_context(cert_dir: str, verify_peer: bool = False) -> ssl.SSLContext:
    """Build the server's TLS context; ConfigError if files are missing."""
    cert = os.path.join(cert_dir, "server-cert.pem")
    key = os.path.join(cert_dir, "server-key.pem")
    ca = os.path.join(cert_dir, "ca-cert.pem")
    for path in (cert, key) + ((ca,) if verify_peer else ()):
        if not os.path.exists(path):
            raise ConfigError(f"--tls-certificates: {path} does not exist")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if verify_peer:
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-certificates: {cert_dir}: {exc}") from None
    return context
