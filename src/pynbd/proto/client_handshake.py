"""The client side of the NBD handshake, as a sans-IO state machine.

The driver (``client/``) owns the socket; this module owns the rules. Like
libnbd's ``generator/state_machine.ml`` every state and every permitted move
is declared once, in ``TRANSITIONS``, and ``_goto`` is the only place that
changes state, so the table is the whole story of a negotiation:

    hs = ClientHandshake(HandshakeConfig(export_name="disk", tls=False))
    while True:
        event = hs.next_event()
        if isinstance(event, NeedData):      hs.receive_data(recv exactly event.size)
        elif isinstance(event, Send):        send(event.data)
        elif isinstance(event, StartTLS):    wrap the socket; hs.tls_established()
        elif isinstance(event, Negotiating): option mode: call hs.opt_list() / opt_go() ...
        elif isinstance(event, OptionDone):  result of the option the user asked for
        elif isinstance(event, Ready):       enter transmission with event.negotiated

The machine asks for exactly the bytes it needs, so it never swallows the
first byte of a TLS handshake.

Errors, the h11 way (``proto.errors``):

- ``RemoteProtocolError``: the server broke the protocol (a bad magic, a
  reply to an option never sent, a malformed NBD_REP_INFO) or hung up
  (``connection_lost()`` builds that one for the driver).
- ``LocalProtocolError``: the driver misused the machine (``opt_go`` outside
  option mode, ``tls_established`` without a StartTLS, ``next_event`` after
  Ready).
- ``OptionRefused``: the server refused an option with an NBD_REP_ERR_* reply.
  That is an answer, not a breakage: in option mode the machine is back in
  NEGOTIATING and may be used on; when the client cannot do without the
  option (TLS, the export, NBD_OPT_GO) it is CLOSED.

Any other exception raised by a method of the machine moves it to ERROR for
good: every later call raises ``LocalProtocolError`` naming that first
failure (its ``__cause__``), so a half-parsed handshake never carries on.

Default negotiation, in order: STARTTLS (when TLS is wanted), EXTENDED_HEADERS
(when asked), STRUCTURED_REPLY, SET_META_CONTEXT (when contexts were added),
GO asking for name, description and block size; a server that does not know
GO gets EXPORT_NAME. Oldstyle servers are accepted too. In option mode the
machine stops after the reply-format options and waits in NEGOTIATING.
"""

from __future__ import annotations

import enum
import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

from . import wire
from .constants import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPTION_REPLY_HEADER_SIZE,
    REP_FLAG_ERROR,
    Info,
    Opt,
    Rep,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .machine import ByteMachine, NeedData, Send

MAX_OPTION_REPLY = 16 * 1024 * 1024  # larger option replies are refused
MAX_EXPORT_SIZE = (1 << 63) - 1  # larger export sizes are refused
OLDSTYLE_REST = 8 + 4 + 124  # size, flags, padding after the two magics

_REP_ERRNO: dict[int, int] = {
    Rep.ERR_UNSUP: errno.ENOTSUP, Rep.ERR_POLICY: errno.EPERM,
    Rep.ERR_INVALID: errno.EINVAL, Rep.ERR_PLATFORM: errno.EOPNOTSUPP,
    Rep.ERR_TLS_REQD: errno.ENOTSUP, Rep.ERR_UNKNOWN: errno.ENOENT,
    Rep.ERR_SHUTDOWN: errno.ESHUTDOWN, Rep.ERR_BLOCK_SIZE_REQD: errno.EINVAL,
    Rep.ERR_TOO_BIG: errno.E2BIG, Rep.ERR_EXT_HEADER_REQD: errno.ENOTSUP,
}


class OptionRefused(Exception):
    """The server answered an option with an error reply (NBD_REP_ERR_*)."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option, self.reply, self.server_message = option, reply, message
        self.errno = _REP_ERRNO.get(reply, errno.EINVAL)
        super().__init__(self._describe())

    def _describe(self) -> str:
        opt = _name(Opt, self.option)
        if self.reply == Rep.ERR_TLS_REQD:
            text = "server requires TLS (use an nbds:// URI)"
        elif self.reply == Rep.ERR_UNKNOWN:
            text = "server has no such export"
        else:
            text = f"server replied {_name(Rep, self.reply)}"
        detail = f": {self.server_message}" if self.server_message else ""
        return f"{opt} refused: {text}{detail}"


def _export_size(size: int) -> int:
    """An export size the client can use: at most 2**63 - 1 bytes, as libnbd insists
    (file offsets are signed 64-bit; a larger size broke ``pynbd copy``)."""
    if size > MAX_EXPORT_SIZE:
        raise RemoteProtocolError(f"server claims an export of {size} bytes, more than "
                                  f"{MAX_EXPORT_SIZE}")
    return size


def _name(kind: type[enum.IntEnum], value: int) -> str:
    try:
        return f"NBD_{'OPT' if kind is Opt else 'REP'}_{kind(value).name}"
    except ValueError:
        return str(value)


# ------------------------------------------------------------------ settings

@dataclass
class HandshakeConfig:
    """What the client asks for; set before the handshake starts."""

    export_name: str = ""
    tls: bool = False  # send STARTTLS; the driver wraps the socket
    tls_required: bool = True  # fail if the server cannot do TLS
    structured_replies: bool = True
    extended_headers: bool = True
    meta_contexts: list[str] = field(default_factory=list)
    opt_mode: bool = False
    full_info: bool = True  # ask for NBD_INFO_NAME and NBD_INFO_DESCRIPTION


@dataclass
class Negotiated:
    """What the handshake settled; filled in as replies arrive."""

    protocol: str = ""  # "newstyle-fixed", "newstyle" or "oldstyle"
    tls: bool = False
    structured_replies: bool = False
    extended_headers: bool = False
    export_name: str = ""
    canonical_name: str | None = None
    description: str | None = None
    size: int = 0
    flags: int = 0
    block_size: tuple[int, int, int] | None = None
    meta_contexts: dict[int, str] = field(default_factory=dict)


# -------------------------------------------------------------------- events

@dataclass(frozen=True)
class StartTLS:
    """Run the TLS handshake on the socket, then call tls_established()."""


@dataclass(frozen=True)
class Negotiating:
    """Option mode: the machine waits for opt_go/opt_info/opt_list/... ."""


@dataclass(frozen=True)
class OptionDone:
    """The option the user asked for in option mode has its answer."""

    option: int
    result: object


@dataclass(frozen=True)
class Ready:
    """The transmission phase may begin."""

    negotiated: Negotiated


Event = NeedData | Send | StartTLS | Negotiating | OptionDone | Ready


class State(enum.Enum):
    MAGIC = "reading the server's magic numbers"
    NEWSTYLE_FLAGS = "reading the handshake flags"
    OLDSTYLE = "reading the oldstyle export header"
    CLIENT_FLAGS = "sending client flags"
    STARTTLS = "waiting for the NBD_OPT_STARTTLS reply"
    TLS_HANDSHAKE = "running the TLS handshake"
    EXTENDED_HEADERS = "waiting for the NBD_OPT_EXTENDED_HEADERS reply"
    STRUCTURED_REPLY = "waiting for the NBD_OPT_STRUCTURED_REPLY reply"
    SET_META_CONTEXT = "waiting for the NBD_OPT_SET_META_CONTEXT reply"
    GO = "waiting for the NBD_OPT_GO reply"
    EXPORT_NAME = "waiting for the NBD_OPT_EXPORT_NAME reply"
    NEGOTIATING = "negotiating (option mode)"
    LIST = "waiting for the NBD_OPT_LIST reply"
    INFO = "waiting for the NBD_OPT_INFO reply"
    LIST_META_CONTEXT = "waiting for the NBD_OPT_LIST_META_CONTEXT reply"
    READY = "transmission phase"
    CLOSED = "closed"
    ERROR = "broken by an earlier error"


_OPTS = (State.NEGOTIATING, State.GO, State.EXPORT_NAME, State.CLOSED)

# The moves of a working handshake; every state may also fail into ERROR, which is final.
_MOVES: dict[State, frozenset[State]] = {
    State.MAGIC: frozenset({State.NEWSTYLE_FLAGS, State.OLDSTYLE}),
    State.NEWSTYLE_FLAGS: frozenset({State.CLIENT_FLAGS}),
    State.OLDSTYLE: frozenset({State.READY}),
    State.CLIENT_FLAGS: frozenset({State.STARTTLS, State.EXTENDED_HEADERS, State.STRUCTURED_REPLY,
                                   State.SET_META_CONTEXT, *_OPTS}),
    State.STARTTLS: frozenset({State.TLS_HANDSHAKE, State.EXTENDED_HEADERS,
                               State.STRUCTURED_REPLY, State.SET_META_CONTEXT, *_OPTS}),
    State.TLS_HANDSHAKE: frozenset({State.EXTENDED_HEADERS, State.STRUCTURED_REPLY,
                                    State.SET_META_CONTEXT, *_OPTS}),
    State.EXTENDED_HEADERS: frozenset({State.STRUCTURED_REPLY, State.SET_META_CONTEXT, *_OPTS}),
    State.STRUCTURED_REPLY: frozenset({State.SET_META_CONTEXT, *_OPTS}),
    State.SET_META_CONTEXT: frozenset({State.GO, State.INFO, State.CLOSED}),
    State.GO: frozenset({State.READY, State.EXPORT_NAME, State.NEGOTIATING, State.CLOSED}),
    State.EXPORT_NAME: frozenset({State.READY, State.CLOSED}),
    State.NEGOTIATING: frozenset({State.LIST, State.INFO, State.LIST_META_CONTEXT,
                                  State.SET_META_CONTEXT, State.GO, State.CLOSED}),
    State.LIST: frozenset({State.NEGOTIATING, State.CLOSED}),
    State.INFO: frozenset({State.NEGOTIATING, State.CLOSED}),
    State.LIST_META_CONTEXT: frozenset({State.NEGOTIATING, State.CLOSED}),
    State.READY: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
TRANSITIONS: dict[State, frozenset[State]] = {
    **{state: moves | {State.ERROR} for state, moves in _MOVES.items()},
    State.ERROR: frozenset(),
}

# The option each waiting state has sent, so replies can be checked against it.
_STATE_OPTION = {
    State.STARTTLS: Opt.STARTTLS, State.EXTENDED_HEADERS: Opt.EXTENDED_HEADERS,
    State.STRUCTURED_REPLY: Opt.STRUCTURED_REPLY, State.SET_META_CONTEXT: Opt.SET_META_CONTEXT,
    State.GO: Opt.GO, State.LIST: Opt.LIST, State.INFO: Opt.INFO,
    State.LIST_META_CONTEXT: Opt.LIST_META_CONTEXT,
}


P = ParamSpec("P")
T = TypeVar("T")


def _guarded(method: Callable[Concatenate[ClientHandshake, P], T],
             ) -> Callable[Concatenate[ClientHandshake, P], T]:
    """Refuse calls once the machine is broken; break it when ``method`` fails.

    An ``OptionRefused`` is an answer from the server, not a failure, and
    passes through without breaking anything.
    """
    @functools.wraps(method)
    def guarded(self: ClientHandshake, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._check_usable()
        try:
            return method(self, *args, **kwargs)
        except OptionRefused:
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
    return guarded


class ClientHandshake(ByteMachine[State]):
    """Negotiates one connection to an NBD server up to the transmission phase."""

    transitions = TRANSITIONS

    def __init__(self, config: HandshakeConfig | None = None) -> None:
        self.config = config or HandshakeConfig()
        self.negotiated = Negotiated(export_name=self.config.export_name)
        super().__init__(State.MAGIC)
        self._no_zeroes = False
        self._pending: list[Event] = []  # events queued by a state's entry action
        self._reply: tuple[int, int, int] | None = None  # header of the reply being read
        self._results: list[object] = []  # collected by LIST / LIST_META_CONTEXT
        self._then: State | None = None  # where SET_META_CONTEXT continues
        self._failure: BaseException | None = None  # what moved the machine to ERROR

    # ---------------------------------------------------- driver interface
    @_guarded
    def receive_data(self, data: bytes) -> None:
        super().receive_data(data)

    @_guarded
    def tls_established(self) -> None:
        """The driver calls this once the TLS handshake succeeded."""
        if self.state is not State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"TLS established while {self.state.value}")
        self.negotiated.tls = True
        self._after_tls()

    @_guarded
    def next_event(self) -> Event:
        """The next thing the driver must do."""
        while not self._pending:
            need = self._needed()
            if need is None:
                raise LocalProtocolError(f"the handshake is {self.state.value}; nothing to read")
            data = self._take(need)
            if isinstance(data, NeedData):
                return data
            self._consume(data)
        return self._pending.pop(0)

    def connection_lost(self) -> RemoteProtocolError:
        """The error to raise when the server hangs up mid-handshake."""
        return RemoteProtocolError(f"server closed the connection while {self.state.value}")

    def _check_usable(self) -> None:
        """Raise ``LocalProtocolError`` (caused by the first failure) if the machine is broken."""
        if self._failure is not None:
            failure = self._failure
            raise LocalProtocolError(f"the handshake is unusable after an earlier error: "
                                     f"{type(failure).__name__}: {failure}") from failure

    def _fail(self, exc: BaseException) -> None:
        """Break the machine for good because of ``exc``."""
        self._failure = exc
        self._goto(State.ERROR)

    # ------------------------------------------------ option-mode commands
    @_guarded
    def opt_go(self) -> None:
        self._require_negotiating("opt_go")
        self._with_meta_context(State.GO)

    @_guarded
    def opt_info(self) -> None:
        self._require_negotiating("opt_info")
        self._with_meta_context(State.INFO)

    @_guarded
    def opt_list(self) -> None:
        self._require_negotiating("opt_list")
        self._send_option(State.LIST, b"")

    @_guarded
    def opt_list_meta_context(self, queries: list[str] | None = None) -> None:
        self._require_negotiating("opt_list_meta_context")
        queries = self.config.meta_contexts if queries is None else queries
        self._send_option(State.LIST_META_CONTEXT,
                          wire.meta_context_request(self.config.export_name, queries))

    @_guarded
    def opt_abort(self) -> bytes:
        """Bytes to send before closing; the server's answer is not awaited."""
        self._require_negotiating("opt_abort")
        self._goto(State.CLOSED)
        return wire.option_request(Opt.ABORT)

    def set_export_name(self, name: str) -> None:
        self.config.export_name = self.negotiated.export_name = name

    def _require_negotiating(self, what: str) -> None:
        if self.state is not State.NEGOTIATING:
            raise LocalProtocolError(f"{what} needs option mode, but the handshake is "
                                     f"{self.state.value}")

    # ------------------------------------------------ what each state reads
    def _needed(self) -> int | None:
        if self.state is State.MAGIC:
            return 16
        if self.state is State.NEWSTYLE_FLAGS:
            return 2
        if self.state is State.OLDSTYLE:
            return OLDSTYLE_REST
        if self.state is State.EXPORT_NAME:
            return 10 if self._no_zeroes else 10 + len(wire.NO_ZEROES_PAD)
        if self.state in _STATE_OPTION:
            return OPTION_REPLY_HEADER_SIZE if self._reply is None else self._reply[2]
        return None

    def _consume(self, data: bytes) -> None:
        if self.state is State.MAGIC:
            self._magic(data)
        elif self.state is State.NEWSTYLE_FLAGS:
            self._newstyle_flags(data)
        elif self.state is State.OLDSTYLE:
            self._oldstyle(data)
        elif self.state is State.EXPORT_NAME:
            self._export_name_reply(data)
        elif self._reply is None:
            self._reply_header(data)
        else:
            header, self._reply = self._reply, None
            self._handle_reply(header[1], data)

    # ------------------------------------------------------------ greeting
    def _magic(self, data: bytes) -> None:
        magic, second = wire.U64.unpack_from(data)[0], wire.U64.unpack_from(data, 8)[0]
        if magic != NBDMAGIC:
            raise RemoteProtocolError(f"server did not send NBDMAGIC (got {magic:#x}); is it an NBD server?")
        if second == IHAVEOPT:
            self._goto(State.NEWSTYLE_FLAGS)
        elif second == OLDSTYLE_MAGIC:
            if self.config.tls:
                raise RemoteProtocolError("oldstyle server cannot do TLS")
            self._goto(State.OLDSTYLE)
        else:
            raise RemoteProtocolError(f"unknown NBD protocol magic {second:#x}")

    def _oldstyle(self, data: bytes) -> None:
        size, flags = wire.U64.unpack_from(data)[0], wire.U32.unpack_from(data, 8)[0]
        self.negotiated.protocol = "oldstyle"
        self.negotiated.size, self.negotiated.flags = _export_size(size), flags & 0xFFFF
        self._ready()

    def _newstyle_flags(self, data: bytes) -> None:
        (flags,) = wire.U16.unpack(data)
        fixed = bool(flags & FLAG_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self.negotiated.protocol = "newstyle-fixed" if fixed else "newstyle"
        client = (FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        self._goto(State.CLIENT_FLAGS)
        self._pending.append(Send(wire.CLIENT_FLAGS.pack(client)))
        if not fixed:
            if self.config.tls:
                raise RemoteProtocolError("server is not fixed-newstyle and cannot do TLS")
            self._send_export_name()
        elif self.config.tls:
            self._send_option(State.STARTTLS, b"")
        else:
            self._after_tls()

    # -------------------------------------------------- the default course
    def _after_tls(self) -> None:
        if self.config.extended_headers:
            self._send_option(State.EXTENDED_HEADERS, b"")
        else:
            self._after_extended_headers()

    def _after_extended_headers(self) -> None:
        if self.config.structured_replies and not self.negotiated.extended_headers:
            self._send_option(State.STRUCTURED_REPLY, b"")
        else:
            self._after_reply_format()

    def _after_reply_format(self) -> None:
        if self.config.opt_mode:
            self._goto(State.NEGOTIATING)
            self._pending.append(Negotiating())
        else:
            self._with_meta_context(State.GO)

    def _with_meta_context(self, then: State) -> None:
        self.negotiated.meta_contexts = {}
        if self.config.meta_contexts and self.negotiated.structured_replies:
            self._then = then
            self._send_option(State.SET_META_CONTEXT, wire.meta_context_request(
                self.config.export_name, self.config.meta_contexts))
        else:
            self._send_info_or_go(then)

    def _send_info_or_go(self, state: State) -> None:
        infos = [Info.BLOCK_SIZE] + ([Info.NAME, Info.DESCRIPTION] if self.config.full_info else [])
        self._send_option(state, wire.info_request(self.config.export_name, infos))

    def _send_option(self, state: State, payload: bytes) -> None:
        self._goto(state)
        self._results = []
        self._pending.append(Send(wire.option_request(_STATE_OPTION[state], payload)))

    def _send_export_name(self) -> None:
        self._goto(State.EXPORT_NAME)
        self._pending.append(Send(wire.option_request(
            Opt.EXPORT_NAME, self.config.export_name.encode())))

    def _ready(self) -> None:
        self._goto(State.READY)
        self._pending.append(Ready(self.negotiated))

    # ------------------------------------------------------ option replies
    def _reply_header(self, data: bytes) -> None:
        option, reply, length = wire.parse_option_reply_header(data)
        expected = _STATE_OPTION[self.state]
        if option != expected:
            raise RemoteProtocolError(f"server answered option {option} while {self.state.value}")
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too large")
        self._reply = (option, reply, length)
        if length == 0:
            self._reply = None
            self._handle_reply(reply, b"")

    def _handle_reply(self, reply: int, payload: bytes) -> None:
        option = _STATE_OPTION[self.state]
        if reply & REP_FLAG_ERROR:
            self._ON_ERROR[self.state](self, OptionRefused(option, reply, _text(payload)))
        elif reply == Rep.ACK:
            self._ON_ACK[self.state](self, payload)
        else:
            handler = self._ON_REPLY.get((self.state, reply))
            if handler is None:
                raise RemoteProtocolError(f"unexpected reply {_name(Rep, reply)} to {_name(Opt, option)}")
            handler(self, payload)

    def _refuse(self, refused: OptionRefused) -> None:
        self._goto(State.CLOSED)
        raise refused

    def _back_to_negotiating(self, refused: OptionRefused) -> None:
        self._goto(State.NEGOTIATING)
        raise refused

    def _starttls_ack(self, payload: bytes) -> None:
        self._goto(State.TLS_HANDSHAKE)
        self._pending.append(StartTLS())

    def _starttls_refused(self, refused: OptionRefused) -> None:
        if self.config.tls_required:
            self._refuse(OptionRefused(refused.option, refused.reply,
                                       "server cannot do TLS, but TLS was required"))
        self._after_tls()  # "allow" mode: carry on in clear text

    def _extended_ack(self, payload: bytes) -> None:
        self.negotiated.extended_headers = self.negotiated.structured_replies = True
        self._after_extended_headers()

    def _structured_ack(self, payload: bytes) -> None:
        self.negotiated.structured_replies = True
        self._after_reply_format()

    def _meta_context(self, payload: bytes) -> None:
        if len(payload) < 5:
            raise RemoteProtocolError("NBD_REP_META_CONTEXT reply is too short")
        context_id = wire.U32.unpack_from(payload)[0]
        name = _text(payload[4:])
        if self.state is State.SET_META_CONTEXT:
            self.negotiated.meta_contexts[context_id] = name
        else:
            self._results.append(name)

    def _meta_context_ack(self, payload: bytes) -> None:
        then, self._then = self._then or State.GO, None
        self._send_info_or_go(then)

    def _meta_context_refused(self, refused: OptionRefused) -> None:
        self.negotiated.meta_contexts = {}
        self._meta_context_ack(b"")

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise RemoteProtocolError("NBD_REP_INFO reply is too short")
        kind = wire.U16.unpack_from(payload)[0]
        handler = self._INFO.get(kind)
        if handler is not None:
            handler(self, payload)

    def _info_export(self, payload: bytes) -> None:
        if len(payload) != wire.INFO_EXPORT.size:
            raise RemoteProtocolError("NBD_INFO_EXPORT has the wrong length")
        _, size, self.negotiated.flags = wire.INFO_EXPORT.unpack(payload)
        self.negotiated.size = _export_size(size)

    def _info_name(self, payload: bytes) -> None:
        self.negotiated.canonical_name = _text(payload[2:])

    def _info_description(self, payload: bytes) -> None:
        self.negotiated.description = _text(payload[2:])

    def _info_block_size(self, payload: bytes) -> None:
        if len(payload) != wire.INFO_BLOCK_SIZE.size:
            raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
        _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(payload)
        self.negotiated.block_size = (minimum, preferred, maximum)

    def _go_ack(self, payload: bytes) -> None:
        if not self.negotiated.flags:
            raise RemoteProtocolError("server finished NBD_OPT_GO without NBD_INFO_EXPORT")
        self._ready()

    def _go_refused(self, refused: OptionRefused) -> None:
        if refused.reply == Rep.ERR_UNSUP and not self.config.opt_mode:
            self._send_export_name()
        elif self.config.opt_mode:
            self._back_to_negotiating(refused)
        else:
            self._refuse(refused)

    def _info_ack(self, payload: bytes) -> None:
        self._goto(State.NEGOTIATING)
        self._pending.append(OptionDone(Opt.INFO, self.negotiated))

    def _server(self, payload: bytes) -> None:
        self._results.append(wire.parse_server_reply_payload(payload))

    def _list_ack(self, payload: bytes) -> None:
        option = _STATE_OPTION[self.state]
        self._goto(State.NEGOTIATING)
        self._pending.append(OptionDone(option, list(self._results)))

    def _export_name_reply(self, data: bytes) -> None:
        size, self.negotiated.flags = wire.EXPORT_NAME_REPLY.unpack_from(data)
        self.negotiated.size = _export_size(size)
        self._ready()

    def _skip_optional(self, refused: OptionRefused) -> None:
        follow = {State.EXTENDED_HEADERS: self._after_extended_headers,
                  State.STRUCTURED_REPLY: self._after_reply_format}[self.state]
        follow()

    _ON_ACK: dict[State, Callable[[ClientHandshake, bytes], None]] = {
        State.STARTTLS: _starttls_ack,
        State.EXTENDED_HEADERS: _extended_ack,
        State.STRUCTURED_REPLY: _structured_ack,
        State.SET_META_CONTEXT: _meta_context_ack,
        State.GO: _go_ack,
        State.INFO: _info_ack,
        State.LIST: _list_ack,
        State.LIST_META_CONTEXT: _list_ack,
    }
    _ON_ERROR: dict[State, Callable[[ClientHandshake, OptionRefused], None]] = {
        State.STARTTLS: _starttls_refused,
        State.EXTENDED_HEADERS: _skip_optional,
        State.STRUCTURED_REPLY: _skip_optional,
        State.SET_META_CONTEXT: _meta_context_refused,
        State.GO: _go_refused,
        State.INFO: _back_to_negotiating,
        State.LIST: _back_to_negotiating,
        State.LIST_META_CONTEXT: _back_to_negotiating,
    }
    _ON_REPLY: dict[tuple[State, int], Callable[[ClientHandshake, bytes], None]] = {
        (State.SET_META_CONTEXT, Rep.META_CONTEXT): _meta_context,
        (State.LIST_META_CONTEXT, Rep.META_CONTEXT): _meta_context,
        (State.GO, Rep.INFO): _info,
        (State.INFO, Rep.INFO): _info,
        (State.LIST, Rep.SERVER): _server,
    }
    _INFO: dict[int, Callable[[ClientHandshake, bytes], None]] = {
        Info.EXPORT: _info_export,
        Info.NAME: _info_name,
        Info.DESCRIPTION: _info_description,
        Info.BLOCK_SIZE: _info_block_size,
    }


def _text(data: bytes) -> str:
    return bytes(data).decode("utf-8", errors="replace")
