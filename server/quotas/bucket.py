"""Token bucket maths (no I/O, no clock of its own: the caller passes ``now``).

A bucket holds up to ``capacity`` tokens and gains ``rate`` tokens per second; a request takes
one. Full buckets are indistinguishable from new ones, which is what lets the limiter forget
them (server/quotas/rates.py) and keep its memory bounded by the tenants active lately.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 tokens per second, got {rate!r}")
        if not capacity >= 1:
            raise ValueError(f"capacity must be >= 1 token (a bucket that cannot hold one never admits), got {capacity!r}")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity  # a new bucket starts full: the burst is available at once
        self.stamp = now

    def _refill(self, now: float) -> None:
        # A clock that went backwards (it should not: callers use a monotonic clock) adds nothing.
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> float:
        """Takes ``n`` tokens and returns 0.0, or takes nothing and returns the seconds until
        ``n`` tokens will be there (what RetryInfo tells the caller)."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def retune(self, rate: float, capacity: float, now: float) -> None:
        """New rate and capacity (a changed quota, or the replica count changed its share): what
        accrued so far is kept at the old rate, then cut to the new capacity."""
        if not rate > 0 or not capacity >= 1:
            raise ValueError(f"rate must be > 0 and capacity >= 1, got {rate!r} and {capacity!r}")
        self._refill(now)
        self.rate = rate
        self.capacity = capacity
        self.tokens = min(self.tokens, capacity)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity
