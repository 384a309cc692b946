"""The server side of the fixed newstyle handshake, as a sans-IO state machine.

The driver (``server/``) owns the socket; this module owns the rules. It reads
exactly the bytes it asks for, so no byte of a TLS handshake or of the first
request is ever swallowed:

    hs = ServerHandshake(catalog, tls="off")
    send(hs.greeting())
    while True:
        event = hs.next_event()
        if isinstance(event, NeedData):     feed hs.receive_data(recv exactly event.size)
        elif isinstance(event, Send):       send(event.data)
        elif isinstance(event, StartTLS):   send(event.data); wrap the socket
        elif isinstance(event, Ready):      enter transmission with event.export
        elif isinstance(event, Closed):     drop the connection

The states and the events each may produce are listed in ``TRANSITIONS``;
``_goto`` refuses any other move, so the table is the whole story.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Protocol

from . import wire
from .constants import (
    BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    OPTION_HEADER_SIZE,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from .errors import ProtocolError
from .machine import ByteMachine, NeedData, Send


class UnknownExport(LookupError):
    """Raised by an ExportCatalog for a name it does not serve."""


@dataclass(frozen=True)
class ExportInfo:
    """What the client learns about one export."""

    name: str
    size: int
    flags: int  # TransmissionFlag bits, HAS_FLAGS included
    block_size: tuple[int, int, int]
    description: str = ""
    handle: object = None  # the driver's open export, handed back in Ready


class ExportCatalog(Protocol):
    """What the handshake needs from the server's backend."""

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of each export."""

    def open_export(self, name: str) -> ExportInfo:
        """Open the export (``""`` means the default); raise UnknownExport."""

    def close_export(self, info: ExportInfo) -> None:
        """Release an export opened for NBD_OPT_INFO or abandoned."""


# ------------------------------------------------------------------- events

@dataclass(frozen=True)
class StartTLS:
    """Send ``data`` (the ACK), then run the TLS handshake on the socket."""

    data: bytes


@dataclass(frozen=True)
class Ready:
    """The handshake is over; ``reply`` (maybe empty) still has to be sent."""

    reply: bytes
    export: ExportInfo
    structured_replies: bool
    extended_headers: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Closed:
    """The connection ends; ``reply`` (maybe empty) is sent first."""

    reason: str
    reply: bytes = b""


Event = NeedData | Send | StartTLS | Ready | Closed


class State(enum.Enum):
    CLIENT_FLAGS = "waiting for client flags"
    OPTION_HEADER = "waiting for an option header"
    OPTION_DATA = "waiting for option data"
    DONE = "handshake finished"


TRANSITIONS: dict[State, set[State]] = {
    State.CLIENT_FLAGS: {State.OPTION_HEADER, State.DONE},
    State.OPTION_HEADER: {State.OPTION_DATA, State.DONE},
    State.OPTION_DATA: {State.OPTION_HEADER, State.DONE},
    State.DONE: set(),
}

META_CONTEXT_IDS = {BASE_ALLOCATION: 1}


class ServerHandshake(ByteMachine[State]):
    """Negotiates one client connection up to the transmission phase."""

    transitions = TRANSITIONS

    def __init__(self, catalog: ExportCatalog, tls: str = "off",
                 forced_export: str | None = None) -> None:
        if tls not in ("off", "on", "require"):
            raise ValueError(f"tls must be off, on or require, not {tls!r}")
        super().__init__(State.CLIENT_FLAGS)
        self.catalog = catalog
        self.tls_mode = tls
        self.forced_export = forced_export
        self.tls_active = False
        self.no_zeroes = False
        self.structured_replies = False
        self.extended_headers = False
        self.meta_query: list[str] = []  # requested by SET_META_CONTEXT
        self.meta_export: str | None = None
        self._option = 0
        self._option_length = 0
        self._info: ExportInfo | None = None  # opened by INFO, reused by GO
        self._info_name = ""  # the name the client asked for when _info was opened

    # ---- driver interface
    def greeting(self) -> bytes:
        return wire.greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def tls_established(self) -> None:
        """The driver calls this once the TLS handshake succeeded."""
        self.tls_active = True
        # Everything negotiated in clear text is forgotten (spec: STARTTLS).
        self.structured_replies = self.extended_headers = False
        self.meta_query = []
        self._release_info()

    def next_event(self) -> Event:
        if self.state is State.DONE:
            raise ProtocolError("the handshake is already over")
        data = self._take(self._needed())
        if isinstance(data, NeedData):
            return data
        if self.state is State.CLIENT_FLAGS:
            return self._client_flags(data)
        if self.state is State.OPTION_HEADER:
            return self._option_header(data)
        self._goto(State.OPTION_HEADER)
        return self._dispatch(self._option, data)

    def abandon(self) -> None:
        """Release what the handshake holds (the client went away)."""
        self._release_info()
        if self.state is not State.DONE:
            self._goto(State.DONE)

    # ---- states
    def _needed(self) -> int:
        if self.state is State.CLIENT_FLAGS:
            return 4
        if self.state is State.OPTION_HEADER:
            return OPTION_HEADER_SIZE
        return self._option_length

    def _close(self, reason: str, reply: bytes = b"") -> Closed:
        self._release_info()
        self._goto(State.DONE)
        return Closed(reason, reply)

    def _client_flags(self, data: bytes) -> Event:
        (flags,) = wire.CLIENT_FLAGS.unpack(data)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return self._close(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._goto(State.OPTION_HEADER)
        return self.next_event()

    def _option_header(self, data: bytes) -> Event:
        try:
            option, length = wire.parse_option_header(data)
        except ProtocolError as exc:
            return self._close(str(exc))
        if length > MAX_OPTION_LENGTH:
            reason = f"option {option} payload of {length} bytes is too large"
            return self._close(reason, wire.option_reply(option, Rep.ERR_TOO_BIG, reason.encode()))
        self._option, self._option_length = option, length
        self._goto(State.OPTION_DATA)
        return self.next_event()

    # ---- options
    def _dispatch(self, option: int, data: bytes) -> Event:
        if self.tls_mode == "require" and not self.tls_active and option not in (
                Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                return self._close("client asked for an export before starting TLS")
            return self._reply(option, Rep.ERR_TLS_REQD, b"TLS is required")
        handler = self._HANDLERS.get(option)
        if handler is None:
            return self._reply(option, Rep.ERR_UNSUP,
                               f"option {option} is not supported".encode())
        try:
            return handler(self, option, data)
        except ProtocolError as exc:
            return self._reply(option, Rep.ERR_INVALID, str(exc).encode())

    def _reply(self, option: int, rep: int, data: bytes = b"") -> Send:
        return Send(wire.option_reply(option, rep, data))

    def _opt_abort(self, option: int, data: bytes) -> Event:
        return self._close("client sent NBD_OPT_ABORT", wire.option_reply(option, Rep.ACK))

    def _opt_list(self, option: int, data: bytes) -> Event:
        if data:
            return self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
        replies = [wire.option_reply(option, Rep.SERVER, wire.server_reply_payload(n, d))
                   for n, d in self.catalog.list_exports()]
        replies.append(wire.option_reply(option, Rep.ACK))
        return Send(b"".join(replies))

    def _opt_starttls(self, option: int, data: bytes) -> Event:
        if data:
            return self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        if self.tls_mode == "off":
            return self._reply(option, Rep.ERR_UNSUP, b"TLS is not enabled on this server")
        if self.tls_active:
            return self._reply(option, Rep.ERR_INVALID, b"TLS is already active")
        return StartTLS(wire.option_reply(option, Rep.ACK))

    def _opt_structured_reply(self, option: int, data: bytes) -> Event:
        if data:
            return self._reply(option, Rep.ERR_INVALID, b"option takes no data")
        if self.extended_headers:
            return self._reply(option, Rep.ERR_EXT_HEADER_REQD,
                               b"extended headers are already in use")
        if self.structured_replies:
            return self._reply(option, Rep.ERR_INVALID, b"structured replies already negotiated")
        self.structured_replies = True
        return self._reply(option, Rep.ACK)

    def _opt_extended_headers(self, option: int, data: bytes) -> Event:
        if data:
            return self._reply(option, Rep.ERR_INVALID, b"option takes no data")
        if self.extended_headers:
            return self._reply(option, Rep.ERR_INVALID, b"extended headers already negotiated")
        self.extended_headers = self.structured_replies = True
        return self._reply(option, Rep.ACK)

    def _opt_meta_context(self, option: int, data: bytes) -> Event:
        name, queries = wire.parse_meta_context_request(data)
        if not (self.structured_replies or self.extended_headers):
            return self._reply(option, Rep.ERR_INVALID,
                               b"negotiate structured replies first")
        chosen = _match_contexts(queries, listing=option == Opt.LIST_META_CONTEXT)
        replies = [wire.option_reply(option, Rep.META_CONTEXT,
                                     wire.meta_context_reply_payload(META_CONTEXT_IDS[c], c))
                   for c in chosen]
        if option == Opt.SET_META_CONTEXT:
            self.meta_query = chosen
            self.meta_export = name
        replies.append(wire.option_reply(option, Rep.ACK))
        return Send(b"".join(replies))

    def _opt_info_or_go(self, option: int, data: bytes) -> Event:
        name, requested = wire.parse_info_request(data)
        if len(name.encode()) > MAX_STRING:
            return self._reply(option, Rep.ERR_INVALID, b"export name too long")
        try:
            info = self._open(name)
        except UnknownExport as exc:
            return self._reply(option, Rep.ERR_UNKNOWN, str(exc).encode())
        except OSError as exc:
            return self._reply(option, Rep.ERR_PLATFORM,
                               f"cannot open export {name!r}: {exc.strerror or exc}".encode())
        info = self._for_client(info)
        replies = [wire.option_reply(option, Rep.INFO, wire.info_export(info.size, info.flags))]
        if Info.NAME in requested:
            replies.append(wire.option_reply(option, Rep.INFO, wire.info_name(info.name)))
        if Info.DESCRIPTION in requested and info.description:
            replies.append(wire.option_reply(option, Rep.INFO,
                                             wire.info_description(info.description)))
        replies.append(wire.option_reply(option, Rep.INFO, wire.info_block_size(*info.block_size)))
        replies.append(wire.option_reply(option, Rep.ACK))
        if option == Opt.INFO:
            return Send(b"".join(replies))
        return self._ready(b"".join(replies), info)

    def _opt_export_name(self, option: int, data: bytes) -> Event:
        try:
            name = data.decode()
            info = self._open(name)
        except (UnicodeDecodeError, UnknownExport, OSError) as exc:
            return self._close(f"NBD_OPT_EXPORT_NAME {data[:64]!r} refused: {exc}")
        info = self._for_client(info)
        return self._ready(wire.export_name_reply(info.size, info.flags, self.no_zeroes), info)

    def _open(self, name: str) -> ExportInfo:
        if self.forced_export is not None and name != self.forced_export and name != "":
            raise UnknownExport(f"no export named {name!r}")
        if self._info is not None and self._info_name == name:
            return self._info
        self._release_info()
        self._info = self.catalog.open_export(name)
        self._info_name = name
        return self._info

    def _for_client(self, info: ExportInfo) -> ExportInfo:
        """The export as this client sees it: DF only with structured replies."""
        if self.structured_replies or not info.flags & TransmissionFlag.SEND_DF:
            return info
        return replace(info, flags=info.flags & ~TransmissionFlag.SEND_DF)

    def _release_info(self) -> None:
        if self._info is not None:
            info, self._info = self._info, None
            self.catalog.close_export(info)

    def _ready(self, reply: bytes, info: ExportInfo) -> Ready:
        self._info = None  # handed over to the driver
        self._goto(State.DONE)
        contexts = {}
        if self.meta_export is None or self.meta_export == info.name or self.meta_export == "":
            contexts = {META_CONTEXT_IDS[c]: c for c in self.meta_query}
        return Ready(reply, info, self.structured_replies, self.extended_headers, contexts)

    _HANDLERS = {
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.EXTENDED_HEADERS: _opt_extended_headers,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
        Opt.INFO: _opt_info_or_go,
        Opt.GO: _opt_info_or_go,
        Opt.EXPORT_NAME: _opt_export_name,
    }


def _match_contexts(queries: list[str], listing: bool) -> list[str]:
    """The contexts this server offers that answer the client's queries."""
    offered = list(META_CONTEXT_IDS)
    if not queries:
        return offered if listing else []
    chosen: list[str] = []
    for query in queries:
        for context in offered:
            hit = query == context or (listing and query.endswith(":")
                                       and context.startswith(query))
            if hit and context not in chosen:
                chosen.append(context)
    return chosen
