"""NBD URIs, as doc/uri.md of the NBD project defines them.

    nbd://HOST[:PORT]/[EXPORT]             TCP (default port 10809)
    nbds://HOST[:PORT]/[EXPORT]            TCP with TLS required
    nbd+unix:///[EXPORT]?socket=PATH       Unix domain socket
    nbds+unix:///[EXPORT]?socket=PATH      Unix domain socket with TLS
    nbd+vsock://CID[:PORT]/[EXPORT]        AF_VSOCK
    nbds+vsock://CID[:PORT]/[EXPORT]

The export name is the path after the first ``/``, percent-decoded (so
``nbd://host//x`` names the export ``/x``). Query parameters understood:
``socket=`` (Unix socket path), ``tls-certificates=DIR`` (a directory with
``ca-cert.pem`` and optionally ``client-cert.pem``/``client-key.pem``),
``tls-verify-peer=false``, and ``tls-username`` (also taken from the user part).
Unknown query parameters are ignored, as the specification asks.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..proto.constants import NBD_DEFAULT_PORT
from .errors import NBDError

SCHEMES = {
    "nbd": ("tcp", False), "nbds": ("tcp", True),
    "nbd+tcp": ("tcp", False), "nbds+tcp": ("tcp", True),
    "nbd+unix": ("unix", False), "nbds+unix": ("unix", True),
    "nbd+vsock": ("vsock", False), "nbds+vsock": ("vsock", True),
}
VSOCK_DEFAULT_PORT = NBD_DEFAULT_PORT


@dataclass(frozen=True)
class NBDURI:
    """A parsed NBD URI."""

    transport: str  # "tcp", "unix" or "vsock"
    tls: bool
    export_name: str = ""
    host: str = ""
    port: int = NBD_DEFAULT_PORT
    socket: str = ""
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_username: str | None = None

    def __str__(self) -> str:
        return format_uri(self)


def _bad(uri: str, why: str) -> NBDError:
    return NBDError(errno.EINVAL, f"invalid NBD URI {uri!r}: {why}")


def parse_uri(uri: str) -> NBDURI:
    """Parse ``uri``; raise NBDError(EINVAL) with the reason if it is not an NBD URI."""
    try:
        parts = urlsplit(uri)
        port_text = parts.port
    except ValueError as exc:
        raise _bad(uri, str(exc)) from None
    if not parts.scheme:
        raise _bad(uri, "no scheme; NBD URIs start with nbd://, nbds:// or nbd+unix://")
    if parts.scheme.lower() not in SCHEMES:
        raise _bad(uri, f"unknown scheme {parts.scheme!r}")
    transport, tls = SCHEMES[parts.scheme.lower()]
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    common = NBDURI(transport=transport, tls=tls, export_name=export,
                    tls_certificates=query.get("tls-certificates"),
                    tls_verify_peer=_bool(uri, query.get("tls-verify-peer", "true")),
                    tls_username=query.get("tls-username") or (unquote(parts.username)
                                                               if parts.username else None))
    if transport == "unix":
        if parts.hostname:
            raise _bad(uri, "a Unix socket URI has no host (write nbd+unix:///EXPORT?socket=PATH)")
        if not query.get("socket"):
            raise _bad(uri, "missing ?socket=PATH")
        return replace(common, socket=query["socket"])
    if not parts.hostname:
        raise _bad(uri, "missing host name")
    if "socket" in query:
        raise _bad(uri, "?socket= is only allowed with nbd+unix://")
    if transport == "vsock" and not parts.hostname.isdigit():
        raise _bad(uri, "the host of a vsock URI is a numeric CID")
    return replace(common, host=parts.hostname, port=port_text or NBD_DEFAULT_PORT)


def _bool(uri: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _bad(uri, f"not a boolean: {text!r}")


def format_uri(u: NBDURI) -> str:
    """The canonical URI text for ``u`` (what ``pynbd info`` prints)."""
    scheme = "nbds" if u.tls else "nbd"
    path = "/" + quote(u.export_name, safe="/:@")
    if u.transport == "unix":
        return f"{scheme}+unix://{path}?socket={quote(u.socket, safe='/')}"
    host = f"[{u.host}]" if ":" in u.host else u.host
    prefix = f"{scheme}+vsock" if u.transport == "vsock" else scheme
    return f"{prefix}://{host}:{u.port}{path}"


def is_uri(text: str) -> bool:
    """True if ``text`` looks like an NBD URI (has one of the NBD schemes)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES
