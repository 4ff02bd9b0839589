#!/usr/bin/env python3
"""Cluster benchmark (issue 13): jobs/s on SQLite vs PostgreSQL with 1 and 3 replicas, cross-replica event latency,
what one event costs PostgreSQL, and how long a killed replica's job waits for another replica.

One tritonserver (CPU repository; or --triton-url) and one D-ID emulator (zero stage delay, its own process at
SCHED_IDLE) come from the jobs benchmark's JobStack without its orchestrator; one PostgreSQL from server/pg; the
replicas and HAProxy from the cluster launcher (server/cluster, what `make serve-cluster` runs), each deployment with
its own job store (a SQLite file, or a fresh schema of the one PostgreSQL) and its own storage root:

  sqlite     1 replica, SQLite job store
  pg1        1 replica, PostgreSQL job store
  pg3        3 replicas, one PostgreSQL job store
  takeover   3 replicas, PostgreSQL, --job-lease --takeover-lease (short, so that a takeover is quick)

Every deployment is started before anything is measured (forking a replica once grpc.aio has run in this process
can abort the child, as in jobs_bench), and all replicas run the jobs benchmark's orchestrator flags (the tests' job
settings, --result-cache-bytes 0, --triton-shm on, log level WARNING).

  costs        bench/event_costs.py's measure() on the PostgreSQL alone (before any replica starts, so the WAL it
               counts is the events' own): statements (round trips), transactions and WAL bytes per event
  throughput   N talking-video jobs (skip_matting) submitted at once through the deployment's HAProxy, each awaited
               with WaitOperation (jobs_bench.throughput); the variants alternate over rounds (sqlite, pg1, pg3,
               then pg3, pg1, sqlite, ...); medians and ratios
  latency      pg3: every worker of every replica is held by a job whose D-ID talk does not end; the round's jobs
               queue; K WatchOperation streams per job attach to another replica; the holders of one replica (the
               job replica) are cancelled, so it runs the round's jobs while the watchers read them from the other
               replica's store notifications. Latency = receipt time - WatchOperationResponse.time (jobs_bench)
  takeover     a job is submitted with a D-ID talk that renders for a while; once the talk exists, its replica is
               killed (SIGKILL); time from the kill to the first event another replica writes for the job
               (stored time, and receipt by a watcher on a surviving replica); one D-ID talk; every event once
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from jobs_bench import (  # first: it keeps gRPC's fork handlers off before gRPC loads
    HOLD_S, NATIVE_WATCHER, TARGET_P99_MS, WATCHER_CLASSES, WORKERS, Client, JobStack, cell_label, cpu_pressure,
    job_state, latency_summary, loop_thread_sched, machine_busy_s, quiet_collector, throughput,
)
from detect_bench import _git, _table, cpu_seconds, free_port
from event_costs import markdown as costs_markdown
from event_costs import measure as measure_event_costs
from native_watcher import build as build_native_watcher

import grpc
import numpy as np
from google.longrunning import operations_pb2, operations_pb2_grpc

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from server.cluster.launcher import Cluster, ClusterSettings
from server.pg import LocalPostgres
from tests.conftest import DID_API_KEY, job_args

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("sqlite", "pg1", "pg3")
TARGET_PG1_RATIO = 0.8
TAKEOVER_MARGIN_S = 2.0
# The latency phase's holders stay in D-ID (created, then started) this long each: they must outlast every round.
LATENCY_HOLD_S = max(HOLD_S, 900.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--repository", type=Path, default=REPO / ".cache" / "model_repository_cpu")
    p.add_argument("--triton-url", default="", help="use this running Triton (host:grpc_port) instead of starting one")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds; each runs every variant once")
    p.add_argument("--jobs", type=int, default=32, help="jobs per throughput cell (submitted at once)")
    p.add_argument("--events", type=int, default=500, help="at least this many distinct events per latency cell")
    p.add_argument("--jobs-per-round", type=int, default=8,
                   help="jobs per latency round (the job replica runs 4 at once)")
    p.add_argument("--subscribers", default="1,100", help="K of the latency cells (K streams on every watched job)")
    p.add_argument("--watcher", choices=("auto", "native", "python"), default="auto",
                   help="latency watchers: native (bench/native_watcher.py; needs gcc and libnghttp2-dev, `make "
                        "bench-deps`), python (grpc.aio streams in this process), auto: native if it builds")
    p.add_argument("--cost-events", type=int, default=500, help="events of the per-event cost measurement")
    p.add_argument("--takeover-lease", type=float, default=5.0, help="--job-lease of the takeover deployment (s)")
    p.add_argument("--takeover-did-s", type=float, default=6.0,
                   help="the killed job's D-ID talk stays 'created' this long, then 'started' as long")
    p.add_argument("--emulator-priority", choices=("idle", "normal"), default="idle", help="as in jobs_bench")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 4 jobs, 40 events per latency cell, 50 cost events, 1 takeover")
    a = p.parse_args(argv)
    a.subscribers = sorted({int(k) for k in a.subscribers.split(",")})
    a.takeovers = 2  # the takeover deployment's 3 replicas: each trial kills one, the last survivor takes the 2nd
    if a.quick:
        a.rounds, a.jobs, a.events, a.jobs_per_round, a.cost_events, a.takeovers = 1, 4, 40, 4, 50, 1
    if a.jobs > 64:
        p.error("--jobs is at most 64 (the default --max-queued-jobs)")
    # jobs_bench's JobStack reads these
    a.orchestrator_env, a.did_poll_interval = [], 0.0
    return a


class Backbone(JobStack):
    """The jobs benchmark's Triton and D-ID emulator (its own process, zero stage delay), without its orchestrator:
    the replicas come from the cluster launcher."""

    def _start(self, name: str, command: list[str], env: dict, ready, timeout_s: float,  # noqa: ANN001
               attempts: int = 3) -> None:
        if name != "orchestrator":
            super()._start(name, command, env, ready, timeout_s, attempts)


def replica_args(did_url: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The jobs benchmark's orchestrator flags (JobStack.start), for every replica of every deployment."""
    # Quotas lifted: one tenant drives the whole cluster here, up to --max-queued-jobs at once.
    return ("--log-level", "WARNING", "--triton-shm", "on", "--result-cache-bytes", "0", "--quota-jobs", "0",
            "--quota-storage-bytes", "0",
            *job_args(SimpleNamespace(url=did_url)), *extra)


@dataclass
class Deployment:
    """One cluster of the launcher: its replicas, HAProxy, its job store and storage; Triton and D-ID shared."""

    name: str
    replicas: int
    job_store: str
    extra_args: tuple[str, ...] = ()
    cluster: Cluster | None = None
    killed: set[str] = field(default_factory=set)

    async def start(self, work: Path, triton_url: str, did_url: str) -> None:
        folder = work / self.name
        folder.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(ClusterSettings(
            replicas=self.replicas, port=free_port(), grpc_base=0, metrics_base=0, stats_port=None, work_dir=folder,
            triton_url=triton_url, job_store=self.job_store, storage_root=folder / "storage",
            replica_args=replica_args(did_url, self.extra_args), restart_replicas=False, startup_timeout_s=300.0))
        await self.cluster.start()

    @property
    def address(self) -> str:
        assert self.cluster is not None
        return self.cluster.address

    def pids(self) -> dict[str, int]:
        """The live replicas' pids by replica id (cpu_seconds counts each with its job worker child)."""
        assert self.cluster is not None
        return {r.spec.replica_id: r.process.pid for r in self.cluster.replicas
                if r.process is not None and r.spec.replica_id not in self.killed}

    def replica(self, replica_id: str):  # noqa: ANN201 - the launcher's _Replica
        assert self.cluster is not None
        (found,) = [r for r in self.cluster.replicas if r.spec.replica_id == replica_id]
        return found

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()


def metadata(op: operations_pb2.Operation) -> jobs_pb2.JobMetadata:
    meta = jobs_pb2.JobMetadata()
    op.metadata.Unpack(meta)
    return meta


async def get_meta(client: Client, name: str) -> jobs_pb2.JobMetadata:
    return metadata(await client.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10))


def client_for(address: str, did_url: str) -> Client:
    """jobs_bench's Client (submit, wait, GetOperation, the emulator's control API) on one address."""
    return Client(SimpleNamespace(did_url=did_url, address=address), channels=0)


async def talk_posts(client: Client) -> int:
    log = (await client.emulator("GET", "/_emulator/requests"))["requests"]
    return sum(r["method"] == "POST" and r["path"].startswith("/talks") for r in log)


async def until_outcomes_taken(client: Client, what: str, timeout_s: float = 90) -> None:
    """Until every queued D-ID outcome was taken by a talk: the jobs that took them are in D-ID."""
    deadline = time.monotonic() + timeout_s
    while (await client.emulator("GET", "/_emulator/requests"))["pending_talk_outcomes"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not reach D-ID within {timeout_s} s")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------ throughput


async def warm_up(client: Client, replicas: int) -> None:
    """Unmeasured: first detection calls, shm registration and D-ID client of every replica (jobs spread by the
    shared queue: 2 per replica at once)."""
    names = [await client.submit(True) for _ in range(2 * replicas)]
    for name in names:
        if job_state(await client.wait(name)) != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"warm-up job {name} failed")


