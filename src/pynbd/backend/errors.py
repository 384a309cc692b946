"""Errors shared by plugins, filters and the server."""

from __future__ import annotations

import errno as _errno
import os


class ConfigError(Exception):
    """A command-line or API configuration mistake.

    The message is one line meant for the user; ``pynbd serve`` prints it
    prefixed with the program name and exits with status 1.
    """


def io_error(err: int, message: str) -> OSError:
    """An OSError carrying ``err`` (an errno value) and a readable message.

    Plugins and filters raise these; the server sends ``err`` to the client.
    """
    return OSError(err, f"{message}: {os.strerror(err)}" if message else os.strerror(err))


def errno_of(exc: BaseException) -> int:
    """The errno a failed request reports: the exception's, or EIO."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO
