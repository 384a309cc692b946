"""The control protocol as pure code: bytes in, requests out, replies as bytes.

One JSON object per line (``\\n`` ends a line; a ``\\r`` before it is
ignored), UTF-8, at most ``MAX_LINE`` bytes. A request::

    {"command": ["snapshot", "create", "monday"], "id": 7}

``command`` is a non-empty list of strings (the command's words, then its
arguments); ``id`` is optional and may be any JSON value, echoed in the
reply. A reply is ``{"ok": RESULT}`` or ``{"error": "MESSAGE"}``, with
``"id"`` when the request had one. The manual for users is
``pynbd.tools.ctl``.

Nothing here touches a socket, in the style of h11: ``RequestReader`` is fed
bytes with ``receive_data`` and gives events with ``next_event``: a
``Request``, an ``Invalid`` line (to be answered with an error; the
connection carries on), ``NEED_DATA`` or, after ``receive_eof``, ``CLOSED``
(a half line before the end is dropped: nobody is left to answer).
``ok_line``/``error_line`` format replies, ``request_line``/``parse_reply``
are the client's half.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass

MAX_LINE = 64 * 1024


class ControlProtocolError(Exception):
    """A line that breaks the protocol; the message says how (one line)."""


class Signal(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED


@dataclass(frozen=True)
class Request:
    """A well-formed request: its words and arguments, and its id if it had one."""

    command: tuple[str, ...]
    id: object = None
    has_id: bool = False


@dataclass(frozen=True)
class Invalid:
    """A line that is not a request: answer ``error_line(message, ...)``."""

    message: str
    id: object = None
    has_id: bool = False


Event = Request | Invalid | Signal


def parse_request(line: bytes) -> Request:
    """A request from one line (without its newline); ControlProtocolError if it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlProtocolError(f"the line is not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise ControlProtocolError(f"invalid JSON: {detail}") from None
    if not isinstance(obj, dict):
        raise ControlProtocolError('a request is a JSON object: {"command": ["WORD", ...]}')
    command = obj.get("command")
    if not isinstance(command, list) or not command \
            or not all(isinstance(word, str) for word in command):
        raise ControlProtocolError('"command" must be a non-empty list of strings')
    unknown = sorted(set(obj) - {"command", "id"})
    if unknown:
        raise ControlProtocolError(f"unknown key in request: {unknown[0]!r}")
    return Request(tuple(command), obj.get("id"), "id" in obj)


class RequestReader:
    """Splits the bytes a control client sends into events."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long line, already reported
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise ControlProtocolError("data received after the end of the stream")
        self._buffer += data

    def receive_eof(self) -> None:
        self._eof = True

    def next_event(self) -> Event:
        """The next event; ``NEED_DATA`` until a whole line (or the end) has arrived."""
        while True:
            end = self._buffer.find(b"\n")
            if self._skipping:
                if end < 0:
                    self._buffer.clear()
                    return CLOSED if self._eof else NEED_DATA
                del self._buffer[:end + 1]
                self._skipping = False
                continue
            if end < 0:
                if len(self._buffer) > self.max_line:
                    self._buffer.clear()
                    self._skipping = True
                    return self._too_long()
                if self._eof:
                    self._buffer.clear()
                    return CLOSED
                return NEED_DATA
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if len(line) > self.max_line:
                return self._too_long()
            line = line.removesuffix(b"\r")
            if not line.strip():
                continue  # blank lines are allowed between requests (typing into socat)
            try:
                return parse_request(line)
            except ControlProtocolError as exc:
                return Invalid(str(exc), *_salvage_id(line))

    def _too_long(self) -> Invalid:
        return Invalid(f"line longer than {self.max_line} bytes")


def _salvage_id(line: bytes) -> tuple[object, bool]:
    """The id of a request that is JSON but not a valid request, so the error can carry it."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None, False
    if isinstance(obj, dict) and "id" in obj:
        return obj["id"], True
    return None, False


def _line(reply: dict[str, object], request_id: object, has_id: bool) -> bytes:
    if has_id:
        reply["id"] = request_id
    try:
        return json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800" decodes to one): escape it
        return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def ok_line(result: object, request_id: object = None, has_id: bool = False) -> bytes:
    """``{"ok": result}`` as a line; TypeError/ValueError if ``result`` is not JSON-able."""
    return _line({"ok": result}, request_id, has_id)


def error_line(message: str, request_id: object = None, has_id: bool = False) -> bytes:
    return _line({"error": message}, request_id, has_id)


def request_line(command: Sequence[str], request_id: object = None, has_id: bool = False) -> bytes:
    """The client's request line."""
    req: dict[str, object] = {"command": list(command)}
    return _line(req, request_id, has_id)


@dataclass(frozen=True)
class Reply:
    ok: bool
    result: object  # the result when ok, else the error message
    id: object = None


def parse_reply(line: bytes) -> Reply:
    """A reply line from the server; ControlProtocolError if it is not one."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise ControlProtocolError("the server's reply is not JSON") from None
    if isinstance(obj, dict) and "ok" in obj:
        return Reply(True, obj["ok"], obj.get("id"))
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return Reply(False, obj["error"], obj.get("id"))
    raise ControlProtocolError('the server\'s reply has neither "ok" nor "error"')
