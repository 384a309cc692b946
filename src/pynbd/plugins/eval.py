"""eval: a plugin written as shell snippets on the command line, as nbdkit-eval-plugin(1).

    pynbd serve eval get_size='echo 64M' \\
        pread='dd if=/dev/zero count=$3 iflag=count_bytes status=none'

    pynbd serve eval \\
        config='ln -sf "$(realpath "$3")" $tmpdir/file' \\
        get_size='stat -Lc %s $tmpdir/file' \\
        pread='dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none' \\
        pwrite='dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes status=none' \\
        file=disk.img

Parameters
    METHOD=SCRIPT   the /bin/sh snippet run for METHOD (any method of the sh
                    plugin: get_size, pread, pwrite, can_write, extents, ...);
                    it sees the same arguments ($1 is the method name, $2 the
                    handle, ...), ``$tmpdir`` and exit codes as there
    missing=SCRIPT  run for every method that has no snippet (default:
                    ``exit 2``, i.e. not implemented)
    timeout=SECONDS kill a snippet that runs longer (pynbd only; default none)
    KEY=VALUE       any other key goes to the config snippet as
                    ``config KEY VALUE``

Unlike the sh plugin, a can_* snippet may be left out when its method is
given: ``pwrite`` implies can_write, and likewise flush, trim, zero and
extents. See ``pynbd serve sh --help`` for every method and its arguments.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from ..backend import ConfigError, Param
from .sh import Runner, ShPlugin

METHODS = (
    "after_fork", "block_size", "cache", "can_cache", "can_extents", "can_fast_zero",
    "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_write", "can_zero", "close",
    "config", "config_complete", "default_export", "dump_plugin", "export_description",
    "extents", "flush", "get_ready", "get_size", "is_rotational", "list_exports", "open",
    "pread", "preconnect", "pwrite", "thread_model", "trim", "unload", "zero",
)
# A missing can_* is true when its method was given.
IMPLIED = {"can_write": "pwrite", "can_flush": "flush", "can_trim": "trim",
           "can_zero": "zero", "can_extents": "extents"}


class SnippetRunner(Runner):
    """Each method is its own snippet, saved in $tmpdir and run by /bin/sh."""

    def __init__(self, snippets: Mapping[str, str], tmpdir: str, env: Mapping[str, str],
                 timeout: float | None) -> None:
        super().__init__("eval", env, timeout)
        self.files = {method: self._save(tmpdir, method, text) for method, text in snippets.items()}
        for can, method in IMPLIED.items():
            if method in self.files and can not in self.files:
                self.files[can] = self._save(tmpdir, can, "exit 0\n")

    @staticmethod
    def _save(tmpdir: str, method: str, text: str) -> str:
        path = os.path.join(tmpdir, method)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        return path

    def argv(self, method: str) -> list[str] | None:
        path = self.files.get(method, self.files.get("missing"))
        return None if path is None else ["/bin/sh", path]


class EvalPlugin(ShPlugin):
    name = "eval"
    magic_param = None
    params = (
        *(Param(method, "str", f"shell snippet for {method}") for method in METHODS),
        Param("missing", "str", "shell snippet for methods not given (default: exit 2)"),
        Param("timeout", "duration", "kill a snippet that runs longer than this (pynbd only)"),
    )

    def make_runner(self, values: Mapping[str, Any]) -> Runner:
        snippets = {key: values[key] for key in (*METHODS, "missing") if values.get(key) is not None}
        return SnippetRunner(snippets, self.tmpdir, self.env(), self.timeout)

    def load(self) -> None:
        self.magic_key = ""  # eval has no load method and no magic parameter

    def user_pairs(self, pairs: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
        for key, value in pairs:
            if key == "":
                raise ConfigError(f"eval: expected METHOD=SCRIPT or key=value, got {value!r}")
        return pairs


PLUGIN = EvalPlugin
