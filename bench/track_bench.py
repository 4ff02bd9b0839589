#!/usr/bin/env python3
"""Tracking benchmark: TrackingService/Track on the Crossing sequence, 1, 4 and 8 concurrent sessions.

One tritonserver (CPU repository, S=1024, SAM 2 parts as STAND-IN contract models: their compute means nothing)
and one orchestrator (external Triton, --triton-shm on). Per concurrency C, C Track streams (one object each) stream
the same frames; the first 16 fill the memory bank, unmeasured. Reports frames/s, latency, Triton compute and queue,
the orchestrator's overhead per frame per object, bytes to and from Triton per frame, memory per object.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import timeit
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np
import tritonclient.grpc as triton_sync
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect_bench import GRPC_LIMITS, Stack, _table, cpu_seconds, free_port

from framewise.v1 import common_pb2, tracking_service_pb2_grpc
from framewise.v1 import tracking_service_pb2 as pb
from server.triton.launcher import ManagedTriton, TritonDistribution, TritonPorts, child_environment
from server.vision import rle

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = REPO.parent / "shared" / "assets" / "sequences" / "Crossing"  # 120 JPEGs, 360x240
SAM2 = ("sam2_image_encoder", "sam2_memory_attention", "sam2_mask_decoder", "sam2_memory_encoder")
TRACKING_SERVICE = pb.DESCRIPTOR.services_by_name["TrackingService"].full_name
WARM_FRAMES = 16  # from frame 16 on the bank is full: prompt + 6 memories, prompt + 15 pointers
MAX_MEMORIES, MAX_POINTERS = 7, 16
NUMPY = {"UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32}
TARGET_OVERHEAD_MS, TARGET_MEMORY_MIB, MIB = 5.0, 12.0, 1 << 20
OVERHEAD_FORMULA = (
    "overhead per frame per object = (mean FrameResult.timings.total_ms - Triton compute and queue per frame) / "
    "objects per frame (1); Triton compute and queue per frame = sum over the four sam2_* models of the "
    "get_inference_statistics deltas (compute_input + compute_infer + compute_output, and queue) over the measured "
    "frames / measured frames. It splits into transport = triton_ms (the orchestrator's round trips to Triton) - "
    "Triton compute and queue (gRPC/protobuf on both sides, shm bookkeeping, Triton's frontend), and orchestrator "
    "own = total_ms - triton_ms (decode, resize, numpy copies, selection, RLE, event-loop waits)."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--repository", type=Path, default=REPO / ".cache" / "model_repository_cpu")
    p.add_argument("--frames", type=int, default=60, help=f"frames per session, the first {WARM_FRAMES} unmeasured")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated numbers of concurrent sessions")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {WARM_FRAMES + 4} frames per session")
    p.add_argument("--orchestrator-env", action="append", default=[], metavar="KEY=VALUE", help="orchestrator only")
    a = p.parse_args(argv)
    a.concurrency = sorted({int(c) for c in a.concurrency.split(",")})
    a.frames = max(a.frames, WARM_FRAMES + 4) if not a.quick else WARM_FRAMES + 4  # >= 4 measured frames
    return a


class TrackStack(Stack):
    """detect_bench's Stack, ready when the SAM 2 parts and TrackingService are; shm on, 16 sessions."""

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
        launcher = ManagedTriton(self.repository, self.work_dir / "triton", ports, restart_on_exit=False)
        self.triton_url = launcher.url
        with triton_sync.InferenceServerClient(self.triton_url) as client:
            ready = lambda: client.is_server_ready() and all(client.is_model_ready(m) for m in SAM2)
            env = child_environment(TritonDistribution.from_pytriton())
            self._start("tritonserver", launcher.command(), env, ready, 180)
        self.address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://{metrics}/metrics"
        command = [sys.executable, "-m", "server", "--triton-url", self.triton_url, "--listen", self.address,
                   "--metrics-listen", metrics, "--triton-shm", "on", "--max-tracking-sessions", "16",
                   "--log-level", "WARNING"]
        with grpc.insecure_channel(self.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service=TRACKING_SERVICE)
            ready = lambda: check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
            self._start("orchestrator", command, dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env), ready, 60)


def load_sequence(folder: Path, count: int) -> tuple[list[bytes], tuple[float, float, float, float]]:
    frames = [p.read_bytes() for p in sorted((folder / "img").glob("*.jpg"))]
    x, y, w, h = map(float, re.split(r"[\s,]+", (folder / "groundtruth_rect.txt").read_text().strip())[:4])
    return [frames[i % len(frames)] for i in range(count)], (x, y, x + w, y + h)


def rss_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon):\s+(\d+)", status, re.MULTILINE)}


async def triton_stats(client: triton_aio.InferenceServerClient) -> dict[str, dict[str, int]]:
    stats = [(await client.get_inference_statistics(model)).model_stats[0] for model in SAM2]
    return {st.name: {"requests": s.success.count, "executions": st.execution_count, "queue_ns": s.queue.ns,
                      "compute_ns": s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns}
            for st, s in ((st, st.inference_stats) for st in stats)}


def scrape(url: str) -> dict:
    samples = [s for f in text_string_to_metric_families(httpx.get(url, timeout=10).text) for s in f.samples]
    return {"session_bytes": [s.value for s in samples if s.name == "framewise_tracking_session_bytes"],
            **{f"{s.labels['model']}/{s.labels['path']}": s.value
               for s in samples if s.name == "framewise_triton_transfers_total"}}


async def session(stub, frames: list[bytes], box, barrier: asyncio.Barrier) -> list[dict]:
    """One Track stream. Waits twice at the barrier (shared with the main task, which reads the statistics in
    between) when its bank is full, and twice after its last frame, the bank still held."""
    call, measured = stub.Track(timeout=1800), []
    try:
        await call.write(pb.TrackRequest(open=pb.OpenSession()))
        assert all(m.stand_in for m in (await call.read()).session.models)
        for i, jpeg in enumerate(frames):
            if i == WARM_FRAMES:
                await barrier.wait()
                await barrier.wait()
            frame = pb.TrackFrame(image=common_pb2.Image(encoded=jpeg))
            if i == 0:
                frame.prompts.add(object_id=1, box=common_pb2.BoundingBox(x1=box[0], y1=box[1], x2=box[2], y2=box[3]))
            started = time.perf_counter()
            await call.write(pb.TrackRequest(frame=frame))
            result = (await call.read()).frame
            latency = (time.perf_counter() - started) * 1e3
            if i >= WARM_FRAMES:
                measured.append({"latency": latency, "bytes": result.triton_bytes, "objects": len(result.objects),
                                 **{k: getattr(result.timings, f"{k}_ms") for k in ("total", "triton", "decode")}})
        await barrier.wait()
        await barrier.wait()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        return measured
    except BaseException:
        barrier.abort()
        call.cancel()
        raise


async def cell(stack: TrackStack, triton, stub, frames, box, conc: int) -> dict:
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    rss0 = rss_kib(pids["orchestrator"])
    barrier = asyncio.Barrier(conc + 1)
    tasks = [asyncio.create_task(session(stub, frames, box, barrier)) for _ in range(conc)]
    try:
        await barrier.wait()  # every bank full
        before = (await triton_stats(triton), cpu_seconds(pids), scrape(stack.metrics_url), time.perf_counter())
        await barrier.wait()
        await barrier.wait()  # every session done
        after = (await triton_stats(triton), cpu_seconds(pids), scrape(stack.metrics_url), time.perf_counter(),
                 rss_kib(pids["orchestrator"]))
        await barrier.wait()
    except asyncio.BrokenBarrierError:
        await asyncio.gather(*tasks)  # a session failed: raise its own error
        raise
    samples = [f for s in await asyncio.gather(*tasks) for f in s]
    return summarize(samples, conc, (*before, rss0), after)


