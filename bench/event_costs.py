#!/usr/bin/env python3
"""What one job event costs PostgreSQL (issue 13's per-event costs), measured on a real server.

  writer   PostgresJobStore.append_event of N progress_update events (a real ProgressUpdate
           payload): statements sent per event (each is one round trip: autocommit, one
           statement per call), writing transactions per event (transaction ids taken), and WAL
           bytes per event (pg_current_wal_lsn() before and after, pg_wal_lsn_diff / N). The
           pg_notify in the same statement writes no WAL (the notification queue is not
           WAL-logged).
  watcher  the same events watched through an EventBus on a second store (another replica):
           store reads (events_after) per event, with events spaced so that each notification
           is read alone (the worst case; events that arrive during a read share the next one).

  .venv/bin/python bench/event_costs.py [--url postgresql://...] [--events 500] [--output DIR]

Without --url it starts its own PostgreSQL (server/pg, Debian's binaries). Writes
event_costs.json and event_costs.md under --output (default bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framewise.v1 import jobs_service_pb2 as jobs_pb2  # noqa: E402
from server.jobs.engine.events import EventBus  # noqa: E402
from server.jobs.store import EventRecord  # noqa: E402
from server.jobs.store.postgres import PostgresJobStore  # noqa: E402
from server.pg.local import LocalPostgres  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StatementCounter:
    """Counts statements psycopg sends on every connection of this process while enabled."""

    def __init__(self) -> None:
        self.count = 0
        self.enabled = False
        original = psycopg.AsyncConnection.execute
        counter = self

        async def execute(conn: psycopg.AsyncConnection[Any], *args: Any, **kwargs: Any) -> Any:
            if counter.enabled:
                counter.count += 1
            return await original(conn, *args, **kwargs)

        psycopg.AsyncConnection.execute = execute  # type: ignore[method-assign]


async def scalar(url: str, sql: str) -> Any:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute(sql)).fetchone()
        return None if row is None else row[0]


async def next_xid(url: str) -> int:
    """A new transaction id: every writing transaction takes one, in order, so the difference
    between two of these, less one, is the writing transactions committed in between."""
    return int(await scalar(url, "SELECT pg_current_xact_id()::text::bigint"))


async def measure(url: str, events: int) -> dict[str, Any]:
    counter = StatementCounter()
    payload = jobs_pb2.ProgressUpdate(
        stage=jobs_pb2.JOB_STAGE_TRACKING, percent=42.5, message="tracking", done=1234, total=5000
    ).SerializeToString()
    async with PostgresJobStore(url) as writer, PostgresJobStore(url) as watcher_store:
        op, _ = await writer.create_operation(kind=jobs_pb2.JOB_KIND_SEGMENT_VIDEO, request=b"r")
        for _ in range(20):  # warm-up: prepared statements, pool connections
            await writer.append_event(op.name, "progress_update", payload)

        # -- writer -----------------------------------------------------------------------------
        xid_before = await next_xid(url)
        lsn_before = await scalar(url, "SELECT pg_current_wal_lsn()::text")
        counter.enabled = True
        for _ in range(events):
            await writer.append_event(op.name, "progress_update", payload)
        counter.enabled = False
        wal = await scalar(url, f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn_before}')")
        xid_after = await next_xid(url)
        statements = counter.count
        transactions = xid_after - xid_before - 1

        # -- watcher on another replica ---------------------------------------------------------
        reads = 0
        inner = watcher_store.events_after

        async def counted(*args: Any, **kwargs: Any) -> list[EventRecord]:
            nonlocal reads
            reads += 1
            return await inner(*args, **kwargs)

        watcher_store.events_after = counted  # type: ignore[method-assign]
        bus_w = EventBus(watcher_store, heartbeat_s=3600)
        bus_s = EventBus(writer, heartbeat_s=3600)
        watched = min(events, 200)
        cells = []
        for k in (1, 100):
            last = (await writer.get_operation(op.name)).last_sequence
            subs = [bus_w.subscribe(op.name, after_sequence=last) for _ in range(k)]
            assert watcher_store.listener is not None
            await asyncio.wait_for(watcher_store.listener.connected.wait(), 10)
            started: dict[int, float] = {}
            latencies: list[float] = []

            async def consume(sub: Any, last: int = last) -> None:
                async for item in sub:
                    if isinstance(item, EventRecord):
                        latencies.append(time.perf_counter() - started[item.sequence])
                        if item.sequence == last + watched:
                            return

            consumers = [asyncio.create_task(consume(sub)) for sub in subs]
            await asyncio.sleep(0.5)  # each watcher's own first read, and the RESYNC's, are done
            reads_before = reads
            for i in range(watched):
                # The sequence is known before the append: nobody else appends to this operation.
                started[last + i + 1] = time.perf_counter()
                await bus_s.emit(op.name, "progress_update", payload)
                await asyncio.sleep(0.005)
            await asyncio.wait_for(asyncio.gather(*consumers), 60)
            latencies.sort()
            cells.append({
                "subscribers": k,
                "reads_per_event": (reads - reads_before) / watched,
                "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
                "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
            })
            for sub in subs:
                await sub.aclose()
        bus_w.close()
        bus_s.close()
        server_version = await scalar(url, "SHOW server_version")
    return {
        "events": events,
        "payload_bytes": len(payload),
        "statements_per_event": statements / events,
        "transactions_per_event": transactions / events,
        "wal_bytes_per_event": float(wal) / events,
        "watcher_events": watched,
        "watcher_cells": cells,
        "postgres": server_version,
        "machine": platform.platform(),
    }


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        "# Per-event cost in PostgreSQL (bench/event_costs.py)",
        "",
        f"PostgreSQL {r['postgres']}, {r['events']} progress_update events of {r['payload_bytes']} payload bytes.",
        "",
        "| per event | value |",
        "|---|---|",
        f"| writer: statements (= round trips) | {r['statements_per_event']:.2f} |",
        f"| writer: transactions (ids taken) | {r['transactions_per_event']:.2f} |",
        f"| writer: WAL bytes | {r['wal_bytes_per_event']:.0f} |",
        "",
        f"Watchers on another replica (an EventBus on a second store), {r['watcher_events']} events 5 ms apart: "
        "store reads per event, and latency from the writer's append start to each watcher's receipt (no gRPC).",
        "",
        "| subscribers | store reads per event | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *[f"| {c['subscribers']} | {c['reads_per_event']:.2f} | {c['p50_ms']} | {c['p99_ms']} |" for c in r["watcher_cells"]],
        "",
    ])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        return await measure(args.url, args.events)
    async with LocalPostgres() as server:
        return await measure(server.url, args.events)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="", help="a PostgreSQL to measure on (default: start one)")
    p.add_argument("--events", type=int, default=500)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "event_costs.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / "event_costs.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
