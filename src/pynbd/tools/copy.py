"""pynbd copy — copy to and from NBD servers, files and pipes (nbdcopy's options).

Usage:
    pynbd copy [--allocated] [--blkhash[=ALGO[/BLOCKSIZE]]] [--blkhash-file=FILE]
               [-C N|--connections=N]
               [--destination-is-zero|--target-is-zero] [--dirty-bitmap=NAME] [--flush]
               [--no-extents] [-p|--progress|--progress=FD]
               [--queue-size=N] [--request-size=N] [-R N|--requests=N]
               [-S N|--sparse=N] [--synchronous] [-T N|--threads=N]
               [-v|--verbose] SOURCE DESTINATION
    pynbd copy --help | -V|--version

    SOURCE, DESTINATION := - | FILE | DEVICE | NBD-URI | [ CMD ARGS ... ]
    DESTINATION += null:

SOURCE and DESTINATION are NBD URIs (``nbd://host/export``,
``nbd+unix:///?socket=/tmp/sock``, ``nbds://`` with TLS), local files, block
devices, ``-`` (stdin as the source, stdout as the destination), ``null:``
(a destination that discards everything), or a server run for the copy and
stopped afterwards, written between brackets: ``[ qemu-nbd -f qcow2 x.qcow2 ]``
(it is handed a listening socket by systemd socket activation, which
qemu-nbd, nbdkit and pynbd serve understand). Put ``--`` before a bracketed
command so that its options are not taken for pynbd copy's.

Examples:
    pynbd copy nbd://example.com disk.img              download a disk
    pynbd copy disk.img "nbd+unix:///?socket=/tmp/sock"  upload one
    pynbd copy -- [ qemu-nbd -f qcow2 disk.qcow2 ] disk.raw   qcow2 to raw
    pynbd copy nbd://example.com - | file -            stream to a pipe
    pynbd copy -p nbd://server1 nbd://server2          with a progress bar
    pynbd copy nbd://server null:                      read as fast as possible
    pynbd copy --blkhash -- disk.raw null:             the blkhash of an image

Sparseness: the source's extents (NBD ``base:allocation``; SEEK_DATA and
SEEK_HOLE for files) say where it reads as zeroes; those ranges are not
read but zeroed on the destination (WRITE_ZEROES, a punched hole, BLKZEROOUT)
or skipped when the destination already reads as zeroes: with
``--destination-is-zero``, a regular file (it is truncated to the source's
size first), or an NBD export whose own extents say so. Data read from the
source is checked in blocks of ``-S`` bytes (default 4096, or the
destination's preferred block size if larger; ``-S 0`` turns this off) and
all-zero blocks are zeroed rather than written.

Options:
    --allocated        make the destination fully allocated: zero ranges are
                       allocated (NO_HOLE, ZERO_RANGE) instead of punched
    --blkhash[=ALGO[/BLOCKSIZE]]
                       print the blkhash of the image copied (as libnbd 1.24's
                       nbdcopy does): ALGO (md5, sha1, sha256 or sha512) over
                       the ALGO digests of each BLOCKSIZE block followed by
                       the length as 8 bytes little-endian, in hex. Default
                       sha256/64k. Not a sha256sum of the image; slows the
                       copy down. Not with --dirty-bitmap.
    --blkhash-file=FILE  write the blkhash to FILE instead of stdout
                       (implies --blkhash; needed when the destination is -)
    -C, --connections=N  up to N connections to each server when both ends
                       allow more than one (NBD multi-conn); default 4, but
                       no more than --threads. A captive server gets one.
                       All N are opened; the copy starts on one and puts
                       one more to work for as long as the last one added
                       made it at least 10% faster (-v says how many were
                       in use), so more connections are never slower.
    --destination-is-zero, --target-is-zero
                       trust that the destination reads as zeroes already
    --dirty-bitmap=NAME  copy only what changed since checkpoint NAME: the
                       ranges the source's ``qemu:dirty-bitmap:NAME`` meta
                       context marks dirty (qemu-nbd ``-B NAME``, pynbd
                       serve ``--filter=cbt``); changed data is written,
                       changed ranges that read as zeroes are zeroed, and
                       the rest of the destination is left as it is (a file
                       is updated in place, not truncated). The source must
                       be an NBD server offering that bitmap.
    --flush            flush the destination (NBD FLUSH, fsync) at the end
    --no-extents       ignore the source's extents and read everything
    -p, --progress     a progress bar on stderr
    --progress=FD      write ``N/100`` lines to file descriptor FD instead
    --queue-size=N     bytes in flight per connection at most (default 16M)
    --request-size=N   bytes per read or write, a power of 2 from 4096 to
                       32M (default 1M; smaller if a server says so)
    -R, --requests=N   requests in flight per connection (default 64)
    -S, --sparse=N     zero-detection block size (see above)
    --synchronous      one request at a time, in order (also used whenever a
                       stream is involved)
    -T, --threads=N    at most N connections (default, or 0: the number of
                       processors), each with --requests requests in flight;
                       one thread drives them all (--blkhash hashes in up
                       to N more)
    -v, --verbose      describe both ends, the layout and a summary on stderr
    -V, --version      print the version

Sizes accept K, M, G and T suffixes. Blocks are copied out of order unless
the copy is synchronous.

Limits: ``-`` is always a stream (stdin that is a regular file too), and a
stream source is read to its end: into a file the file gets its length,
into a server or device it must fit. Files and block devices are read and
written with plain system calls from the one thread that drives the copy,
so a slow disk holds up every connection's requests. Over TLS each
connection has one request in flight at a time. A file copied onto itself
is left as it is (not truncated first).

Errors: an unparseable URI, a server that cannot be reached, an unknown
export, a destination smaller than the source or read-only, a read or write
that fails (ENOSPC, EIO ...) each print one line ``pynbd copy: WHERE: WHAT``
on stderr and exit with status 1; the copy stops at the first failure and
never reports success after one. Bad options exit with status 1 as well.
"""

from __future__ import annotations

import sys

from ..client.errors import NBDError
from ..proto.errors import ProtocolError
from .copying.endpoint import CopyError
from .copying.options import UsageError, parse_args
from .copying.run import run_copy

PROG = "pynbd copy"


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if opts.help:
        print(__doc__.strip())
        return 0
    if opts.version:
        from .. import __version__
        print(f"pynbd copy {__version__}")
        return 0
    try:
        run_copy(opts)
    except CopyError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (NBDError, ProtocolError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
