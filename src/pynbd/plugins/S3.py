"""S3: a disk in an S3 bucket (Amazon S3, Ceph, MinIO, ...): one object, or one object per block.

    pynbd serve S3 bucket=images key=disk.img                       # one object, read-only
    pynbd serve S3 endpoint-url=https://ceph.example.com bucket=b key=vm1 size=50G object-size=128k
    AWS_PROFILE=backup pynbd serve S3 bucket=b key=disk.img --filter=xz

Parameters (nbdkit's names)
    bucket=BUCKET          the bucket (required)
    key=KEY                the object (one-object mode), or the prefix of the
                           block objects (with size= and object-size=) (required)
    size=SIZE              the size of the disk, and object-size=SIZE the size
    object-size=SIZE       of each block object: give both or neither
    endpoint-url=URL       an S3-compatible service other than Amazon's
    access-key=ID          credentials; otherwise boto3 finds them as usual
    secret-key=SECRET      (AWS_* environment variables, ~/.aws/credentials,
    session-token=TOKEN    AWS_PROFILE, ...). secret-key and session-token
                           take +FILE, - and -FD as passwords do
    connections=N          HTTP connections to the service (default 16)

One object
    The object's bytes are the disk, read with ranged GETs; its size is the
    object's. The export is read-only.

One object per block
    Block N (N = offset / object-size) is the object ``KEY/%016x`` (nbdkit's
    names, so the same bucket works with both). A block never written, or
    trimmed, has no object and reads as zeroes; trim and write-zeroes of
    whole blocks delete their objects, and writing a block of zeroes deletes
    it too. A write smaller than a block reads the block, changes it and
    writes it back (writes to one block are serialized within the server,
    not across servers). Extents list the block objects, so ``nbdinfo --map``
    shows unwritten blocks as holes. Every write is durable when it returns,
    so flush has nothing to do and FUA is native. Multi-conn is advertised.
    A block object of another size than object-size fails its reads with EIO.

Errors
    A missing bucket or object, or credentials the service refuses, are
    reported when pynbd starts. Failed requests later are EIO, logged with
    the service's error code.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator
from typing import Any

from ..backend import (
    FLAG_FAST_ZERO,
    FUA_NATIVE,
    ConfigError,
    Connection,
    Extent,
    OpenContext,
    Param,
    Plugin,
    is_zero,
)

log = logging.getLogger("pynbd.plugins.S3")

_LOCK_STRIPES = 64
_MAX_REQUEST = 32 << 20
_LIST_PAGE = 1000
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def load_boto3() -> tuple[Any, Any, tuple[type[Exception], ...]]:
    """boto3, botocore.config and the errors botocore raises (ConfigError if not installed)."""
    try:
        import boto3  # type: ignore[import-untyped]
        import botocore.config  # type: ignore[import-untyped]
        import botocore.exceptions  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("S3: needs boto3 (pip install 'pynbd[s3]')") from None
    return boto3, botocore.config, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def response_of(exc: Exception) -> dict[str, Any] | None:
    """The service's answer a botocore ClientError carries, or None."""
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) else None


def describe(exc: Exception) -> str:
    """A boto3/botocore failure as one line: the service's code and message."""
    response = response_of(exc)
    if response is not None:
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code", "?")
        message = error.get("Message") or ""
        return f"{code} (HTTP {status}){': ' + message if message else ''}"
    return str(exc)


def is_missing(exc: Exception) -> bool:
    response = response_of(exc)
    return response is not None and str(response.get("Error", {}).get("Code")) in _MISSING


