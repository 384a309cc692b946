"""rate: limit the bandwidth the server uses, per connection and/or in total.

    pynbd serve --filter=rate memory 64M rate=1M                 # 1 Mbit/s in all
    pynbd serve --filter=rate memory 64M connection-rate=50K     # 50 kbit/s each
    pynbd serve --filter=rate memory 64M rate=1M rate-file=/tmp/rate

Parameters (rates in bits per second, with K/M/G suffixes, powers of 1024)
    rate=BITSPERSEC              the total over all connections
    connection-rate=BITSPERSEC   each connection's own limit
    rate-file=FILE               read the total rate from FILE (re-read at
    connection-rate-file=FILE    most once a second while the server runs;
                                 write a new file and rename it over the old
                                 one). Until FILE exists, the rate= value (or
                                 no limit) holds; if FILE is deleted the last
                                 rate read holds.
    burstiness=SECS              how long a client may burst at no cost after
                                 being idle, in seconds of the rate (default 2)

Reads and writes are limited separately (download and upload). Only the
data counts: zero, trim and the other requests are free, as they are small
on the wire. A request larger than the rate allows sleeps in one piece: put
the blocksize filter in front to smooth large requests.
"""

from __future__ import annotations

import threading
import time

from ..backend import Connection, Filter, FilterConnection, OpenContext, Param, parse_size

RECHECK = 1.0  # seconds between looks at a rate file


class Bucket:
    """A token bucket in bits: ``take`` says how long to wait for ``bits``."""

    def __init__(self, rate: int, burstiness: float, path: str | None = None) -> None:
        self.lock = threading.Lock()
        self.rate = rate
        self.burstiness = burstiness
        self.tokens = float(rate * burstiness)
        self.stamp = time.monotonic()
        self.path = path
        self.checked = 0.0

    def _reread(self, now: float) -> None:
        self.checked = now
        try:
            with open(str(self.path), encoding="ascii") as f:
                self.rate = parse_size(f.read().strip())
        except (OSError, ValueError):
            return  # missing or being rewritten: the last rate holds

    def take(self, bits: int) -> float:
        """Spend ``bits``; the seconds the caller must sleep to stay under the rate."""
        with self.lock:
            now = time.monotonic()
            if self.path is not None and now - self.checked >= RECHECK:
                self._reread(now)
            rate = self.rate
            if not rate:
                return 0.0
            self.tokens = min(self.tokens + (now - self.stamp) * rate, rate * self.burstiness)
            self.stamp = now
            self.tokens -= bits
            return -self.tokens / rate if self.tokens < 0 else 0.0


class RateConnection(FilterConnection["RateFilter"]):
    def __init__(self, next: Connection, filter: RateFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.read_buckets = [*filter.read_buckets, *filter.connection_buckets()]
        self.write_buckets = [*filter.write_buckets, *filter.connection_buckets()]

    @staticmethod
    def _wait(buckets: list[Bucket], count: int) -> None:
        delay = max(bucket.take(count * 8) for bucket in buckets)
        if delay:
            time.sleep(delay)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._wait(self.read_buckets, len(buf))
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._wait(self.write_buckets, len(buf))
        self.next.pwrite(buf, offset, flags)


class RateFilter(Filter):
    name = "rate"
    params = (
        Param("rate", "size", "total bits per second over all connections"),
        Param("connection-rate", "size", "bits per second of each connection"),
        Param("rate-file", "path", "file holding the total rate"),
        Param("connection-rate-file", "path", "file holding each connection's rate"),
        Param("burstiness", "float", "seconds of rate a client may burst", default=2.0),
    )
    rate: int | None
    connection_rate: int | None
    rate_file: str | None
    connection_rate_file: str | None
    burstiness: float
    connection = RateConnection

    def config_complete(self) -> None:
        total = self.rate is not None or self.rate_file is not None
        self.read_buckets = [Bucket(self.rate or 0, self.burstiness, self.rate_file)] if total else []
        self.write_buckets = [Bucket(self.rate or 0, self.burstiness, self.rate_file)] if total else []
        self.per_connection = self.connection_rate is not None or self.connection_rate_file is not None

    def connection_buckets(self) -> list[Bucket]:
        """A new bucket for one connection's reads or writes (none without a per-connection rate)."""
        if not self.per_connection:
            return []
        return [Bucket(self.connection_rate or 0, self.burstiness, self.connection_rate_file)]

    def requests_are_short(self) -> bool:
        return not (self.read_buckets or self.per_connection)
