"""TLS for the server: an SSLContext from an nbdkit-style certificates directory.

The directory holds ``server-cert.pem`` and ``server-key.pem``, and
``ca-cert.pem`` when client certificates are checked (``--tls-verify-peer``).
"""

from __future__ import annotations

import os
import ssl
import sys

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


def psk_context(path: str) -> ssl.SSLContext:
    """The server's TLS context for ``--tls-psk=FILE``: pre-shared keys in psktool's
    format (``identity:hexkey`` per line), as nbdkit reads them. Python's ssl offers
    PSK from 3.13 on; before that this is a ConfigError saying so."""
    set_callback = getattr(ssl.SSLContext, "set_psk_server_callback", None)
    if set_callback is None:
        raise ConfigError(f"--tls-psk needs Python 3.13 or later (its ssl module has no PSK before); "
                          f"this is Python {sys.version.split()[0]}: use --tls-certificates")
    keys: dict[str, bytes] = {}
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                identity, _, key = line.strip().partition(":")
                try:
                    keys[identity] = bytes.fromhex(key)
                except ValueError:
                    raise ConfigError(f"--tls-psk: {path}:{number}: expected identity:hexkey") from None
    except OSError as exc:
        raise ConfigError(f"--tls-psk: {path}: {exc.strerror}") from None
    if not keys:
        raise ConfigError(f"--tls-psk: {path} holds no key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("PSK")
    set_callback(context, lambda identity: keys.get(identity or "", b""))
    return context
