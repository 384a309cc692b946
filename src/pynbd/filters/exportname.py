"""exportname: change the export list clients see and the default export.

    pynbd serve --filter=exportname file dir=/srv/disks default-export=file2
    pynbd serve --filter=exportname file dir=/srv/disks exportname-list=empty
    pynbd serve --filter=exportname file dir=/srv/disks \\
        exportname-list=explicit exportname-strict=true exportname=file1 exportname=file3
    pynbd serve --filter=exportname file dir=/srv/disks \\
        exportdesc=script:'ls -l /srv/disks/"$name"'

Parameters
    default-export=NAME    the export a client asking for "" gets (empty:
                           the layer below decides)
    exportname-list=MODE   what NBD_OPT_LIST answers: keep (the layer below's
                           list, default), error (a refusal), empty (no
                           exports), defaultonly (just the default export's
                           name: default-export, else the first of the
                           layer below's list), explicit (the names given with exportname=)
    exportname-strict=BOOL true: a client asking for a name not given with
                           exportname= is refused, "" included (default false)
    exportname=NAME        an export for the explicit list (repeatable)
    exportdesc=MODE        the descriptions listed: keep (default), none,
                           fixed:STRING, or script:SCRIPT (run by /bin/sh
                           with $name set to the export; its output)

The list need not reflect reality: a listed name may still be refused and
an unlisted one accepted, unless exportname-strict=true.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable

from ..backend import (
    ConfigError,
    Connection,
    Export,
    Filter,
    OpenContext,
    Param,
    io_error,
)


class ExportnameFilter(Filter):
    name = "exportname"
    params = (
        Param("default-export", "str", "the export a client asking for \"\" gets", default=""),
        Param("exportname-list", "str", "what an export listing answers", default="keep",
              choices=("keep", "error", "empty", "defaultonly", "explicit")),
        Param("exportname-strict", "bool", "refuse names not given with exportname=",
              default=False),
        Param("exportname", "str", "an export of the explicit list", repeat=True),
        Param("exportdesc", "str", "keep, none, fixed:STRING or script:SCRIPT", default="keep"),
    )
    exportname_list: str
    exportname_strict: bool
    exportname: list[str]
    exportdesc: str

    def config_complete(self) -> None:
        # The parameter's attribute would hide the default_export method: keep it apart.
        self.default_name: str = self.__dict__.pop("default_export")
        mode, _, _ = self.exportdesc.partition(":")
        if self.exportdesc not in ("keep", "none") and mode not in ("fixed", "script"):
            raise ConfigError(f"exportname: exportdesc={self.exportdesc}: must be keep, none, "
                              f"fixed:STRING or script:SCRIPT")

    def default_export(self, next_default: Callable[[OpenContext], str],
                       ctx: OpenContext) -> str:
        if self.exportname_strict and "" not in self.exportname:
            return ""  # as in nbdkit, strictness judges the name the client sent: refused at open
        return self.default_name or next_default(ctx)

    def describe(self, export: Export) -> Export:
        mode, _, text = self.exportdesc.partition(":")
        if mode == "none":
            return Export(export.name)
        if mode == "fixed":
            return Export(export.name, text)
        if mode == "script":
            result = subprocess.run(["/bin/sh", "-c", text], capture_output=True, check=False,
                                    env={**os.environ, "name": export.name})
            return Export(export.name, result.stdout.decode(errors="replace").strip())
        return export

    def list_exports(self, next_list: Callable[[OpenContext], list[Export]],
                     ctx: OpenContext) -> list[Export]:
        mode = self.exportname_list
        if mode == "error":
            raise io_error(errno.EPERM, "exportname: export list restricted by policy")
        if mode == "empty":
            exports: list[Export] = []
        elif mode == "defaultonly":
            below = [] if self.default_name else next_list(ctx)
            exports = [Export(self.default_name or (below[0].name if below else ""))]
        elif mode == "explicit":
            exports = [Export(name) for name in self.exportname]
        else:
            exports = next_list(ctx)
        return [self.describe(e) for e in exports]

    def open(self, next_open: Callable[[OpenContext], Connection],
             ctx: OpenContext) -> Connection:
        if self.exportname_strict and ctx.export_name not in self.exportname:
            raise LookupError(f"export {ctx.export_name!r} not found")
        return super().open(next_open, ctx)