async def run_throughput(args: argparse.Namespace, deployments: dict[str, Deployment], shared_pids: dict[str, int],
                         did_url: str) -> dict:
    clients = {v: client_for(deployments[v].address, did_url) for v in VARIANTS}
    cells: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:
            await warm_up(clients[v], deployments[v].replicas)
        for r in range(args.rounds):
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                pids = {**deployments[v].pids(), **shared_pids}
                if v == "sqlite":
                    pids.pop("postgres", None)
                print(f"round {r + 1}: {v}", flush=True)
                cell = await throughput(clients[v], pids, args.jobs, True)
                cell["round"] = r + 1
                cells[v].append(cell)
    finally:
        for c in clients.values():
            await c.close()
    medians = {v: float(np.median([c["jobs_per_s"] for c in cells[v]])) for v in VARIANTS}
    return {
        "cells": cells,
        "median_jobs_per_s": {v: round(m, 3) for v, m in medians.items()},
        "ratios": {"pg1_vs_sqlite": round(medians["pg1"] / medians["sqlite"], 3),
                   "pg3_vs_sqlite": round(medians["pg3"] / medians["sqlite"], 3),
                   "pg3_vs_pg1": round(medians["pg3"] / medians["pg1"], 3)},
        "pass": medians["pg1"] >= TARGET_PG1_RATIO * medians["sqlite"],
    }


# ------------------------------------------------------------------------------------------ cross-replica latency


async def submit_holders(lb: Client, n: int) -> list[str]:
    """`n` jobs whose D-ID talks stay unfinished: each takes a lane of whichever replica has one free."""
    for _ in range(n):
        await lb.emulator("POST", "/_emulator/faults", {"talk_outcome": "done", "stage_delay_s": LATENCY_HOLD_S})
    names = [await lb.submit(True) for _ in range(n)]
    await until_outcomes_taken(lb, "holder jobs")
    return names


async def latency_round(lb: Client, watch: Client, job_replica: str, watch_replica: str, holders: list[str],
                        k: int, args: argparse.Namespace, watcher: str, pids: dict[str, int]) -> dict:
    """Every lane is held; the round's jobs queue; K streams per job attach to `watch_replica`; the holders of
    `job_replica` are cancelled, so it runs the jobs (4 at a time). Shaped as jobs_bench's rounds for its
    latency_summary."""
    quiet_collector()
    names = [await lb.submit(True) for _ in range(args.jobs_per_round)]
    t_attach0 = time.time()
    streams = [{"job": i, "first": None, "events": []} for i in range(len(names)) for _ in range(k)]
    watchers = WATCHER_CLASSES[watcher](watch, streams, [names[s["job"]] for s in streams])
    try:
        await watchers.attach()
        t_attached = time.time()
        queued = sum([(await get_meta(lb, n)).state == jobs_pb2.JOB_STATE_QUEUED for n in names])
        cpu0, busy0, usage0 = cpu_seconds(pids), machine_busy_s(), watchers.usage()
        sched0 = {n: loop_thread_sched(pids[n]) for n in ("job_replica", "watch_replica")}
        for h in holders:
            await lb.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=h))
        t_release = time.time()
        await watchers.finish()
        t_end, cpu1, busy1 = time.time(), cpu_seconds(pids), machine_busy_s()
        sched1, usage1 = {n: loop_thread_sched(pids[n]) for n in ("job_replica", "watch_replica")}, watchers.usage()
        await watchers.collect()
    finally:
        await watchers.close()
    watcher_usage = usage1 - usage0
    run_cpu = {p: cpu1[p] - cpu0[p] for p in cpu1}
    run_cpu["bench_client"] += watcher_usage.cpu_s
    finals = [await lb.wait(n) for n in names]
    ran_on = [metadata(op).replica for op in finals]
    if any(r != job_replica for r in ran_on):  # the lanes' arithmetic failed: the figure would not be cross-replica
        raise RuntimeError(f"round jobs ran on {sorted(set(ran_on))}, expected only {job_replica}")
    return {"streams": streams, "names": names, "attach_s": round(t_attached - t_attach0, 3),
            "queued_when_attached": queued, "run_s": round(t_end - t_release, 3),
            "succeeded": sum(metadata(op).state == jobs_pb2.JOB_STATE_SUCCEEDED for op in finals),
            "jobs": len(names), "jobs_run": len(names), "run_cpu_s": run_cpu,
            "watcher_process_cpu_s": watcher_usage.cpu_s, "job_replica": job_replica, "watch_replica": watch_replica,
            "other_processes_cores": round(max(busy1 - busy0 - sum(run_cpu.values()), 0.0) / (t_end - t_release), 2),
            "cpu_pressure_avg10": cpu_pressure(),
            "loop_sched_s": {**{n: [sched1[n][i] - sched0[n][i] for i in (0, 1)] for n in sched0},
                             "bench_client": [watcher_usage.run_s, watcher_usage.wait_s]}}


