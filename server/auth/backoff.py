"""Slowing a peer that keeps failing to authenticate.

Each refused credential makes the next refusal to the same peer address (the IP, not the
port: a guesser opens new connections) wait longer: ``base_s`` after the first, doubling per
recent failure up to ``max_s``. Failures older than ``window_s`` are forgotten. Only refusals
wait, on the event loop (asyncio.sleep), so a valid call from the same address is never slowed
and nothing is locked: one slow peer holds no other call. At most ``max_peers`` addresses are
remembered (the least recently failed are forgotten first), so a spray of addresses cannot
grow memory without bound.

Behind a proxy every call shares the proxy's address, so a guesser there slows the refusals of
everyone behind it, never their valid calls.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["FailureBackoff", "peer_address"]


def peer_address(peer: str) -> str:
    """"ipv4:10.0.0.5:41234" -> "ipv4:10.0.0.5"; "ipv6:[::1]:5000" -> "ipv6:[::1]"; a unix
    socket stays as it is."""
    if peer.startswith(("ipv4:", "ipv6:")):
        head, sep, port = peer.rpartition(":")
        if sep and port.isdigit() and head.count(":") >= 1:
            return head
    return peer


class FailureBackoff:
    def __init__(
        self,
        *,
        base_s: float = 0.05,
        max_s: float = 2.0,
        window_s: float = 60.0,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.window_s = window_s
        self.max_peers = max_peers
        self._clock = clock
        # address -> (recent failures, time of the last one)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def failed(self, peer: str) -> float:
        """Records a refusal from ``peer``; returns how long to wait before answering it."""
        address = peer_address(peer)
        now = self._clock()
        count, last = self._failures.pop(address, (0, now))
        if now - last > self.window_s:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        while len(self._failures) > self.max_peers:
            self._failures.popitem(last=False)
        return min(self.base_s * 2 ** min(count - 1, 30), self.max_s)

    def recent_failures(self, peer: str) -> int:
        entry = self._failures.get(peer_address(peer))
        if entry is None or self._clock() - entry[1] > self.window_s:
            return 0
        return entry[0]
