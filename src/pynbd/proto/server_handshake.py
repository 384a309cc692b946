"""The server side of the fixed newstyle handshake, as a sans-IO state machine.

The driver (``server/``) owns the socket and the plugin stack; this module
owns the rules. It reads exactly the bytes it asks for, so no byte of a TLS
handshake or of the first request is ever swallowed, and it never runs
plugin code: when it needs the list of exports or an opened export it asks
with an event, and the driver answers before asking for the next event::

    hs = ServerHandshake(tls="off")
    send(hs.greeting())
    while True:
        event = hs.next_event()
        NeedData      feed hs.receive_data(recv exactly event.size)
        Send          send(event.data)
        StartTLS      send(event.data); wrap the socket; hs.tls_established()
        ListExports   hs.exports_listed([(name, description), ...])
        OpenExport    open event.name ("" is the default); answer
                      hs.export_opened(ExportInfo(...)), or hs.export_refused(...);
                      keep it open only if event.keep (NBD_OPT_GO / EXPORT_NAME)
        Ready         enter transmission with the export kept open
        Closed        drop the connection (close an export kept open)

The states and the moves between them are listed in ``TRANSITIONS``; ``_goto``
refuses any other move, so the table is the whole story. Errors follow h11: a
peer that breaks the protocol gets an option error reply or a ``Closed``
event; a driver that misuses the machine (answers what was not asked, asks
for events while an answer is due, goes on after the end) gets
``LocalProtocolError``; and any exception raised inside the machine moves it
to ``State.ERROR``, where every later call raises ``LocalProtocolError``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace

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
from .errors import LocalProtocolError, ProtocolError
from .machine import ByteMachine, NeedData, Send


@dataclass(frozen=True)
class ExportInfo:
    """What the client learns about one export."""

    name: str
    size: int
    flags: int  # TransmissionFlag bits, HAS_FLAGS included
    block_size: tuple[int, int, int]
    description: str = ""


# ------------------------------------------------------------------- events

@dataclass(frozen=True)
class StartTLS:
    """Send ``data`` (the ACK), then run the TLS handshake on the socket."""

    data: bytes


@dataclass(frozen=True)
class ListExports:
    """Answer with ``exports_listed``: the (name, description) of each export."""


@dataclass(frozen=True)
class OpenExport:
    """Open export ``name`` ("" is the default) and answer with ``export_opened``
    or ``export_refused``. Keep it open for the transmission phase only if
    ``keep`` (NBD_OPT_GO, NBD_OPT_EXPORT_NAME); otherwise (NBD_OPT_INFO)
    close it once its facts are known."""

    name: str
    keep: bool


@dataclass(frozen=True)
class ListMetaContexts:
    """Answer with ``meta_contexts_listed``: the meta contexts export ``name``
    ("" is the default) answers besides ``base:allocation`` (asked by
    NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT)."""

    name: str


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


Event = NeedData | Send | StartTLS | ListExports | OpenExport | ListMetaContexts | Ready | Closed


class State(enum.Enum):
    CLIENT_FLAGS = "waiting for client flags"
    OPTION_HEADER = "waiting for an option header"
    OPTION_DATA = "waiting for option data"
    ANSWER = "waiting for the driver's answer"
    DONE = "handshake finished"
    ERROR = "failed"


TRANSITIONS: dict[State, set[State]] = {
    State.CLIENT_FLAGS: {State.OPTION_HEADER, State.DONE, State.ERROR},
    State.OPTION_HEADER: {State.OPTION_DATA, State.DONE, State.ERROR},
    State.OPTION_DATA: {State.OPTION_HEADER, State.ANSWER, State.DONE, State.ERROR},
    State.ANSWER: {State.OPTION_HEADER, State.DONE, State.ERROR},
    State.DONE: {State.ERROR},
    State.ERROR: set(),
}


class ServerHandshake(ByteMachine[State]):
    """Negotiates one client connection up to the transmission phase."""

    transitions = TRANSITIONS

    def __init__(self, tls: str = "off", forced_export: str | None = None,
                 global_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
                 structured_replies: bool = True, meta_contexts: bool = True) -> None:
        """``global_flags``: the handshake flags offered (nbdkit's --mask-handshake);
        ``structured_replies`` / ``meta_contexts`` False: those options are
        answered NBD_REP_ERR_UNSUP (--no-sr, --no-meta-contexts)."""
        if tls not in ("off", "on", "require"):
            raise ValueError(f"tls must be off, on or require, not {tls!r}")
        super().__init__(State.CLIENT_FLAGS)
        self.tls_mode = tls
        self.forced_export = forced_export
        self.global_flags = global_flags
        self.offers: dict[int, bool] = {
            Opt.STRUCTURED_REPLY: structured_replies, Opt.EXTENDED_HEADERS: structured_replies,
            Opt.LIST_META_CONTEXT: meta_contexts, Opt.SET_META_CONTEXT: meta_contexts}
        self.tls_active = False
        self.no_zeroes = False
        self.structured_replies = False
        self.extended_headers = False
        self.meta_ids: dict[str, int] = {}  # chosen by SET_META_CONTEXT → the ids they were given
        self.meta_export: str | None = None
        self._meta_queries: list[str] = []  # of the LIST/SET_META_CONTEXT being answered
        self._option = 0
        self._option_length = 0
        self._asked: ListExports | OpenExport | ListMetaContexts | None = None  # awaiting an answer
        self._resume: Callable[[], Event] | None = None  # set by the answer
        self._failure = ""
        self._requested_infos: list[int] = []  # NBD_INFO_* the client asked for with INFO/GO

    # ---- driver interface
    def greeting(self) -> bytes:
        return wire.greeting(self.global_flags)

    def tls_established(self) -> None:
        """The driver calls this once the TLS handshake succeeded."""
        self._usable()
        self.tls_active = True
        # Everything negotiated in clear text is forgotten (spec: STARTTLS).
        self.structured_replies = self.extended_headers = False
        self.meta_ids = {}
        self.meta_export = None

    def receive_data(self, data: bytes) -> None:
        self._usable()
        super().receive_data(data)

    def next_event(self) -> Event:
        """The next thing the driver must do. Any exception poisons the machine."""
        self._usable()
        if self.state is State.DONE:
            raise LocalProtocolError("the handshake is already over")
        try:
            return self._next()
        except BaseException as exc:
            self._fail(exc)
            raise

    def exports_listed(self, exports: list[tuple[str, str]]) -> None:
        """Answer ``ListExports``."""
        self._answering(ListExports)

        def reply() -> Event:
            replies = [wire.option_reply(self._option, Rep.SERVER, wire.server_reply_payload(n, d))
                       for n, d in exports]
            replies.append(wire.option_reply(self._option, Rep.ACK))
            return self._option_done(Send(b"".join(replies)))
        self._resume = reply

    def export_opened(self, info: ExportInfo) -> None:
        """Answer ``OpenExport``: the export's facts as the stack reports them."""
        self._answering(OpenExport)
        keep = isinstance(self._asked, OpenExport) and self._asked.keep
        self._resume = lambda: self._opened(keep, self._for_client(info))

    def meta_contexts_listed(self, names: list[str]) -> None:
        """Answer ``ListMetaContexts``: the export's contexts besides base:allocation."""
        self._answering(ListMetaContexts)
        option, queries = self._option, self._meta_queries
        export = self._asked.name if isinstance(self._asked, ListMetaContexts) else ""
        self._resume = lambda: self._meta_contexts_reply(option, export, queries,
                                                          [BASE_ALLOCATION, *names])

    def export_refused(self, message: str, unknown: bool = True) -> None:
        """Answer ``OpenExport``: no such export (``unknown``) or it failed to open."""
        self._answering(OpenExport)
        if self._option == Opt.EXPORT_NAME:
            self._resume = lambda: self._close(f"NBD_OPT_EXPORT_NAME refused: {message}")
        else:
            rep = Rep.ERR_UNKNOWN if unknown else Rep.ERR_PLATFORM
            self._resume = lambda: self._option_done(self._reply(self._option, rep, message.encode()))

    # ---- error handling (h11's way)
    def _usable(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError(f"the handshake failed earlier ({self._failure}); "
                                     f"it cannot be used any more")

    def _fail(self, exc: BaseException) -> None:
        self._failure = f"{type(exc).__name__}: {exc}"
        self.state = State.ERROR

    def _answering(self, kind: type[ListExports] | type[OpenExport] | type[ListMetaContexts]) -> None:
        self._usable()
        if self.state is not State.ANSWER or type(self._asked) is not kind or self._resume is not None:
            raise LocalProtocolError(f"{kind.__name__} was not asked (the handshake is "
                                     f"{self.state.value})")

    def _ask(self, question: ListExports | OpenExport | ListMetaContexts) -> Event:
        self._asked = question
        self._resume = None
        self._goto(State.ANSWER)
        return question

    # ---- states
    def _next(self) -> Event:
        if self.state is State.ANSWER:
            if self._resume is None:
                raise LocalProtocolError(f"answer {type(self._asked).__name__} before asking "
                                         f"for the next event")
            resume, self._resume, self._asked = self._resume, None, None
            return resume()
        data = self._take(self._needed())
        if isinstance(data, NeedData):
            return data
        if self.state is State.CLIENT_FLAGS:
            return self._client_flags(data)
        if self.state is State.OPTION_HEADER:
            return self._option_header(data)
        return self._dispatch(self._option, data)

    def _needed(self) -> int:
        if self.state is State.CLIENT_FLAGS:
            return 4
        if self.state is State.OPTION_HEADER:
            return OPTION_HEADER_SIZE
        return self._option_length

    def _close(self, reason: str, reply: bytes = b"") -> Closed:
        self._goto(State.DONE)
        return Closed(reason, reply)

    def _option_done(self, event: Event) -> Event:
        """An option answered: back to waiting for the next one."""
        self._goto(State.OPTION_HEADER)
        return event

    def _client_flags(self, data: bytes) -> Event:
        (flags,) = wire.CLIENT_FLAGS.unpack(data)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return self._close(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES & self.global_flags)
        self._goto(State.OPTION_HEADER)
        return self._next()

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
        return self._next()

    # ---- options
    def _dispatch(self, option: int, data: bytes) -> Event:
        if self.tls_mode == "require" and not self.tls_active and option not in (
                Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                return self._close("client asked for an export before starting TLS")
            return self._option_done(self._reply(option, Rep.ERR_TLS_REQD, b"TLS is required"))
        handler = self._HANDLERS.get(option)
        if handler is None or not self.offers.get(option, True):
            return self._option_done(self._reply(option, Rep.ERR_UNSUP,
                                                 f"option {option} is not supported".encode()))
        try:
            event = handler(self, option, data)
        except ProtocolError as exc:  # the option's payload is malformed
            return self._option_done(self._reply(option, Rep.ERR_INVALID, str(exc).encode()))
        if self.state is State.OPTION_DATA:
            return self._option_done(event)
        return event

    def _reply(self, option: int, rep: int, data: bytes = b"") -> Send:
        return Send(wire.option_reply(option, rep, data))

    def _opt_abort(self, option: int, data: bytes) -> Event:
        return self._close("client sent NBD_OPT_ABORT", wire.option_reply(option, Rep.ACK))

    def _opt_list(self, option: int, data: bytes) -> Event:
        if data:
            return self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
        return self._ask(ListExports())

    def _opt_starttls(self, option: int, data: bytes) -> Event:
        if data:
            return self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        if self.tls_mode == "off":
            return self._reply(option, Rep.ERR_POLICY, b"TLS is not enabled on this server")
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
        self._meta_queries = queries
        return self._ask(ListMetaContexts(name))

    def _meta_contexts_reply(self, option: int, name: str, queries: list[str],
                             offered: list[str]) -> Event:
        """Reply to LIST/SET_META_CONTEXT with the offered contexts that match.

        SET numbers the chosen contexts from 1; LIST sends id 0, as the
        protocol asks. A query that matches nothing is left out, not refused.
        """
        listing = option == Opt.LIST_META_CONTEXT
        chosen = _match_contexts(queries, listing, offered)
        if not listing:
            self.meta_ids = {c: i for i, c in enumerate(chosen, 1)}
            self.meta_export = name
        replies = [wire.option_reply(option, Rep.META_CONTEXT,
                                     wire.meta_context_reply_payload(0 if listing else self.meta_ids[c], c))
                   for c in chosen]
        replies.append(wire.option_reply(option, Rep.ACK))
        return self._option_done(Send(b"".join(replies)))

    def _opt_info_or_go(self, option: int, data: bytes) -> Event:
        name, requested = wire.parse_info_request(data)
        if len(name.encode()) > MAX_STRING:
            return self._reply(option, Rep.ERR_INVALID, b"export name too long")
        if not self._served(name):
            return self._reply(option, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
        self._requested_infos = requested
        return self._ask(OpenExport(name, keep=option == Opt.GO))

    def _opt_export_name(self, option: int, data: bytes) -> Event:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            return self._close(f"NBD_OPT_EXPORT_NAME {data[:64]!r} is not UTF-8")
        if not self._served(name):
            return self._close(f"NBD_OPT_EXPORT_NAME {name!r} refused: no such export")
        return self._ask(OpenExport(name, keep=True))

    def _served(self, name: str) -> bool:
        return self.forced_export is None or name in ("", self.forced_export)

    def _opened(self, keep: bool, info: ExportInfo) -> Event:
        """The reply to INFO, GO or EXPORT_NAME once the export is open."""
        option = self._option
        if option == Opt.EXPORT_NAME:
            return self._ready(wire.export_name_reply(info.size, info.flags, self.no_zeroes), info)
        requested = self._requested_infos
        replies = [wire.option_reply(option, Rep.INFO, wire.info_export(info.size, info.flags))]
        if Info.NAME in requested:
            replies.append(wire.option_reply(option, Rep.INFO, wire.info_name(info.name)))
        if Info.DESCRIPTION in requested and info.description:
            replies.append(wire.option_reply(option, Rep.INFO,
                                             wire.info_description(info.description)))
        replies.append(wire.option_reply(option, Rep.INFO, wire.info_block_size(*info.block_size)))
        replies.append(wire.option_reply(option, Rep.ACK))
        if not keep:
            return self._option_done(Send(b"".join(replies)))
        return self._ready(b"".join(replies), info)

    def _for_client(self, info: ExportInfo) -> ExportInfo:
        """The export as this client sees it: DF only with structured replies, the
        block-status payload form with extended headers and a meta context chosen."""
        flags = info.flags
        if not self.structured_replies:
            flags &= ~TransmissionFlag.SEND_DF
        if self.extended_headers and self.meta_ids:
            flags |= TransmissionFlag.BLOCK_STAT_PAYLOAD
        return info if flags == info.flags else replace(info, flags=flags)

    def _ready(self, reply: bytes, info: ExportInfo) -> Ready:
        self._goto(State.DONE)
        contexts = {}
        if self.meta_export is None or self.meta_export == info.name or self.meta_export == "":
            contexts = {i: c for c, i in self.meta_ids.items()}
        return Ready(reply, info, self.structured_replies, self.extended_headers, contexts)

    _HANDLERS: dict[int, Callable[[ServerHandshake, int, bytes], Event]] = {
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


def _match_contexts(queries: list[str], listing: bool, offered: list[str]) -> list[str]:
    """The ``offered`` contexts that answer the client's queries (a query ending in
    ``:`` lists a whole namespace, such as ``qemu:`` or ``qemu:dirty-bitmap:``)."""
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
