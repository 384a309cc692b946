"""tar: serve one file inside a tar archive, read and written in place.

    pynbd serve --filter=tar file disk.tar tar-entry=disk.img
    pynbd serve -r --filter=tar file vm.ova tar-entry=vm-disk1.vmdk
    pynbd serve --filter=tar --filter=gzip file images.tar.gz tar-entry=disk.img
    pynbd serve --filter=tar --filter=xz file images.tar.xz tar-entry=disk.img
    pynbd serve --filter=qcow2 --filter=tar file vm.tar tar-entry=disk.qcow2

Parameters
    tar-entry=PATH   the member to serve (required), exactly as ``tar tf``
                     prints it (``./disk.img`` and ``disk.img`` differ)
    tar-limit=SIZE   look for the entry only among headers in the first
                     SIZE bytes of the archive (default 0: no limit), so
                     that an untrusted or huge archive is not scanned to
                     its end
    tar=PROGRAM      accepted for nbdkit compatibility and ignored: the
                     headers are parsed here, GNU tar is not needed

As nbdkit's tar filter. Filters stack in the order typed: the first
``--filter`` is nearest the client, so ``--filter=tar --filter=gzip`` finds
the entry inside the decompressed archive. The archive's headers are read
when each client connects (ustar, GNU long names and base-256 sizes, pax
``path``/``size`` for entries of 8 GiB and more); reads, writes, zeroing,
trimming and extents are then shifted into the entry's data, and the disk
is the entry's size (it cannot be resized). Writes change the archive in
place; checksums kept elsewhere in it (an OVA's manifest) are not updated.
Use ``-r`` to keep the archive unchanged.

Refused when a client connects, with one line in the log: an entry that is
not in the archive (or not within tar-limit), a directory, link or device,
a sparse entry (GNU or pax sparse: its bytes are not stored in order), a
compressed archive (the message says which filter to add), a damaged header
or an entry that runs past the end of a truncated archive.
"""

from __future__ import annotations

import errno

from ..backend import Connection, Filter, OpenContext, Param, io_error
from ..formats.tar import TarError, find_entry
from .offset import SliceConnection


class TarConnection(SliceConnection["TarFilter"]):
    """The entry's data in the archive below, served from 0."""

    def __init__(self, next: Connection, filter: TarFilter, ctx: OpenContext) -> None:
        def read(offset: int, count: int) -> bytes:
            buf = bytearray(count)
            next.pread(memoryview(buf), offset, 0)
            return bytes(buf)

        try:
            entry = find_entry(read, next.get_size(), filter.tar_entry, filter.tar_limit)
        except TarError as exc:  # the server logs it as the reason the open failed
            raise io_error(errno.ENOENT, str(exc)) from None
        super().__init__(next, filter, ctx, entry.data_offset, entry.size)


class TarFilter(Filter):
    short_requests = True
    name = "tar"
    params = (
        Param("tar-entry", "str", "the path of the file inside the archive", required=True),
        Param("tar-limit", "size", "only look at headers in the first SIZE bytes", default=0),
        Param("tar", "str", "the GNU tar program (ignored: headers are parsed in pynbd)"),
    )
    tar_entry: str
    tar_limit: int
    tar: str | None
    connection = TarConnection