async def run_latency(args: argparse.Namespace, dep: Deployment, shared_pids: dict[str, int], did_url: str,
                      watcher: str) -> list[dict]:
    assert dep.cluster is not None
    ids = [r.spec.replica_id for r in dep.cluster.replicas]
    job_replica, watch_replicas = ids[0], ids[1:]
    lb = client_for(dep.address, did_url)
    watch_clients = {w: client_for(dep.replica(w).spec.address, did_url) for w in watch_replicas}
    everyone: list[str] = []
    cells = []
    try:
        await lb.emulator("POST", "/_emulator/reset")
        # Every lane of every replica held: WORKERS per replica (each replica claims while it has a free lane).
        everyone = await submit_holders(lb, WORKERS * len(ids))
        holders = [n for n in everyone if (await get_meta(lb, n)).replica == job_replica]
        if len(holders) != WORKERS:
            raise RuntimeError(f"{job_replica} holds {len(holders)} of the holder jobs, expected {WORKERS}")
        for k in args.subscribers:
            rounds: list[dict] = []
            while True:
                w = watch_replicas[len(rounds) % len(watch_replicas)]  # the other replicas in turn
                pids = {"job_replica": dep.replica(job_replica).process.pid,
                        "watch_replica": dep.replica(w).process.pid, **shared_pids}
                r = await latency_round(lb, watch_clients[w], job_replica, w, holders, k, args, watcher, pids)
                rounds.append(r)
                distinct = latency_summary(k, rounds, "each", watcher)["distinct_events"]
                print(f"  cross-replica K={k:<4} round {len(rounds):2} ({job_replica} -> watchers on {w}): attach "
                      f"{r['attach_s']:.2f} s, run {r['run_s']:.2f} s, {distinct} events so far", flush=True)
                # The job replica's lanes are free again: hold them for the next round (only it has free lanes).
                holders = await submit_holders(lb, WORKERS)
                placed = {(await get_meta(lb, n)).replica for n in holders}
                if placed != {job_replica}:
                    raise RuntimeError(f"new holders went to {placed}, expected {job_replica}")
                everyone += holders
                if distinct >= args.events or len(rounds) >= 60:
                    break
            summary = latency_summary(k, rounds, "each", watcher)
            summary["label"] = f"cross-replica: {cell_label(k, 'each', watcher)}"
            summary["watch_replicas"] = sorted({r["watch_replica"] for r in rounds})
            summary["job_replica"] = job_replica
            a = summary["all_receipts"]
            print(f"{summary['label']}: {summary['distinct_events']} events, {summary['receipts']} receipts, p50 "
                  f"{a['p50_ms']} ms, p99 {a['p99_ms']} ms, max {a['max_ms']} ms", flush=True)
            cells.append(summary)
    finally:
        for name in everyone:  # every holder still in D-ID
            op = await lb.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
            if not op.done:
                await lb.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=30)
        await lb.emulator("POST", "/_emulator/reset")
        for c in (lb, *watch_clients.values()):
            await c.close()
    return cells


# ------------------------------------------------------------------------------------------ takeover