class S3Connection(Connection):
    """A client's view; the disk is in the bucket, so all connections share it."""

    def __init__(self, plugin: S3Plugin) -> None:
        self.plugin = plugin

    def get_size(self) -> int:
        return self.plugin.disk_size

    def can_multi_conn(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.plugin.read(buf, offset)


class BlockConnection(S3Connection):
    """One object per block: writable, trimmable, with extents."""

    def can_write(self) -> bool:
        return True

    def can_flush(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return False

    def can_fua(self) -> int:
        return FUA_NATIVE

    def can_extents(self) -> bool:
        return True

    def block_size(self) -> tuple[int, int, int]:
        """Any size works; whole blocks avoid reading a block before writing it."""
        size = self.plugin.object_size or 0
        preferred = size if 512 <= size <= _MAX_REQUEST and size & (size - 1) == 0 else 4096
        return (1, preferred, _MAX_REQUEST)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.plugin.write(buf, offset)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO:
            raise OSError(errno.ENOTSUP, "S3: zeroing is not fast")
        self.plugin.discard(count, offset)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.plugin.discard(count, offset)

    def flush(self, flags: int) -> None:
        """Every write was durable when it returned."""

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        return self.plugin.extents(count, offset)


class S3Plugin(Plugin):
    name = "S3"
    params = (
        Param("bucket", "str", "the bucket", required=True),
        Param("key", "str", "the object, or the prefix of the block objects", required=True),
        Param("size", "size", "disk size (object-per-block mode)"),
        Param("object-size", "size", "size of each block object"),
        Param("endpoint-url", "str", "URL of an S3-compatible service"),
        Param("access-key", "str", "access key ID"),
        Param("secret-key", "secret", "secret access key (+FILE, - or -FD to read it)"),
        Param("session-token", "secret", "session token (+FILE, - or -FD to read it)"),
        Param("connections", "int", "HTTP connections to the service", default=16),
    )
    bucket: str
    key: str
    size: int | None
    object_size: int | None
    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    connections: int

    def config_complete(self) -> None:
        if (self.size is None) != (self.object_size is None):
            raise ConfigError("S3: size= and object-size= must be given together")
        if self.object_size is not None and self.object_size <= 0:
            raise ConfigError("S3: object-size must be more than 0")
        self.blocks = self.object_size is not None
        self.locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def get_ready(self) -> None:
        boto3, botocore_config, self.errors = load_boto3()
        session = boto3.session.Session(aws_access_key_id=self.access_key,
                                        aws_secret_access_key=self.secret_key,
                                        aws_session_token=self.session_token)
        config = botocore_config.Config(max_pool_connections=self.connections,
                                        retries={"max_attempts": 2, "mode": "standard"})
        try:
            self.s3: Any = session.client("s3", endpoint_url=self.endpoint_url, config=config)
            self.s3.head_bucket(Bucket=self.bucket)
            if self.blocks:
                assert self.size is not None
                self.disk_size = self.size
            else:
                self.disk_size = int(self.s3.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"])
        except self.errors as exc:
            raise ConfigError(f"S3: {self.start_error(exc)}") from None

    def start_error(self, exc: Exception) -> str:
        where = f"s3://{self.bucket}" + ("" if self.blocks else f"/{self.key}")
        response = response_of(exc)
        if response is not None:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            operation = getattr(exc, "operation_name", "")
            if status == 404 and operation == "HeadBucket":
                return f"bucket {self.bucket!r} does not exist"
            if status == 404:
                return f"no object {self.key!r} in bucket {self.bucket!r}"
            if status == 403:
                return f"access to {where} denied (check the credentials): {describe(exc)}"
        return f"{where}: {describe(exc)}"

    def open(self, ctx: OpenContext) -> Connection:
        return BlockConnection(self) if self.blocks else S3Connection(self)

    # ------------------------------------------------------------ requests
    def failed(self, what: str, exc: Exception) -> OSError:
        log.error("S3: %s: %s", what, describe(exc))
        return OSError(errno.EIO, f"S3: {what}: {describe(exc)}")

    def name_of(self, block: int) -> str:
        return f"{self.key}/{block:016x}"

    def get(self, key: str, first: int, last: int, into: memoryview) -> bool:
        """Fill ``into`` with bytes first..last of ``key``; False if there is no such object."""
        try:
            answer = self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={first}-{last}")
            data = answer["Body"].read()
        except self.errors as exc:
            if is_missing(exc):
                return False
            raise self.failed(f"GET {key} bytes {first}-{last}", exc) from None
        if len(data) != len(into):
            raise OSError(errno.EIO, f"S3: {key}: {len(data)} bytes instead of {len(into)} (is it "
                          "smaller than object-size?)")
        into[:] = data
        return True

    def read(self, buf: memoryview, offset: int) -> None:
        if not self.blocks:
            self.get(self.key, offset, offset + len(buf) - 1, buf)
            return
        for block, start, view in self.pieces(buf, offset):
            if not self.get(self.name_of(block), start, start + len(view) - 1, view):
                view[:] = bytes(len(view))

    def pieces(self, buf: memoryview, offset: int) -> Iterator[tuple[int, int, memoryview]]:
        """(block, offset in the block, the part of ``buf`` in it) for a request."""
        assert self.object_size is not None
        size = self.object_size
        done = 0
        while done < len(buf):
            block, start = divmod(offset + done, size)
            n = min(len(buf) - done, size - start)
            yield block, start, buf[done:done + n]
            done += n

    def put_block(self, block: int, data: memoryview | None) -> None:
        """Store a whole block; a block of zeroes (or None) is deleted instead."""
        key = self.name_of(block)
        try:
            if data is None or is_zero(data):
                self.s3.delete_object(Bucket=self.bucket, Key=key)
            else:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
        except self.errors as exc:
            raise self.failed(f"PUT {key}", exc) from None

    def change(self, block: int, start: int, data: memoryview | None, length: int) -> None:
        """Put ``data`` (None: ``length`` zeroes) at ``start`` of a block, under its lock."""
        assert self.object_size is not None
        with self.locks[block % _LOCK_STRIPES]:
            if length == self.object_size:
                self.put_block(block, data)
                return
            whole = memoryview(bytearray(self.object_size))  # read, change, write back
            if not self.get(self.name_of(block), 0, self.object_size - 1, whole):
                whole[:] = bytes(self.object_size)
            whole[start:start + length] = data if data is not None else bytes(length)
            self.put_block(block, whole)

    def write(self, buf: memoryview, offset: int) -> None:
        for block, start, view in self.pieces(buf, offset):
            self.change(block, start, view, len(view))

    def discard(self, count: int, offset: int) -> None:
        """Trim / write zeroes: whole blocks are deleted, parts written with zeroes."""
        assert self.object_size is not None
        end = offset + count
        while offset < end:
            block, start = divmod(offset, self.object_size)
            n = min(end - offset, self.object_size - start)
            self.change(block, start, None, n)
            offset += n

    def extents(self, count: int, offset: int) -> Iterator[Extent]:
        """Blocks with an object are data, the others holes (listed in key order)."""
        assert self.object_size is not None
        size = self.object_size
        first, last = offset // size, (offset + count - 1) // size
        pos = first
        for block in self.stored_blocks(first, last):
            if block > pos:
                yield Extent(pos * size, (block - pos) * size, hole=True, zero=True)
            yield Extent(block * size, size)
            pos = block + 1
        if pos <= last:
            yield Extent(pos * size, (last + 1 - pos) * size, hole=True, zero=True)

    def stored_blocks(self, first: int, last: int) -> Iterator[int]:
        """The numbers of the blocks from ``first`` to ``last`` that have an object, in order."""
        prefix = f"{self.key}/"
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, StartAfter=self.name_of(first - 1) if first else "",
                PaginationConfig={"PageSize": _LIST_PAGE})
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix):]
                    try:
                        block = int(name, 16) if len(name) == 16 else -1
                    except ValueError:
                        continue  # not a block object
                    if block < 0:
                        continue
                    if block > last:
                        return
                    yield block
        except self.errors as exc:
            raise self.failed(f"LIST {prefix}", exc) from None