def summarize(samples: list[dict], conc: int, before: tuple, after: tuple) -> dict:
    (stats0, cpu0, metrics0, t0, rss0), (stats1, cpu1, metrics1, t1, rss1) = before, after
    n, wall = len(samples), t1 - t0
    objects = sum(f["objects"] for f in samples) / n
    mean = {k: float(np.mean([f[k] for f in samples])) for k in ("total", "triton", "decode")}
    delta = {m: {k: stats1[m][k] - stats0[m][k] for k in stats1[m]} for m in SAM2}
    compute, queue = (sum(d[k] for d in delta.values()) / n / 1e6 for k in ("compute_ns", "queue_ns"))
    transfers = {k: (metrics1.get(k, 0) - metrics0.get(k, 0)) / n for k in metrics1 if "/" in k}
    latency, bank = [f["latency"] for f in samples], metrics1["session_bytes"]
    r = lambda v, digits=2: round(float(v), digits)
    per_model = {m: {"compute_ms": r(d["compute_ns"] / n / 1e6), "queue_ms": r(d["queue_ns"] / n / 1e6),
                     "requests": r(d["requests"] / n), "avg_batch": r(d["requests"] / max(d["executions"], 1)),
                     "via_shm": r(transfers.get(f"{m}/shm", 0)), "via_grpc": r(transfers.get(f"{m}/grpc", 0))}
                 for m, d in delta.items()}
    return {
        "sessions": conc, "frames_measured": n, "wall_s": r(wall, 3), "frames_per_s": r(n / wall),
        "frames_per_s_per_session": r(n / wall / conc), "objects_per_frame": objects,
        "latency_ms": {"p50": r(np.percentile(latency, 50)), "p90": r(np.percentile(latency, 90))},
        "server_ms_mean": {k: r(v) for k, v in mean.items()},
        "triton_compute_ms_per_frame": r(compute), "triton_queue_ms_per_frame": r(queue),
        "overhead_ms_per_frame_per_object": r((mean["total"] - compute - queue) / objects),
        "transport_ms_per_frame": r(mean["triton"] - compute - queue),
        "orchestrator_own_ms_per_frame": r(mean["total"] - mean["triton"]),
        "per_model_per_frame": per_model,
        "triton_bytes_per_frame": {"median": int(np.median([f["bytes"] for f in samples])),
                                   "min": min(f["bytes"] for f in samples), "max": max(f["bytes"] for f in samples)},
        "cpu_ms_per_frame": {k: r((cpu1[k] - cpu0[k]) / n * 1e3, 1) for k in cpu1},
        "session_bytes": bank, "bank_bytes_per_object": r(np.mean(bank) / objects, 0) if bank else None,
        "rss_kib_before": rss0, "rss_kib_after": rss1,
        "rss_growth_mib_per_session": r((rss1["VmRSS"] - rss0["VmRSS"]) / 1024 / conc),
        "rss_anon_growth_mib_per_session": r((rss1["RssAnon"] - rss0["RssAnon"]) / 1024 / conc),
    }


def byte_breakdown(meta: dict, objects: int = 1) -> dict:
    """Bytes per model call of a tracked frame with a full bank, from Triton's metadata: batch 1 (the decoder:
    `objects`), N=7 memories, M=16 pointers, one (padding) prompt point."""
    calls = {"sam2_image_encoder": (1, 1), "sam2_memory_attention": (objects, 1),
             "sam2_mask_decoder": (1, objects), "sam2_memory_encoder": (objects, 1)}  # calls per frame, batch
    out = {}
    for model, (count, batch) in calls.items():
        rows = []
        for kind in ("inputs", "outputs"):
            for t in meta[model][kind]:
                dims = [batch if meta[model]["max_batch_size"] and i == 0 else d for i, d in enumerate(t["shape"])]
                name = t["name"]
                fill = MAX_MEMORIES if name.startswith("memory_") else MAX_POINTERS if name.startswith("obj_ptr") else 1
                dims = [fill if d < 0 else d for d in dims]
                size = int(np.prod(dims)) * np.dtype(NUMPY[t["datatype"]]).itemsize
                rows.append({"tensor": f"{kind[:-1]} {name}", "shape": dims, "dtype": t["datatype"], "bytes": size})
        per_call = sum(x["bytes"] for x in rows)
        out[model] = {"calls_per_frame": count, "tensors": rows, "bytes_per_call": per_call,
                      "bytes_per_frame": count * per_call}
    return out


