"""ip: allow or deny clients by address, or by the process behind a Unix socket.

    pynbd serve --filter=ip file disk.img allow=127.0.0.1,::1 deny=all
    pynbd serve --filter=ip file disk.img deny=8.0.0.0/8
    pynbd serve -U /run/sock --filter=ip file disk.img allow=uid:`id -u` deny=all

Parameters (comma-separated rules; each may be given more than once)
    allow=RULE,...   clients matching any of these are served
    deny=RULE,...    otherwise, clients matching any of these are refused;
                     everyone else is served

Rules
    all, any                   every client
    allipv4, anyipv4           any IPv4 client
    allipv6, anyipv6           any IPv6 client
    allunix, anyunix           any client on a Unix socket
    allvsock, anyvsock         any AF_VSOCK client (pynbd does not listen on
                               vsock: never matches)
    A.B.C.D, A.B.C.D/NN        an IPv4 address or network
    A:B:..., A:B:.../NN        an IPv6 address or network
    pid:PID, uid:UID, gid:GID  the process, user or (primary) group of a
                               client on a Unix socket (its peer credentials)
    vsock-cid:CID, vsock-port:PORT
                               accepted, never match (no vsock)

A refused client is disconnected when it asks for an export (``ip: client
denied``) and the server logs it; other clients are not affected. Without
allow and deny the filter does nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..backend import ConfigError, Connection, Filter, OpenContext, Param, io_error
from ..backend.shutdown import disconnect_client

log = logging.getLogger("pynbd.filters.ip")

_KEYWORDS = {"all": "any", "any": "any", "allipv4": "ipv4", "anyipv4": "ipv4",
             "allipv6": "ipv6", "anyipv6": "ipv6", "allunix": "unix", "anyunix": "unix",
             "allvsock": "vsock", "anyvsock": "vsock"}
_CREDENTIALS = ("pid", "uid", "gid")


@dataclass(frozen=True)
class Peer:
    """What the rules look at: the IP address, or a Unix client's credentials."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    unix: bool = False
    pid: int = -1
    uid: int = -1
    gid: int = -1


def peer_of(ctx: OpenContext) -> Peer:
    """Who the client is: its IP address, or the credentials of a Unix-socket client."""
    address = ctx.client_address
    if isinstance(address, tuple) and address:
        return Peer(ip=ipaddress.ip_address(str(address[0]).split("%")[0]))
    creds = ctx.peer_credentials
    if creds is None:
        return Peer(unix=True)
    return Peer(unix=True, pid=creds[0], uid=creds[1], gid=creds[2])


def parse_rule(text: str) -> Callable[[Peer], bool]:
    """A predicate for one rule; ValueError if it is not one."""
    word = text.strip().lower()
    kind = _KEYWORDS.get(word)
    if kind == "any":
        return lambda peer: True
    if kind == "ipv4":
        return lambda peer: peer.ip is not None and peer.ip.version == 4
    if kind == "ipv6":
        return lambda peer: peer.ip is not None and peer.ip.version == 6
    if kind == "unix":
        return lambda peer: peer.unix
    if kind == "vsock":
        return lambda peer: False
    name, sep, value = word.partition(":")
    if sep and name in _CREDENTIALS:
        number = int(value)
        return lambda peer: peer.unix and getattr(peer, name) == number
    if sep and name in ("vsock-cid", "vsock-port"):
        int(value)
        return lambda peer: False
    network = ipaddress.ip_network(word, strict=False)
    return lambda peer: peer.ip is not None and peer.ip in network


class IpFilter(Filter):
    short_requests = True
    name = "ip"
    params = (
        Param("allow", "str", "rules of clients always served", repeat=True),
        Param("deny", "str", "rules of clients refused unless allowed", repeat=True),
    )
    allow: list[str]
    deny: list[str]

    def config_complete(self) -> None:
        def rules(key: str, values: list[str]) -> list[Callable[[Peer], bool]]:
            parsed = []
            for text in (rule for value in values for rule in value.split(",") if rule.strip()):
                try:
                    parsed.append(parse_rule(text))
                except ValueError:
                    raise ConfigError(f"ip: {key}={text}: not an address, network or rule "
                                      f"(all, anyipv4, anyipv6, anyunix, pid:, uid:, gid:, …)") from None
            return parsed
        self.allowed = rules("allow", self.allow)
        self.denied = rules("deny", self.deny)

    def permits(self, peer: Peer) -> bool:
        if any(rule(peer) for rule in self.allowed):
            return True
        return not any(rule(peer) for rule in self.denied)

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        if self.allowed or self.denied:
            peer = peer_of(ctx)
            if not self.permits(peer):
                log.error("ip: client %s denied", ctx.client_address)
                disconnect_client(ctx)
                raise io_error(errno.EPERM, "ip: client denied")
        return super().open(next_open, ctx)
