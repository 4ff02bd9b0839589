#!/usr/bin/env python3
"""Background-removal benchmark: RemoveBackground on the real matting model, and talking videos with it.

Starts one tritonserver (CPU model repository: U^2-Netp behind the `matting` model) and one orchestrator,
and measures, in one run (bench/README.md explains the results):

  remove_background   VisionService/RemoveBackground (RGBA cut-out) of one photo, result cache missed on
                      purpose (every request's bytes differ by a trailing JPEG comment, the pixels do not),
                      at concurrency 1 and 4, the two cells alternating their order every round; beside each
                      cell, Triton's own compute time per matte from its statistics
  cache_hit           the same request repeated: served from the result cache
  talking_video       talking-video jobs/s through the D-ID emulator, with matting and with skip_matting
                      (jobs_bench's stack and measurement), against the stand-in figures kept in
                      bench/results/jobs.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from server.processes import no_grpc_fork_handlers  # no gRPC in it

no_grpc_fork_handlers()  # before gRPC loads: the stacks start their servers with a preexec_fn

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect_bench import MODEL as DETECT_MODEL  # noqa: E402
from detect_bench import GRPC_LIMITS, Stack, _table, code_under_test, cpu_seconds, write_report  # noqa: E402
from jobs_bench import Client, JobStack, job_state, throughput  # noqa: E402

from framewise.v1 import common_pb2, jobs_service_pb2 as jobs_pb2, vision_service_pb2, vision_service_pb2_grpc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "matting"
IMAGE = REPO.parent / "shared" / "assets" / "images" / "girl-1.jpg"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--repository", type=Path, default=REPO / ".cache" / "model_repository_cpu")
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency cell per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; cell order reversed every other round")
    p.add_argument("--hits", type=int, default=100, help="cache-hit requests")
    p.add_argument("--jobs", type=int, default=8, help="talking-video jobs per variant (0: skip that part)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 requests per cell, 1 round, 10 hits, at most 2 jobs")
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.rounds, a.hits, a.jobs = 4, 1, 10, min(a.jobs, 2)  # --jobs 0 still skips the jobs
    return a


def matting_stack(repository: Path, work_dir: Path) -> Stack:
    """detect_bench's Stack, ready when Triton has the matting model and the detector ready and VisionService
    serves; the result cache on (the server's default size: the cache-hit cell needs it), the job store and
    storage in `work_dir`."""
    return Stack(repository, work_dir, {}, models=(MODEL, DETECT_MODEL),
                 orchestrator_args=("--storage-root", str(work_dir / "storage"),
                                    "--job-store", str(work_dir / "jobs.sqlite3")))


async def matting_counters(client: triton_aio.InferenceServerClient) -> dict[str, int]:
    stats = (await client.get_inference_statistics(MODEL)).model_stats[0]
    s = stats.inference_stats
    return {"inferences": stats.inference_count, "executions": stats.execution_count,
            "compute_ns": s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns,
            "compute_count": s.compute_infer.count, "queue_ns": s.queue.ns}


def pct(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.array(values)
    return {"n": len(values), "p50_ms": round(float(np.percentile(v, 50)), 2),
            "p90_ms": round(float(np.percentile(v, 90)), 2), "p99_ms": round(float(np.percentile(v, 99)), 2)}


async def cell(stub, triton, pids: dict[str, int], jpeg: bytes, concurrency: int, requests: int,
               counter: list[int], vary: bool) -> dict:
    """`requests` RemoveBackground calls by `concurrency` closed-loop workers. `vary`: every request's bytes get
    distinct bytes appended after the JPEG end-of-image marker (decoders ignore them), so the content hash differs."""
    latencies, server_ms, errors, sizes = [], [], [], set()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            counter[0] += 1
            data = jpeg + f"framewise-bench-{counter[0]}".encode() if vary else jpeg
            request = vision_service_pb2.RemoveBackgroundRequest(image=common_pb2.Image(encoded=data))
            started = time.perf_counter()
            try:
                response = await stub.RemoveBackground(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}"[:300])
                continue
            latencies.append((time.perf_counter() - started) * 1e3)
            server_ms.append(response.timings.total_ms)
            sizes.add((response.width, response.height, response.model.name, response.model.network,
                       response.model.stand_in))

    before, cpu0, t0 = await matting_counters(triton), cpu_seconds(pids), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, after, cpu1 = time.perf_counter() - t0, await matting_counters(triton), cpu_seconds(pids)
    delta = {k: after[k] - before[k] for k in after}
    return {"concurrency": concurrency, "latencies_ms": latencies, "server_total_ms": server_ms, "errors": errors,
            "wall_s": wall, "triton": delta, "responses": sorted(map(list, sizes)),
            "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu1}}


def summarize(cells: list[dict]) -> dict:
    lat = [x for c in cells for x in c["latencies_ms"]]
    wall = sum(c["wall_s"] for c in cells)
    tri = {k: sum(c["triton"][k] for c in cells) for k in cells[0]["triton"]}
    cpu = {k: sum(c["cpu_s"][k] for c in cells) for k in cells[0]["cpu_s"]}
    return {
        **pct(lat), "throughput_rps": round(len(lat) / wall, 3) if wall else None,
        "errors": sum(len(c["errors"]) for c in cells),
        "first_error": next((c["errors"][0] for c in cells if c["errors"]), None),
        "server_total_p50_ms": round(float(np.median([x for c in cells for x in c["server_total_ms"]])), 2) if lat else None,
        "triton_mattes": tri["inferences"],
        "triton_compute_ms_per_matte": round(tri["compute_ns"] / tri["compute_count"] / 1e6, 2) if tri["compute_count"] else None,
        "triton_queue_ms_per_matte": round(tri["queue_ns"] / tri["compute_count"] / 1e6, 2) if tri["compute_count"] else None,
        "cpu_ms_per_request": {k: round(v / max(len(lat), 1) * 1e3, 1) for k, v in cpu.items()},
        "per_round_p50_ms": [pct(c["latencies_ms"]).get("p50_ms") for c in cells],
        "responses": cells[0]["responses"],
    }


async def remove_background(args: argparse.Namespace, stack: Stack) -> dict:
    jpeg = args.image.read_bytes()
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    triton = triton_aio.InferenceServerClient(stack.triton_url, channel_args=GRPC_LIMITS)
    channel = grpc.aio.insecure_channel(stack.address, options=GRPC_LIMITS)
    stub = vision_service_pb2_grpc.VisionServiceStub(channel)
    counter = [0]
    try:
        await cell(stub, triton, pids, jpeg, 2, 4, counter, vary=True)  # warm-up: both instances, shm regions
        rounds: dict[int, list[dict]] = {1: [], 4: []}
        for r in range(args.rounds):
            for c in ((1, 4) if r % 2 == 0 else (4, 1)):
                rounds[c].append(await cell(stub, triton, pids, jpeg, c, args.requests, counter, vary=True))
                print(f"round {r + 1} c={c}: p50 {pct(rounds[c][-1]['latencies_ms']).get('p50_ms')} ms", flush=True)
        await cell(stub, triton, pids, jpeg, 1, 1, counter, vary=False)  # fills the cache for the hit cell
        hits = await cell(stub, triton, pids, jpeg, 1, args.hits, counter, vary=False)
    finally:
        await channel.close()
        await triton.close()
    result = {f"c{c}": summarize(cells) for c, cells in rounds.items()}
    result["cache_hit"] = summarize([hits])
    return result


async def talking_video(args: argparse.Namespace, stack: JobStack) -> dict:
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    client = Client(stack, 1)
    try:
        for skip in (True, False):  # warm-up, unmeasured
            op = await client.wait(await client.submit(skip))
            if job_state(op) != jobs_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"warm-up job failed: {op}")
        # Alternating: without, with, with, without matting.
        cells = [await throughput(client, pids, args.jobs, skip) for skip in (True, False, False, True)]
    finally:
        await client.close()
    out = {}
    for skip in (False, True):
        mine = [c for c in cells if c["skip_matting"] == skip]
        out["skip_matting" if skip else "with_matting"] = {
            "jobs_per_s": [c["jobs_per_s"] for c in mine],
            "jobs_per_s_median": round(float(np.median([c["jobs_per_s"] for c in mine])), 3),
            "per_job_p50_s": [c["per_job_wall"]["p50_s"] for c in mine],
            "succeeded": sum(c["succeeded"] for c in mine), "jobs": sum(c["jobs"] for c in mine),
        }
    return out


def stand_in_reference() -> dict | None:
    """The talking-video figures of the last jobs bench run kept in bench/results (stand-in matting then)."""
    try:
        report = json.loads((REPO / "bench" / "results" / "jobs.json").read_text())
    except (OSError, ValueError):
        return None
    through = report.get("results", report).get("throughput") or []
    return {("skip_matting" if t["skip_matting"] else "with_matting"): t["jobs_per_s"] for t in through} or None


def markdown(rep: dict) -> str:
    rb = rep["remove_background"]
    lines = [f"# Background removal benchmark ({rep['started_at']}, {rep['code']['git_commit']})", "",
             f"Model: {rb['c1']['responses']}; image {rep['image']}; host {rep['host']}.", "",
             "## RemoveBackground (RGBA cut-out, result cache missed on purpose)", ""]
    rows = [[name, s["n"], s["p50_ms"], s["p90_ms"], s["throughput_rps"], s["triton_compute_ms_per_matte"],
             s["triton_queue_ms_per_matte"], s["server_total_p50_ms"], s["errors"], s["per_round_p50_ms"]]
            for name, s in (("c=1", rb["c1"]), ("c=4", rb["c4"]), ("cache hit, c=1", rb["cache_hit"]))]
    lines += _table(["cell", "requests", "p50 ms", "p90 ms", "req/s", "Triton compute ms/matte",
                     "Triton queue ms/matte", "server total p50 ms", "errors", "p50 per round"], rows)
    if "talking_video" in rep:
        tv, ref = rep["talking_video"], rep.get("stand_in_reference") or {}
        lines += ["", "## Talking-video jobs/s (D-ID emulator, no delay)", ""]
        lines += _table(["variant", "jobs/s per cell", "median", "p50 per job s", "succeeded",
                         "stand-in run (bench/results/jobs.json)"],
                        [[k, v["jobs_per_s"], v["jobs_per_s_median"], v["per_job_p50_s"], f"{v['succeeded']}/{v['jobs']}",
                          ref.get(k)] for k, v in tv.items()])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.repository / MODEL / "config.pbtxt").exists():
        sys.exit(f"no `{MODEL}` model in {args.repository}: run `python build_engines.py --target cpu`")
    report: dict = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "code": code_under_test(),
        "host": f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "image": args.image.name, "args": {k: str(v) for k, v in vars(args).items()},
        "stand_in_reference": stand_in_reference(),
    }
    with matting_stack(args.repository, REPO / ".cache" / "bench-matting") as stack:
        report["remove_background"] = asyncio.run(remove_background(args, stack))
    if args.jobs:
        jobs = JobStack(SimpleNamespace(repository=args.repository, orchestrator_env=[], triton_url="",
                                        emulator_priority="idle", did_poll_interval=0.0),
                        REPO / ".cache" / "bench-matting-jobs")
        with jobs:
            report["talking_video"] = asyncio.run(talking_video(args, jobs))
    write_report(args.output, "matting", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