def host_costs(breakdown: dict, jpeg: bytes, reps: int = 7) -> dict[str, float]:
    """Median ms of the driver's host-side steps of one tracked frame (one object) with `byte_breakdown`'s tensors,
    each timed alone in this process (glibc malloc as in the orchestrator: fresh multi-MB buffers fault pages in)."""
    arrays = {m: {x["tensor"].split()[1] + ("_out" if x["tensor"].startswith("o") else ""):
                  np.ones(x["shape"], NUMPY[x["dtype"]]) for x in d["tensors"]} for m, d in breakdown.items()}
    enc, dec = arrays["sam2_image_encoder"], arrays["sam2_mask_decoder"]
    feats = [enc[f"{k}_out"] for k in ("vision_feat", "high_res_feat0", "high_res_feat1")]
    memory, S = arrays["sam2_memory_encoder"]["maskmem_feat_out"], enc["image"].shape[1]
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    shm_image, shm_feat, resized = np.empty_like(enc["image"]), np.empty_like(feats[0]), enc["image"][0].copy()
    wire = service_pb2.ModelInferResponse(raw_output_contents=[feats[0].tobytes()]).SerializeToString()
    logits = np.where(np.indices(dec["masks_out"].shape[-2:]).sum(0) % 97 < 40, 1.0, -1.0).astype(np.float32)

    def request(model: str) -> bytes:  # what tritonclient's infer does with the inputs before sending
        tensors = []
        for name, a in ((k, a) for k, a in arrays[model].items() if not k.endswith("_out")):
            tensors.append(triton_sync.InferInput(name, list(a.shape), triton_sync.np_to_triton_dtype(a.dtype)))
            tensors[-1].set_data_from_numpy(a)
        return _get_inference_request(model, tensors, "", "", None, 0, False, False, 0, None, None).SerializeToString()

    steps = {
        "resize frame to S x S": lambda: cv2.resize(rgb, (S, S), interpolation=cv2.INTER_LINEAR),
        "encoder: frame into its shm slot": lambda: np.copyto(shm_image, resized[None]),
        "encoder: 3 outputs copied out of shm (np.array, 16 MiB)": lambda: [np.array(f) for f in feats],
        "attention: gRPC request build + serialise (7.5 MiB)": lambda: request("sam2_memory_attention"),
        "attention: gRPC response parse + copy (4 MiB)": lambda: np.array(np.frombuffer(
            service_pb2.ModelInferResponse.FromString(wire).raw_output_contents[0], np.float32)),
        "decoder: concatenate embeds + np.repeat high-res x1": lambda: (
            np.concatenate(feats[:1]), np.repeat(feats[1], 1, axis=0), np.repeat(feats[2], 1, axis=0)),
        "decoder: gRPC request build + serialise (16 MiB)": lambda: request("sam2_mask_decoder"),
        "memory encoder: inputs into shm, output copied out": lambda: (np.copyto(shm_feat, feats[0]), np.array(memory)),
        "mask logits to frame size + COCO RLE": lambda: rle.encode(
            cv2.resize(logits, rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR) > 0),
    }
    return {name: round(float(np.median(timeit.repeat(step, number=1, repeat=reps))) * 1e3, 2)
            for name, step in steps.items()}


async def model_meta(triton: triton_aio.InferenceServerClient, model: str) -> dict:
    md, cfg = await triton.get_model_metadata(model), (await triton.get_model_config(model)).config
    tensors = {k: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in getattr(md, k)]
               for k in ("inputs", "outputs")}
    return {"max_batch_size": cfg.max_batch_size, "instances": sum(g.count for g in cfg.instance_group), **tensors}


