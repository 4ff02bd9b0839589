#!/usr/bin/env python3
"""What the per-tenant rate quota costs a call (issue 14's budget: authentication and what runs
with it under 0.5 ms p50 added per Detect / Track frame).

Two measurements, in one run, on this host:

  check_rate   QuotaEnforcer.check_rate alone (the whole hot path: a dict lookup for the
               tenant's limits, its bucket's refill and take), over many tenants, in a loop.
  interceptor  p50 of a trivial unary gRPC call over loopback (a real grpc.aio server and
               client, a handler that echoes 16 bytes) with and without the QuotaInterceptor in
               the server's chain, in alternating rounds so that drift on the shared host hits
               both alike. The difference is what the quota interceptor adds to any call,
               Detect included.

A Track stream pays the check once, when it opens: frames are not counted against the rate
(a session's frames are bounded by the session quota and by one frame at a time).

    .venv/bin/python bench/quota_bench.py [--calls 2000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.jobs.store.sqlite import SqliteJobStore  # noqa: E402
from server.quotas.enforcer import QuotaEnforcer  # noqa: E402
from server.quotas.interceptor import QuotaInterceptor  # noqa: E402
from server.quotas.limits import QuotaConfig  # noqa: E402

METHOD = "/bench.Echo/Echo"


def bench_check_rate(quotas: QuotaEnforcer, calls: int) -> float:
    """Nanoseconds per check_rate, over 100 tenants (so buckets are looked up, not cached in a
    local), every call admitted (the refused path builds an error, but a refused call ends)."""
    tenants = [f"tenant-{i}" for i in range(100)]
    start = time.perf_counter_ns()
    for i in range(calls):
        quotas.check_rate(tenants[i % 100], "vision")
    return (time.perf_counter_ns() - start) / calls


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(interceptors: list[grpc.aio.ServerInterceptor]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=interceptors)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def p50_ms(port: int, calls: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(METHOD)
        for _ in range(50):  # warm the connection
            await echo(b"x" * 16, timeout=5)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await echo(b"x" * 16, timeout=5)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per variant (default 6)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteJobStore(Path(tmp) / "jobs.db").open()
        # A rate no round reaches: the bench measures the admitted path.
        config = QuotaConfig(rates={f: (1e9, 1e9) for f in QuotaConfig().rates})
        quotas = QuotaEnforcer(store, config, holder="bench")
        ns = bench_check_rate(quotas, 200_000)
        print(f"check_rate: {ns:.0f} ns per call (200000 calls, 100 tenants)")
        plain = await serve([])
        limited = await serve([QuotaInterceptor(quotas, family_of=lambda m: "vision" if m == METHOD else None)])
        results: dict[str, list[float]] = {"without": [], "with": []}
        for r in range(a.rounds):
            for name, (_, port) in (("without", plain), ("with", limited)) if r % 2 == 0 else (("with", limited), ("without", plain)):
                results[name].append(await p50_ms(port, a.calls))
        for server, _ in (plain, limited):
            await server.stop(0)
        await store.close()
    without, with_ = statistics.median(results["without"]), statistics.median(results["with"])
    print(f"unary echo p50 over loopback, median of {a.rounds} rounds of {a.calls} calls:")
    print(f"  without quota interceptor: {without:.3f} ms   per round: {', '.join(f'{v:.3f}' for v in results['without'])}")
    print(f"  with quota interceptor:    {with_:.3f} ms   per round: {', '.join(f'{v:.3f}' for v in results['with'])}")
    diffs = [w - o for w, o in zip(results["with"], results["without"], strict=True)]
    print(f"  added p50: {with_ - without:+.3f} ms (per round pair: {', '.join(f'{d:+.3f}' for d in diffs)}); budget 0.5 ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
