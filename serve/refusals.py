"""A budget of refused requests per client, so that a client sending junk in a loop cannot take
the cores from the others.

Every request the server refuses (a 4xx other than 404 and 429) costs its client one token of a
bucket holding ``burst`` tokens and refilled at ``per_s`` tokens a second. A client whose bucket is
empty is answered 429 before anything of its request is read; the answer is held back for the
wait its ``Retry-After`` names, so a client that ignores the header is slowed all the same, at the
cost of a sleeping coroutine instead of a decode. Clients that send good requests never pay.

A client is one TCP connection (address and port): clients behind one proxy, or on this machine,
share an address, and one of them sending junk must not lock the others out. A client that opens
a new connection per request escapes the budget, but pays a connection per request.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable

FREE_STATUSES = (404, 429)  # a missing image is no abuse; a 429 is this budget's own answer
MAX_CLIENTS = 10_000  # buckets kept before full ones are forgotten


class RefusalBudget:
    """Token buckets of refused requests, one per client key (thread-safe)."""

    def __init__(
        self, burst: int, per_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if burst < 1 or per_s <= 0:
            raise ValueError(f"burst ({burst}) must be >= 1 and per_s ({per_s}) > 0")
        self.burst = burst
        self.per_s = per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.per_s)

    def wait(self, key: Hashable) -> float:
        """Seconds until ``key`` may be served again (0: now)."""
        with self._lock:
            now = self._clock()
            return max(0.0, (1.0 - self._tokens(key, now)) / self.per_s)

    def charge(self, key: Hashable, status: int) -> None:
        """Take one token from ``key`` when ``status`` is a refusal that counts."""
        if not 400 <= status < 500 or status in FREE_STATUSES:
            return
        with self._lock:
            now = self._clock()
            self._buckets[key] = (self._tokens(key, now) - 1.0, now)
            if len(self._buckets) > MAX_CLIENTS:  # forget clients whose allowance is back
                full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
                for k in full:
                    del self._buckets[k]


def retry_after(wait: float) -> str:
    """``Retry-After`` header value (whole seconds, at least 1) for a wait in seconds."""
    return str(max(1, math.ceil(wait)))