async def run(args: argparse.Namespace, stack: TrackStack) -> dict:
    frames, box = load_sequence(SEQUENCE, args.frames)
    triton = triton_aio.InferenceServerClient(stack.triton_url, channel_args=GRPC_LIMITS)
    channel = grpc.aio.insecure_channel(stack.address, options=GRPC_LIMITS)
    try:
        meta = {m: await model_meta(triton, m) for m in SAM2}
        version = (await triton.get_server_metadata()).version
        costs = await asyncio.to_thread(host_costs, byte_breakdown(meta), frames[1])
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        await cell(stack, triton, stub, frames[: WARM_FRAMES + 4], box, 1)  # warm-up: shm registration, first calls
        cells = []
        for conc in args.concurrency:
            cells.append(c := await cell(stack, triton, stub, frames, box, conc))
            print(f"c={conc}: {c['frames_per_s']} frames/s, overhead {c['overhead_ms_per_frame_per_object']} ms")
    finally:
        await channel.close()
        await triton.close()
    breakdown, measured = byte_breakdown(meta), cells[0]["triton_bytes_per_frame"]["median"]
    # The frame (S*S*3 uint8) + what the attention reads: 7 memories [64,S/16,S/16] FP16 + 16 pointers 256 FP32.
    attn = {x["tensor"]: x["bytes"] for x in breakdown["sam2_memory_attention"]["tensors"]}
    reference = {"frame": breakdown["sam2_image_encoder"]["tensors"][0]["bytes"],
                 "memories": attn["input memory_feats"], "pointers": attn["input obj_ptrs"]}
    reference["total"] = sum(reference.values())
    overhead, bank = cells[0]["overhead_ms_per_frame_per_object"], max(c["bank_bytes_per_object"] or 0 for c in cells)
    return {
        "environment": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "triton_version": version,
                        "stand_in_models": True, "image_size": meta["sam2_image_encoder"]["inputs"][0]["shape"][1],
                        "orchestrator_env": stack.extra_env, "instances": {m: meta[m]["instances"] for m in SAM2}},
        "method": {"frames_per_session": args.frames, "unmeasured_bank_fill_frames": WARM_FRAMES,
                   "concurrency": args.concurrency, "overhead_formula": OVERHEAD_FORMULA},
        "cells": cells,
        "bytes": {"measured_median_per_frame_c1": measured, "per_model": breakdown, "reference": reference,
                  "computed_per_frame": sum(b["bytes_per_frame"] for b in breakdown.values()),
                  "ratio_to_reference": round(measured / reference["total"], 2)},
        "host_costs_ms": costs,
        "targets": {
            "overhead": {"max_ms": TARGET_OVERHEAD_MS, "at_c1": overhead, "pass": overhead <= TARGET_OVERHEAD_MS},
            "memory": {"max_mib": TARGET_MEMORY_MIB, "bank_mib_per_object": round(bank / MIB, 2),
                       "pass": 0 < bank <= TARGET_MEMORY_MIB * MIB},
            "bytes": {"reference": reference["total"], "measured": measured, "pass": measured <= reference["total"]}},
        "model_metadata": meta,
    }