async def takeover_trial(args: argparse.Namespace, dep: Deployment, did_url: str) -> dict:
    """One job, killed with its replica while D-ID renders its talk; the first event another replica writes."""
    lb = client_for(dep.address, did_url)
    try:
        await lb.emulator("POST", "/_emulator/faults", {"talk_outcome": "done", "stage_delay_s": args.takeover_did_s})
        talks0 = await talk_posts(lb)
        name = await lb.submit(True)
        deadline = time.monotonic() + 90
        while True:  # in D-ID: its talk exists (id saved with the job), D-ID renders it
            meta = await get_meta(lb, name)
            if meta.stage == jobs_pb2.JOB_STAGE_DID_PROCESSING and meta.replica and await talk_posts(lb) > talks0:
                break
            if time.monotonic() > deadline or meta.state not in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING):
                raise RuntimeError(f"the takeover job did not reach D-ID processing: {meta}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the talk id is saved (save_state right after create_talk)
        victim = meta.replica
        survivor = next(r for r in dep.pids() if r != victim)
        watch = client_for(dep.replica(survivor).spec.address, did_url)
        received: list[tuple[float, jobs_pb2.WatchOperationResponse]] = []
        attached = asyncio.Event()

        async def read() -> None:
            # after_sequence = last - 1: the last event is replayed at once, proof the stream is attached
            request = jobs_pb2.WatchOperationRequest(name=name, after_sequence=max(meta.last_sequence - 1, 0))
            async for msg in watch.jobs[0].WatchOperation(request, timeout=300):
                attached.set()
                if msg.WhichOneof("event") != "heartbeat":
                    received.append((time.time(), msg))

        reader = asyncio.create_task(read())
        try:
            await asyncio.wait_for(attached.wait(), 30)
            process = dep.replica(victim).process
            t_kill = time.time()
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            dep.killed.add(victim)
            killed_at = (await get_meta(watch, name)).last_sequence  # a dead process writes nothing more
            await asyncio.wait_for(reader, 300)  # the stream ends with the job's terminal event
        finally:
            reader.cancel()
        done = await watch.wait(name)
        final = metadata(done)
        after = [(t, m) for t, m in received if m.sequence > killed_at]
        if not after:
            raise RuntimeError("no event after the kill")
        t_recv, first = after[0]
        stored = first.time.seconds + first.time.nanos * 1e-9
        # Every event once, in order, read again from the start on the survivor.
        history = [m async for m in watch.jobs[0].WatchOperation(jobs_pb2.WatchOperationRequest(name=name), timeout=60)
                   if m.WhichOneof("event") != "heartbeat"]
        await watch.close()
        sequences = [m.sequence for m in history]
        return {
            "operation": name, "killed_replica": victim, "watcher_replica": survivor, "taken_over_by": final.replica,
            "state": jobs_pb2.JobState.Name(final.state), "last_sequence_at_kill": killed_at,
            "first_event_after_kill": first.WhichOneof("event"),
            "first_event_stage": (jobs_pb2.JobStage.Name(first.stage_update.stage)
                                  if first.HasField("stage_update") else ""),
            "kill_to_first_event_stored_s": round(stored - t_kill, 3),
            "kill_to_first_event_received_s": round(t_recv - t_kill, 3),
            "kill_to_done_s": round(after[-1][0] - t_kill, 3),
            "did_talks_posted": await talk_posts(lb) - talks0,
            "every_event_once_in_order": sequences == list(range(1, len(sequences) + 1))
                                         and [m.WhichOneof("event") for m in history].count("complete") == 1,
        }
    finally:
        await lb.close()


async def run_takeovers(args: argparse.Namespace, dep: Deployment, did_url: str) -> dict:
    trials = []
    for i in range(args.takeovers):
        t = await takeover_trial(args, dep, did_url)
        t["pass"] = (t["taken_over_by"] != t["killed_replica"] and t["state"] == "JOB_STATE_SUCCEEDED"
                     and t["did_talks_posted"] == 1 and t["every_event_once_in_order"]
                     and t["kill_to_first_event_received_s"] < args.takeover_lease + TAKEOVER_MARGIN_S)
        print(f"takeover {i + 1}: killed {t['killed_replica']}, {t['taken_over_by']} wrote its first event "
              f"{t['kill_to_first_event_stored_s']} s after the kill (received "
              f"{t['kill_to_first_event_received_s']} s),"
              f" {t['did_talks_posted']} D-ID talk(s), {t['state']}", flush=True)
        trials.append(t)
    worst = max(t["kill_to_first_event_received_s"] for t in trials)
    return {"lease_s": args.takeover_lease, "renew_s": round(args.takeover_lease / 3, 3),
            "claim_poll_s": args.takeover_lease / 2, "did_stage_delay_s": args.takeover_did_s,
            "target_s": args.takeover_lease + TAKEOVER_MARGIN_S, "trials": trials, "worst_received_s": worst,
            "pass": all(t["pass"] for t in trials)}


# ------------------------------------------------------------------------------------------ run, report


def choose_watcher(choice: str) -> tuple[str, str]:
    """(watcher, why)"""
    if choice == "python":
        return "python", "asked for (--watcher python)"
    try:
        build_native_watcher()
        return "native", "built"
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        if choice == "native":
            raise
        return "python", f"the native watcher did not build ({exc})"


def create_database(postgres: LocalPostgres, name: str) -> str:
    """A database of its own per deployment, not a schema: LISTEN/NOTIFY channels are per database, so the
    deployments sharing one server would otherwise wake each other's replicas on every event and every job."""
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.url_for(name)


async def run(args: argparse.Namespace, backbone: Backbone, work: Path, watcher: str) -> dict:
    postgres = LocalPostgres(work / "postgres")
    url = await postgres.start()
    deployments = {
        "sqlite": Deployment("sqlite", 1, str(work / "sqlite" / "jobs.sqlite3")),
        "pg1": Deployment("pg1", 1, create_database(postgres, "pg1")),
        "pg3": Deployment("pg3", 3, create_database(postgres, "pg3")),
        "takeover": Deployment("takeover", 3, create_database(postgres, "takeover"),
                               ("--job-lease", str(args.takeover_lease))),
    }
    try:
        # PostgreSQL alone: the WAL it counts is the events' own (idle replicas write heartbeats).
        print("per-event costs on PostgreSQL", flush=True)
        costs = await measure_event_costs(create_database(postgres, "event_costs"), args.cost_events)
        for dep in deployments.values():
            print(f"starting {dep.name} ({dep.replicas} replica{'s' * (dep.replicas > 1)})", flush=True)
            await dep.start(work, backbone.triton_url, backbone.did_url)
        assert postgres.pid is not None
        shared = {"postgres": postgres.pid, **{n: p.pid for n, p in backbone.procs.items()}}
        # What everything costs while nothing is asked of it (health checks, lease polls, membership heartbeats
        # of 8 replicas; other people's load too): the background every measurement shares.
        everything = {**shared, **{f"{d.name}/{r}": pid for d in deployments.values() for r, pid in d.pids().items()}}
        busy0, ours0 = machine_busy_s(), cpu_seconds(everything)
        await asyncio.sleep(5.0)
        busy1, ours1 = machine_busy_s(), cpu_seconds(everything)
        ours = sum(ours1[p] - ours0[p] for p in everything)
        idle = {"machine_cores": round((busy1 - busy0) / 5.0, 3), "benchmark_processes_cores": round(ours / 5.0, 3)}
        print(f"idle: machine {idle['machine_cores']} cores busy, of which the benchmark's processes "
              f"{idle['benchmark_processes_cores']}", flush=True)
        through = await run_throughput(args, deployments, shared, backbone.did_url)
        latency = await run_latency(args, deployments["pg3"], shared, backbone.did_url, watcher)
        takeover = await run_takeovers(args, deployments["takeover"], backbone.did_url)
    finally:
        for dep in deployments.values():
            await dep.stop()
        await postgres.stop()
    return {"costs": costs, "idle": idle, "throughput": through, "latency": latency,
            "takeover": takeover}


def _haproxy_version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else ""


def markdown(rep: dict, watcher_why: str) -> str:
    env, t, c, k = rep["environment"], rep["throughput"], rep["costs"], rep["takeover"]
    ok = {True: "PASS", False: "FAIL"}
    med = t["median_jobs_per_s"]
    names = {"sqlite": "1 replica, SQLite", "pg1": "1 replica, PostgreSQL", "pg3": "3 replicas, PostgreSQL"}
    tp_rows = []
    for v in VARIANTS:
        cells = t["cells"][v]
        replicas = [p for p in cells[0]["cpu_ms_per_job"] if p.startswith("replica-")]
        cpu = lambda cell, ps: round(sum(cell["cpu_ms_per_job"].get(p, 0.0) for p in ps), 1)  # noqa: E731
        tp_rows.append([names[v], " / ".join(str(x["jobs_per_s"]) for x in cells), med[v],
                        round(med[v] / med["sqlite"], 3),
                        f"{sum(x['succeeded'] for x in cells)}/{sum(x['jobs'] for x in cells)}",
                        float(np.median([x["per_job_wall"]["p50_s"] for x in cells])),
                        " / ".join(str(round(float(np.median([cpu(x, ps) for x in cells])), 1)) for ps in
                                   (replicas, ["postgres"], ["tritonserver"], ["did_emulator"]))])
    lat_rows = [[x["label"], x["jobs"], x["distinct_events"], x["receipts"],
                 *(x["all_receipts"][f"p{q}_ms"] for q in (50, 95, 99)), x["all_receipts"]["max_ms"],
                 f"{x['first_receipt_per_event']['p50_ms']} / {x['first_receipt_per_event']['p99_ms']}",
                 ok[x["pass"]]] for x in rep["latency"]]
    type_rows = [[x["subscribers"], e, v["n"], v["p50_ms"], v["p99_ms"], v["max_ms"]]
                 for x in rep["latency"] for e, v in x["by_event_type"].items()]
    to_rows = [[i + 1, x["killed_replica"], x["taken_over_by"],
                f"{x['first_event_after_kill']} {x['first_event_stage']}",
                x["kill_to_first_event_stored_s"], x["kill_to_first_event_received_s"], x["kill_to_done_s"],
                x["did_talks_posted"], str(x["every_event_once_in_order"]).lower(),
                x["state"].removeprefix("JOB_STATE_"),
                ok[x["pass"]]] for i, x in enumerate(k["trials"])]
    cross1 = next((x for x in rep["latency"] if x["subscribers"] == 1), None)
    return "\n".join([
        "# Cluster benchmark", "",
        (f"{env['date']}; commit {env['git_commit']}{' + changes' * env['git_uncommitted_server_changes']}; "
         f"{env['cpu_count']} CPUs (shared; load average {env['load_average_at_start'][0]:.2f} at start, "
         f"{env['load_average_at_end'][0]:.2f} at end); Python {env['python']}, grpcio {env['grpcio']}, SQLite "
         f"{env['sqlite']}, PostgreSQL {c['postgres']}, {env['haproxy']}. One Triton ({env['triton']}) and one D-ID "
         "emulator (stage delay 0, its own process at SCHED_IDLE) shared by every deployment; replicas started by the "
         "cluster launcher (server/cluster, as `make serve-cluster`) with the jobs benchmark's orchestrator flags "
         "(default 4 job workers each, --result-cache-bytes 0, the tests' job settings: D-ID polled every 0.05 s, "
         "log level WARNING); every deployment has its own job store (SQLite WAL synchronous=FULL; PostgreSQL: its "
         "own database, as LISTEN/NOTIFY channels are per database; fsync on, synchronous_commit on) and storage "
         "root, HAProxy in front. All four deployments "
         f"(8 replicas) run for the whole benchmark{' (--quick)' * env['quick']}; with nothing asked of them "
         f"(5 s before the first measurement) the machine was {rep['idle']['machine_cores']} cores busy, "
         f"{rep['idle']['benchmark_processes_cores']} of them the benchmark's processes (health checks, lease "
         "polls, heartbeats of 8 replicas, HAProxy, PostgreSQL, Triton, the emulator)."), "",
        "## Jobs per second (talking videos, skip_matting, through HAProxy)", "",
        (f"{rep['method']['jobs']} jobs per cell submitted at once through the deployment's HAProxy, each awaited with "
         "WaitOperation (bench/jobs_bench.py throughput()); 2 warm-up jobs per replica first; the variants alternate "
         f"over {rep['method']['rounds']} rounds (sqlite, pg1, pg3, then reversed). skip_matting: the matte (Triton "
         "compute on the same 2 cores) would hide the job store's share. CPU: user+system per job of the replicas "
         "(with their job worker processes), PostgreSQL (every backend), tritonserver and the emulator."), "",
        *_table(["variant", "jobs/s per round", "median jobs/s", "vs SQLite", "succeeded", "per-job p50 s",
                 "CPU ms/job replicas / postgres / triton / emulator"], tp_rows),
        "## Event latency, watcher on another replica than the job (3 replicas, PostgreSQL)", "",
        (f"Every lane of the 3 replicas is held by a job whose D-ID talk does not end; per round "
         f"{rep['method']['jobs_per_round']} jobs queue, K WatchOperation streams per job connect directly to a "
         "replica that will not run them (the two others in turn), then the job replica's holders are cancelled "
         "and it runs the jobs 4 at a time (JobMetadata.replica checked after each round). The job replica commits "
         "each event and its NOTIFY in one transaction; the watcher's replica is woken by its LISTEN connection, "
         f"reads the events by sequence and fans them out. Watchers: {rep['method']['watcher']} ({watcher_why}"
         + (f"; {NATIVE_WATCHER}" if rep["method"]["watcher"] == "native" else "; grpc.aio streams in this process")
         + "). latency = receipt time - WatchOperationResponse.time (stamped by the job replica at the append), as in "
         "bench/jobs_bench.py; only events stored after a stream's first message count."), "",
        *_table(["cell", "watched jobs", "distinct events", "receipts", "p50 ms", "p95 ms", "p99 ms", "max ms",
                 "first subscriber p50 / p99 ms", f"p99 < {TARGET_P99_MS:g} ms"], lat_rows),
        "By event type:", "",
        *_table(["subscribers", "event", "receipts", "p50 ms", "p99 ms", "max ms"], type_rows),
        "## Per event on PostgreSQL (bench/event_costs.py, PostgreSQL alone)", "",
        costs_markdown(c).split("\n", 2)[2].strip(), "",
        "## Takeover of a killed replica's job", "",
        (f"A deployment of 3 replicas with --job-lease {k['lease_s']:g} (renewed every {k['renew_s']:g} s; an idle "
         f"lane looks for expired leases every {k['claim_poll_s']:g} s). A job's D-ID talk stays 'created' "
         f"{k['did_stage_delay_s']:g} s, then 'started' as long; once the talk exists (its id saved), the replica "
         "running the job gets SIGKILL. Times from the kill to the first event of the job after it: stored (its "
         "WatchOperationResponse.time) and received by a watcher connected to a surviving replica. The next trial "
         "kills the next job's replica among the survivors."), "",
        *_table(["trial", "killed", "taken over by", "first event after the kill", "stored s", "received s",
                 "kill -> complete s", "D-ID talks", "every event once", "state",
                 f"< lease + {TAKEOVER_MARGIN_S:g} s"], to_rows),
        "## Targets", "",
        *_table(["target", "figure", "verdict"], [
            [f"1 replica on PostgreSQL >= {TARGET_PG1_RATIO}x the jobs/s of SQLite",
             f"{t['ratios']['pg1_vs_sqlite']}x ({med['pg1']} vs {med['sqlite']} jobs/s)", ok[t["pass"]]],
            *([[f"cross-replica 1-subscriber p99 < {TARGET_P99_MS:g} ms", f"{cross1['all_receipts']['p99_ms']} ms",
                ok[cross1["pass"]]]] if cross1 else []),
            [f"takeover within lease + {TAKEOVER_MARGIN_S:g} s ({k['target_s']:g} s)",
             f"worst {k['worst_received_s']} s of {len(k['trials'])}", ok[k["pass"]]],
        ]),
        f"3 replicas vs 1 on PostgreSQL: {t['ratios']['pg3_vs_pg1']}x (all on the same 2 cores and one Triton).",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.triton_url and not (args.repository / "matting" / "config.pbtxt").exists():
        sys.exit(f"no up-to-date model repository at {args.repository}: run "
                 "`.venv/bin/python build_engines.py --target cpu --output .cache/model_repository_cpu`")
    watcher, watcher_why = choose_watcher(args.watcher)
    work = REPO / ".cache" / "bench_cluster"
    load_start = os.getloadavg()
    code = {"git_commit": _git("rev-parse", "--short", "HEAD"),
            "git_uncommitted_server_changes": bool(_git("status", "--porcelain", "--", "server"))}
    backbone = Backbone(args, work)
    # The replicas reach the emulator by their flags (job_args); set here, this also keeps the launcher from
    # starting an emulator of its own (it does when FRAMEWISE_DID_API_KEY is unset).
    try:
        backbone.start()  # removes and recreates `work`
        os.environ.update(FRAMEWISE_DID_API_KEY=DID_API_KEY, FRAMEWISE_DID_URL=backbone.did_url,
                          FRAMEWISE_DID_IS_EMULATOR="1")
        results = asyncio.run(run(args, backbone, work, watcher))
    except KeyboardInterrupt:
        return 130
    finally:
        backbone.stop()
    report = {
        "environment": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
                        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                        "python": platform.python_version(), "platform": platform.platform(),
                        "grpcio": grpc.__version__, "sqlite": sqlite3.sqlite_version, "haproxy": _haproxy_version(),
                        "triton": args.triton_url or "managed, CPU repository", "quick": args.quick, **code,
                        "replica_args": list(replica_args("<emulator>"))},
        "method": {"rounds": args.rounds, "jobs": args.jobs, "jobs_per_round": args.jobs_per_round,
                   "events_min": args.events, "subscribers": args.subscribers, "watcher": watcher,
                   "watcher_choice": watcher_why, "cost_events": args.cost_events,
                   "target_pg1_ratio": TARGET_PG1_RATIO, "target_p99_ms": TARGET_P99_MS,
                   "takeover_margin_s": TAKEOVER_MARGIN_S},
        **results,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cluster.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "cluster.md").write_text(text := markdown(report, watcher_why) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