def markdown(rep: dict) -> str:
    env, cells, b, t, ref = rep["environment"], rep["cells"], rep["bytes"], rep["targets"], rep["bytes"]["reference"]
    S, ok, mib = env["image_size"], {True: "PASS", False: "FAIL"}, lambda v: f"{v:,} B ({v / MIB:.2f} MiB)"
    totals = [[m, "shm" if cells[0]["per_model_per_frame"][m]["via_shm"] else "gRPC", mib(d["bytes_per_frame"])]
              for m, d in b["per_model"].items()] + [["computed total", "", mib(b["computed_per_frame"])],
              ["measured: FrameResult.triton_bytes, median at c=1", "", mib(b["measured_median_per_frame_c1"])]]
    targets = [[f"overhead <= {TARGET_OVERHEAD_MS:g} ms per frame per object (c=1)", f"{t['overhead']['at_c1']} ms"],
               [f"memory <= {TARGET_MEMORY_MIB:g} MiB per object (bank)", f"{t['memory']['bank_mib_per_object']} MiB"],
               ["bytes per frame <= frame + memories + pointers", f"{t['bytes']['measured']:,} vs {ref['total']:,} B"]]
    targets = [[*x, ok[t[k]["pass"]]] for x, k in zip(targets, t, strict=True)]
    return "\n".join([
        "# Tracking benchmark", "",
        (f"{env['date']}; commit {env['git_commit']}; {env['cpu_count']} CPUs (shared); Triton "
         f"{env['triton_version']}; S={S}; {rep['method']['frames_per_session']} Crossing frames (360x240 JPEG) per "
         f"session, one object each, the first {WARM_FRAMES} unmeasured (bank fill); orchestrator with --triton-shm "
         f"on; extra orchestrator environment: {env['orchestrator_env'] or '-'}."), "",
        ("**The SAM 2 models are STAND-IN contract models** (the real tensor names, shapes and dtypes, no weights): "
         "their compute time means nothing; the orchestrator's costs, the bytes and the memory carry over."), "",
        *_table(["sessions", "frames", "frames/s", "per session", "latency p50 ms", "p90 ms", "server total_ms",
                 "server triton_ms", "Triton compute ms", "Triton queue ms", "overhead ms/frame/object",
                 "= transport", "+ orchestrator own", "CPU ms/frame orch / triton"],
                [[c["sessions"], c["frames_measured"], c["frames_per_s"], c["frames_per_s_per_session"],
                  *c["latency_ms"].values(), c["server_ms_mean"]["total"], c["server_ms_mean"]["triton"],
                  *(c[k] for k in ("triton_compute_ms_per_frame", "triton_queue_ms_per_frame",
                                   "overhead_ms_per_frame_per_object", "transport_ms_per_frame",
                                   "orchestrator_own_ms_per_frame")),
                  "{orchestrator} / {tritonserver}".format(**c["cpu_ms_per_frame"])] for c in cells]),
        "Server times are means per measured frame. " + OVERHEAD_FORMULA, "",
        "Per model, per frame (Triton statistics; shm/gRPC from framewise_triton_transfers_total):", "",
        *_table(["sessions", "model", "compute ms", "queue ms", "requests", "avg batch", "via shm", "via gRPC"],
                [[c["sessions"], m, *d.values()] for c in cells for m, d in c["per_model_per_frame"].items()]),
        f"## Bytes per tracked frame (1 object, full bank: {MAX_MEMORIES} memories, {MAX_POINTERS} pointers)", "",
        *_table(["model", "calls/frame", "tensor", "shape", "dtype", "bytes"],
                [[m, d["calls_per_frame"], x["tensor"], x["shape"], x["dtype"], f"{x['bytes']:,}"]
                 for m, d in b["per_model"].items() for x in d["tensors"]]),
        *_table(["model", "via", "bytes per frame"], totals),
        (f"Reference, what the step really needs: the frame {S}x{S}x3 uint8 = {ref['frame']:,} B + {MAX_MEMORIES} "
         f"memories FP16 [64,{S // 16},{S // 16}] = {ref['memories']:,} B + {MAX_POINTERS} pointers FP32 [256] = "
         f"{ref['pointers']:,} B; total **{mib(ref['total'])}**. Measured / reference = "
         f"**{b['ratio_to_reference']}x**."), "",
        "## Host-side steps of one tracked frame, each timed alone in the bench process (median ms)", "",
        *_table(["step", "ms"], [[k, v] for k, v in rep["host_costs_ms"].items()]),
        "## Memory per tracked object", "",
        *_table(["sessions", "framewise_tracking_session_bytes per object (MiB)",
                 "orchestrator VmRSS growth per session (MiB)", "RssAnon growth per session (MiB)"],
                [[c["sessions"], round((c["bank_bytes_per_object"] or 0) / MIB, 3), c["rss_growth_mib_per_session"],
                  c["rss_anon_growth_mib_per_session"]] for c in cells]),
        ("Bank bytes: the metrics endpoint after the last frame, every session still open. RSS growth: orchestrator "
         "VmRSS then minus before the cell's sessions opened, / sessions; it also counts transient frame buffers and "
         "allocator retention, and later cells reuse memory freed by earlier ones."), "",
        "## Targets", "", *_table(["target", "figure", "verdict"], targets),
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build = [sys.executable, "build_engines.py", "--target", "cpu", "--output", str(args.repository)]
    subprocess.run(build, cwd=REPO, check=True)  # S=1024; a no-op when up to date
    env = dict(kv.split("=", 1) for kv in args.orchestrator_env)  # diagnostics, e.g. MALLOC_* tunables
    stack = TrackStack(args.repository, REPO / ".cache" / "bench_track", env)
    try:
        stack.start()
        report = asyncio.run(run(args, stack))
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
        report["environment"]["git_commit"] = commit
    except KeyboardInterrupt:
        return 130
    finally:
        stack.stop()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "track.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "track.md").write_text(text := markdown(report))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
