#!/usr/bin/env python3
"""Tracking benchmark: TrackingService/Track on the Crossing sequence, 1, 4 and 8 concurrent sessions.

One tritonserver (CPU repository, S=1024, SAM 2 parts as STAND-IN contract models: their compute means nothing)
and one orchestrator (external Triton, --triton-shm on). Per concurrency C, C Track streams (one object each) stream
the same frames; the first 16 fill the memory bank, unmeasured. A tracked frame with one object is two Triton calls:
the ensemble sam2_frame_step (encoder -> memory attention -> mask decoder inside Triton) and sam2_memory_encoder.
One more cell (--objects K, concurrency 1) tracks K objects in one session: the encoder once, then per object
sam2_track_step (attention -> decoder) and the memory encoder, the objects concurrently. Reports frames/s, latency,
Triton compute and queue, the orchestrator's overhead per frame per object, bytes to and from Triton per frame
(decomposed tensor by tensor), the host-side steps of a frame, memory per object.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import time
import timeit
from multiprocessing import shared_memory
from pathlib import Path

from server.processes import no_grpc_fork_handlers  # no gRPC in it

no_grpc_fork_handlers()  # before gRPC loads: the Stack starts its servers with a preexec_fn

import cv2
import grpc
import httpx
import numpy as np
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect_bench import GRPC_LIMITS, Stack, _table, cpu_seconds, write_report

from framewise.v1 import common_pb2, tracking_service_pb2_grpc
from framewise.v1 import tracking_service_pb2 as pb
from server.sam2.frame_calls import ResizedFrame
from server.sam2.masks import mask_at_resolution
from server.sam2.prompts import prompt_tensors
from server.sam2.samurai import CandidateSelector, MemoryBank, SamuraiConfig, box_from_mask_upsampled
from server.vision.image_decode import decode_image

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = REPO.parent / "shared" / "assets" / "sequences" / "Crossing"  # 120 JPEGs, 360x240
# The parts: every execution is counted once in their statistics, whether the orchestrator called them or an
# ensemble did. The ensembles' own statistics aggregate their steps' (Triton's ensemble scheduler gives each
# composing request the ensemble's statistics as a secondary aggregator): summed with the parts, they would
# count the same compute twice, so they are recorded, compared, and left out of the sum.
PARTS = ("sam2_image_encoder", "sam2_memory_attention", "sam2_mask_decoder", "sam2_memory_encoder")
ENSEMBLES = {"sam2_frame_step": PARTS[:3], "sam2_track_step": PARTS[1:3]}  # ensemble -> its steps
MODELS = (*PARTS, *ENSEMBLES)
TRACKING_SERVICE = pb.DESCRIPTOR.services_by_name["TrackingService"].full_name
WARM_FRAMES = 16  # from frame 16 on the bank is full: prompt + 6 memories, prompt + 15 pointers
MAX_MEMORIES, MAX_POINTERS = 7, 16
NUMPY = {"UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32}
TARGET_OVERHEAD_MS, TARGET_MEMORY_MIB, MIB = 5.0, 12.0, 1 << 20
# The objects of the several-objects cell: the Crossing first ground-truth box moved / scaled (dx, dy, scale
# about its centre), all inside the 360x240 frame.
OBJECT_LAYOUT = ((0, 0, 1.0), (-120, 0, 1.0), (80, -90, 1.5), (-150, -80, 0.75))
OVERHEAD_FORMULA = (
    "overhead per frame per object = (mean FrameResult.timings.total_ms - Triton compute and queue per frame) / "
    "objects per frame; Triton compute and queue per frame = sum over the four parts (sam2_image_encoder, "
    "sam2_memory_attention, sam2_mask_decoder, sam2_memory_encoder) of the get_inference_statistics deltas "
    "(compute_input + compute_infer + compute_output, and queue) over the measured frames / measured frames. The "
    "parts' statistics count every execution, also those run as a step of an ensemble; the ensembles "
    "(sam2_frame_step, sam2_track_step) report their steps' compute again in their own statistics (equal to the sum "
    "of their steps', see the ensemble table) and are left out, or the same compute would count twice. The "
    "overhead splits into transport = triton_ms (the orchestrator's round trips to Triton) - Triton "
    "compute and queue (gRPC/protobuf on both sides, shm bookkeeping, Triton's frontend, and the ensemble "
    "scheduler's own work: handing tensors from step to step is in no part's compute), and orchestrator own = "
    "total_ms - triton_ms (decode, resize, copies into and out of shm, selection, RLE, event-loop waits)."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--repository", type=Path, default=REPO / ".cache" / "model_repository_cpu")
    p.add_argument("--frames", type=int, default=60, help=f"frames per session, the first {WARM_FRAMES} unmeasured")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated numbers of concurrent sessions")
    p.add_argument("--objects", type=int, default=4,
                   help=f"objects of the extra several-objects cell (1 session; 2..{len(OBJECT_LAYOUT)}, 0: no cell)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {WARM_FRAMES + 4} frames per session")
    p.add_argument("--orchestrator-env", action="append", default=[], metavar="KEY=VALUE", help="orchestrator only")
    a = p.parse_args(argv)
    a.concurrency = sorted({int(c) for c in a.concurrency.split(",")})
    a.frames = max(a.frames, WARM_FRAMES + 4) if not a.quick else WARM_FRAMES + 4  # >= 4 measured frames
    if a.objects == 1 or a.objects > len(OBJECT_LAYOUT) or a.objects < 0:
        p.error(f"--objects must be 0 or 2..{len(OBJECT_LAYOUT)}")
    return a


def track_stack(repository: Path, work_dir: Path, extra_env: dict[str, str]) -> Stack:
    """detect_bench's Stack, ready when the SAM 2 parts, their ensembles and TrackingService are; shm on."""
    return Stack(repository, work_dir, extra_env, models=MODELS, service=TRACKING_SERVICE,
                 orchestrator_args=("--max-tracking-sessions", "16"))


Box = tuple[float, float, float, float]


def load_sequence(folder: Path, count: int) -> tuple[list[bytes], Box]:
    frames = [p.read_bytes() for p in sorted((folder / "img").glob("*.jpg"))]
    x, y, w, h = map(float, re.split(r"[\s,]+", (folder / "groundtruth_rect.txt").read_text().strip())[:4])
    return [frames[i % len(frames)] for i in range(count)], (x, y, x + w, y + h)


def object_boxes(box: Box, count: int, width: int, height: int) -> list[Box]:
    """`count` distinct boxes from the ground-truth one (OBJECT_LAYOUT), each checked inside the frame."""
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    boxes = []
    for dx, dy, scale in OBJECT_LAYOUT[:count]:
        b = (cx + dx - w * scale / 2, cy + dy - h * scale / 2, cx + dx + w * scale / 2, cy + dy + h * scale / 2)
        assert 0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height, b
        boxes.append(tuple(round(v, 2) for v in b))
    return boxes


def rss_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon):\s+(\d+)", status, re.MULTILINE)}


async def triton_stats(client: triton_aio.InferenceServerClient) -> dict[str, dict[str, int]]:
    stats = [(await client.get_inference_statistics(model)).model_stats[0] for model in MODELS]
    return {st.name: {"requests": s.success.count, "executions": st.execution_count, "queue_ns": s.queue.ns,
                      "compute_ns": s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns,
                      "success_ns": s.success.ns}
            for st, s in ((st, st.inference_stats) for st in stats)}


def scrape(url: str) -> dict:
    samples = [s for f in text_string_to_metric_families(httpx.get(url, timeout=10).text) for s in f.samples]
    # The orchestrator publishes the banks' total (no per-session series): the mean per session.
    total = [s.value for s in samples if s.name == "framewise_tracking_session_bytes"]
    held = [s.value for s in samples if s.name == "framewise_tracking_sessions"]
    return {"session_bytes": [total[0] / held[0]] if total and held and held[0] else [],
            **{f"{s.labels['model']}/{s.labels['path']}": s.value
               for s in samples if s.name == "framewise_triton_transfers_total"}}


async def session(stub, frames: list[bytes], boxes: list[Box], barrier: asyncio.Barrier) -> list[dict]:
    """One Track stream, one object per box, all prompted on frame 0. Waits twice at the barrier (shared with
    the main task, which reads the statistics in between) when its bank is full, and twice after its last
    frame, the bank still held."""
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
                for object_id, box in enumerate(boxes, 1):
                    frame.prompts.add(object_id=object_id, box=common_pb2.BoundingBox(x1=box[0], y1=box[1],
                                                                                     x2=box[2], y2=box[3]))
            started = time.perf_counter()
            await call.write(pb.TrackRequest(frame=frame))
            result = (await call.read()).frame
            latency = (time.perf_counter() - started) * 1e3
            if i >= WARM_FRAMES:
                measured.append({"latency": latency, "bytes": result.triton_bytes, "objects": len(result.objects),
                                 "present": sum(o.present for o in result.objects),
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


async def cell(stack: Stack, triton, stub, frames, boxes: list[Box], conc: int) -> dict:
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    rss0 = rss_kib(pids["orchestrator"])
    barrier = asyncio.Barrier(conc + 1)
    tasks = [asyncio.create_task(session(stub, frames, boxes, barrier)) for _ in range(conc)]
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
    delta = {m: {k: stats1[m][k] - stats0[m][k] for k in stats1[m]} for m in MODELS}
    compute, queue = (sum(delta[m][k] for m in PARTS) / n / 1e6 for k in ("compute_ns", "queue_ns"))
    transfers = {k: (metrics1.get(k, 0) - metrics0.get(k, 0)) / n for k in metrics1 if "/" in k}
    latency, bank = [f["latency"] for f in samples], metrics1["session_bytes"]
    r = lambda v, digits=2: round(float(v), digits)
    per_model = {m: {"compute_ms": r(d["compute_ns"] / n / 1e6), "queue_ms": r(d["queue_ns"] / n / 1e6),
                     "requests": r(d["requests"] / n), "avg_batch": r(d["requests"] / max(d["executions"], 1)),
                     "via_shm": r(transfers.get(f"{m}/shm", 0)), "via_grpc": r(transfers.get(f"{m}/grpc", 0)),
                     "summed": m in PARTS}
                 for m, d in delta.items()}
    # Each ensemble against its steps. Triton aggregates the steps' compute into the ensemble's (so summing both
    # would count it twice), not their queue; its request time in Triton minus its steps' compute and queue is
    # what the ensemble scheduler adds, as far as the statistics resolve it.
    ensembles = {}
    for name, steps in ENSEMBLES.items():
        d = delta[name]
        if d["requests"]:
            steps_sum = lambda k, steps=steps: sum(delta[s][k] for s in steps) / n / 1e6
            ensembles[name] = {"compute_ms": r(d["compute_ns"] / n / 1e6),
                               "steps_compute_ms": r(steps_sum("compute_ns")),
                               "queue_ms": r(d["queue_ns"] / n / 1e6), "steps_queue_ms": r(steps_sum("queue_ns")),
                               "request_ms_in_triton": r(d["success_ns"] / n / 1e6),
                               "scheduler_ms": r(d["success_ns"] / n / 1e6 - steps_sum("compute_ns")
                                                 - steps_sum("queue_ns"))}
    return {
        "sessions": conc, "frames_measured": n, "wall_s": r(wall, 3), "frames_per_s": r(n / wall),
        "frames_per_s_per_session": r(n / wall / conc), "objects_per_frame": objects,
        "present_per_frame": r(sum(f["present"] for f in samples) / n),
        "latency_ms": {"p50": r(np.percentile(latency, 50)), "p90": r(np.percentile(latency, 90))},
        "server_ms_mean": {k: r(v) for k, v in mean.items()},
        "triton_compute_ms_per_frame": r(compute), "triton_queue_ms_per_frame": r(queue),
        "overhead_ms_per_frame_per_object": r((mean["total"] - compute - queue) / objects),
        "overhead_ms_per_frame": r(mean["total"] - compute - queue),
        "transport_ms_per_frame": r(mean["triton"] - compute - queue),
        "orchestrator_own_ms_per_frame": r(mean["total"] - mean["triton"]),
        "per_model_per_frame": per_model, "ensembles": ensembles,
        "triton_bytes_per_frame": {"median": int(np.median([f["bytes"] for f in samples])),
                                   "min": min(f["bytes"] for f in samples), "max": max(f["bytes"] for f in samples)},
        "cpu_ms_per_frame": {k: r((cpu1[k] - cpu0[k]) / n * 1e3, 1) for k in cpu1},
        "session_bytes": bank, "bank_bytes_per_object": r(np.mean(bank) / objects, 0) if bank else None,
        "rss_kib_before": rss0, "rss_kib_after": rss1,
        "rss_growth_mib_per_session": r((rss1["VmRSS"] - rss0["VmRSS"]) / 1024 / conc),
        "rss_anon_growth_mib_per_session": r((rss1["RssAnon"] - rss0["RssAnon"]) / 1024 / conc),
    }


WRITTEN, NEW_ROWS, READ, REF, INSIDE = "written", "written: new rows only", "read", "by reference", "inside Triton"
ROUTES = {WRITTEN: "the orchestrator copies it into the call's shm slot", NEW_ROWS: "stacked memories: the object's "
          "slot still holds last frame's, each at its row (memory attention does not depend on their order), so "
          "only the one new memory is copied", READ: "the orchestrator reads it back "
          "from the slot", REF: "stays in shared memory, handed to the next call by offset: never read or written "
          "by the orchestrator", INSIDE: "an ensemble's intermediate: Triton hands it from step to step, it never "
          "reaches shared memory or a message"}
NOTES = {"image": "the frame, resized to S x S straight into the slot", "memory_feats": "prompt memory + 6 recent memories (the bank)",
         "memory_tpos": "the memories' temporal-encoding rows", "memory_obj_ptrs": "prompt + 15 object pointers",
         "obj_ptr_tdiff": "the pointers' frame distances", "point_coords": "one padding prompt point",
         "point_labels": "its label (-1, padding)",
         "masks": "the 4 candidates' low-res logits: SAMURAI measures the boxes of candidates 1-3, the chosen one "
                  "is copied out; counted whole once read (candidate 0, the single-mask output, is not touched)",
         "iou_scores": "predicted IoUs (selection)", "obj_ptrs": "candidate pointers (the chosen one is copied "
         "into the bank)", "object_score_logits": "object score (selection, memory encoder)",
         "maskmem_feat": "the new memory, copied into the bank"}


def frame_calls(objects: int) -> list[dict]:
    """The Triton calls of one tracked frame (full bank, no prompt) as VideoPredictor._track makes them. Inputs
    not listed under refs are written into the call's shm slot, outputs not listed are read back."""
    memory_encoder = {"model": "sam2_memory_encoder", "count": objects, "refs": {
        ("input", "vision_feat"): "the frame's vision_feat (output above)",
        ("input", "mask_logits"): "the chosen candidate: a block of masks [1, 1, S/4, S/4] (output above)"}}
    if objects == 1:
        return [{"model": "sam2_frame_step", "count": 1,
                 "refs": {("output", "vision_feat"): "-> sam2_memory_encoder"},
                 "inside": [("sam2_image_encoder", "high_res_feat0"), ("sam2_image_encoder", "high_res_feat1"),
                            ("sam2_memory_attention", "conditioned_feat")]},
                memory_encoder]
    features = ("vision_feat", "high_res_feat0", "high_res_feat1")
    return [{"model": "sam2_image_encoder", "count": 1,
             "refs": {("output", f): f"-> sam2_track_step x{objects}" + (" and sam2_memory_encoder"
                                                                          if f == "vision_feat" else "")
                      for f in features}},
            {"model": "sam2_track_step", "count": objects,
             "refs": {("input", f): "the encoder's output" for f in features},
             "inside": [("sam2_memory_attention", "conditioned_feat")]},
            memory_encoder]


def tensor_bytes(meta: dict, model: str, kind: str) -> dict[str, dict]:
    """Shapes and bytes of a model's tensors for one call: batch 1, N=7 memories, M=16 pointers, 1 prompt point."""
    fill = {"memory_feats": MAX_MEMORIES, "memory_tpos": MAX_MEMORIES, "memory_obj_ptrs": MAX_POINTERS,
            "obj_ptr_tdiff": MAX_POINTERS, "obj_ptrs": MAX_POINTERS if kind == "inputs" else None}
    out = {}
    for t in meta[model][kind]:
        dims = [1 if meta[model]["max_batch_size"] and i == 0 else d for i, d in enumerate(t["shape"])]
        dims = [(fill.get(t["name"]) or 1) if d < 0 else d for d in dims]
        size = int(np.prod(dims)) * np.dtype(NUMPY[t["datatype"]]).itemsize
        out[t["name"]] = {"shape": dims, "dtype": t["datatype"], "bytes": size}
    return out


def byte_breakdown(meta: dict, objects: int = 1) -> dict:
    """Every tensor of every call of a tracked frame with a full bank, how it travels with shared memory on
    (what Held.bytes_moved counts: inputs written + outputs read, references excluded) and what a gRPC-only
    deployment would move (every input and output of every call in the messages; the ensembles' intermediates
    stay inside Triton either way)."""
    rows, calls = [], []
    for call in frame_calls(objects):
        model, count, refs = call["model"], call["count"], call["refs"]
        moved = grpc_only = 0
        for kind in ("inputs", "outputs"):
            for name, t in tensor_bytes(meta, model, kind).items():
                key = (kind[:-1], name)
                route = REF if key in refs else READ if kind == "outputs" else NEW_ROWS if name == "memory_feats" \
                    else WRITTEN
                counted = t["bytes"] // MAX_MEMORIES if route == NEW_ROWS else t["bytes"] * (route != REF)
                note = refs.get(key) or NOTES.get(name, "")
                if model == "sam2_memory_encoder" and name == "object_score_logits":
                    note = "object score of the chosen candidate"
                rows.append({"call": model, "calls_per_frame": count, "tensor": f"{kind[:-1]} {name}", **t,
                             "route": route, "note": note, "moved_per_frame": count * counted,
                             "grpc_only_per_frame": count * t["bytes"]})
                moved += counted
                grpc_only += t["bytes"]
        for part, name in call.get("inside", []):
            t = tensor_bytes(meta, part, "outputs")[name]
            rows.append({"call": model, "calls_per_frame": count, "tensor": f"step {part} -> {name}", **t,
                         "route": INSIDE, "note": "", "moved_per_frame": 0, "grpc_only_per_frame": 0})
        calls.append({"model": model, "calls_per_frame": count, "moved_per_call": moved,
                      "grpc_only_per_call": grpc_only})
    total = lambda route, key="grpc_only_per_frame": sum(x[key] for x in rows if x["route"] == route)
    return {"objects": objects, "tensors": rows, "calls": calls,
            "written_per_frame": total(WRITTEN, "moved_per_frame") + total(NEW_ROWS, "moved_per_frame"),
            "read_per_frame": total(READ),
            "moved_per_frame": total(WRITTEN, "moved_per_frame") + total(NEW_ROWS, "moved_per_frame") + total(READ), "by_reference_per_frame": total(REF),
            "inside_triton_per_frame": sum(x["bytes"] * x["calls_per_frame"] for x in rows if x["route"] == INSIDE),
            "grpc_only_per_frame": sum(x["grpc_only_per_frame"] for x in rows)}


def bytes_target(meta: dict, one: dict, measured: dict) -> dict:
    """The issue's figure, "the frame plus the memory tensors the step really needs", built from the contract
    (not from the route table), against what the orchestrator writes; the outputs it reads, listed apart."""
    S = meta["sam2_image_encoder"]["inputs"][0]["shape"][1]
    memory = tensor_bytes(meta, "sam2_memory_attention", "inputs")["memory_feats"]["shape"][1:]  # [64, S/16, S/16]
    width = tensor_bytes(meta, "sam2_memory_attention", "inputs")["obj_ptrs"]["shape"][-1]  # 256
    needed = {"frame": S * S * 3, "memories": MAX_MEMORIES * int(np.prod(memory)) * 2,
              "pointers": MAX_POINTERS * width * 4}
    needed["frame + memories + pointers"] = sum(needed.values())
    small = {"memory temporal indices": MAX_MEMORIES * 4, "pointer frame distances": MAX_POINTERS * 4,
             "prompt point (coords + label)": 2 * 4 + 4, "object score (memory encoder)": 4}
    needed_in = needed["frame + memories + pointers"] + sum(small.values())
    rows = {(x["call"], x["tensor"]): x for x in one["tensors"]}
    out = lambda call, tensor: rows[(call, f"output {tensor}")]["moved_per_frame"]
    outputs = {"4 candidate masks [4, S/4, S/4] FP32 (read: candidates 1-3 by the selection, counted whole)":
               out("sam2_frame_step", "masks"),
               "4 candidate object pointers [4, 256] FP32": out("sam2_frame_step", "obj_ptrs"),
               "4 predicted IoUs + object score": out("sam2_frame_step", "iou_scores")
               + out("sam2_frame_step", "object_score_logits"),
               "the new memory [64, S/16, S/16] FP16 (kept by the bank)": out("sam2_memory_encoder", "maskmem_feat")}
    outputs_total = sum(outputs.values())
    measured_in = measured["median"] - outputs_total  # the split is not measured: total - the outputs read
    return {"needed": needed, "small_inputs": small, "needed_inputs": needed_in,
            "computed_inputs": one["written_per_frame"], "measured_inputs": measured_in,
            "outputs": outputs, "outputs_total": outputs_total, "computed_total": one["moved_per_frame"],
            "measured_total": measured["median"], "measured_min_max": [measured["min"], measured["max"]],
            "decomposition_exact": measured["min"] == measured["max"] == one["moved_per_frame"],
            "total_over_frame_memories_pointers": round(measured["median"] / needed["frame + memories + pointers"], 3),
            "pass_inputs": measured_in <= needed_in}


def host_costs(S: int, jpeg: bytes, box: Box, reps: int = 25) -> dict[str, float]:
    """Median ms of the driver's host-side steps of one tracked frame (one object, full bank), each timed alone in
    this process with the server's own functions (glibc malloc as in the orchestrator) and a POSIX shm region
    laid out like the sam2_frame_step / sam2_memory_encoder slots. The candidate logits are realistic: smooth
    blobs around the Crossing object (its ground-truth box in the S/4 grid), 3 sizes."""
    config, rng, image = SamuraiConfig(), np.random.default_rng(0), common_pb2.Image(encoded=jpeg)
    decoded = decode_image(image, max_pixels=50_000_000, field="frame.image")
    frame = ResizedFrame(decoded.rgb, S)
    width, height, grid = decoded.width, decoded.height, S // 4
    memory = lambda: rng.standard_normal((1, 64, S // 16, S // 16)).astype(np.float16)
    pointer = lambda: rng.standard_normal(256).astype(np.float32)
    bank, store = MemoryBank(config), MemoryBank(config)
    for b in (bank, store):
        b.add_conditioning(0, memory(), pointer())
        for t in range(1, WARM_FRAMES):
            b.add_frame(t, memory(), pointer(), 0.9, 8.0, None)
    selection = bank.select_for(WARM_FRAMES)
    assert (len(selection.memories), len(selection.obj_ptrs)) == (MAX_MEMORIES, MAX_POINTERS)

    shapes = {"image": ((1, S, S, 3), np.uint8), "memory_feats": ((MAX_MEMORIES, 64, S // 16, S // 16), np.float16),
              "memory_tpos": ((MAX_MEMORIES,), np.int32), "memory_obj_ptrs": ((MAX_POINTERS, 256), np.float32),
              "obj_ptr_tdiff": ((MAX_POINTERS,), np.int32), "point_coords": ((1, 1, 2), np.float32),
              "point_labels": ((1, 1), np.int32), "masks": ((1, 4, grid, grid), np.float32),
              "iou_scores": ((1, 4), np.float32), "obj_ptrs": ((1, 4, 256), np.float32),
              "object_score_logits": ((1, 1), np.float32), "maskmem_feat": ((1, 64, S // 16, S // 16), np.float16)}
    sizes = {k: (int(np.prod(s)) * np.dtype(d).itemsize + 63) // 64 * 64 for k, (s, d) in shapes.items()}
    region = shared_memory.SharedMemory(create=True, size=sum(sizes.values()))
    try:
        offsets = dict(zip(sizes, itertools.accumulate([0, *sizes.values()]), strict=False))
        v = {k: np.ndarray(s, d, buffer=region.buf, offset=offsets[k]) for k, (s, d) in shapes.items()}
        for view in v.values():
            view[...] = 0  # fault the pages in, as a registered slot's are after its first frame

        x1, y1, x2, y2 = box
        cx, cy = (x1 + x2) / 2 * grid / width, (y1 + y2) / 2 * grid / height
        rx, ry = (x2 - x1) / 2 * grid / width, (y2 - y1) / 2 * grid / height
        yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32) + 0.5
        for k, scale in enumerate((1.0, 0.85, 1.0, 1.2)):  # 0: single-mask output; 1-3: the candidates
            v["masks"][0, k] = np.clip(12 * (1 - ((xx - cx) / (rx * scale)) ** 2 - ((yy - cy) / (ry * scale)) ** 2),
                                       -30, 15)
        v["iou_scores"][0] = (0.8, 0.7, 0.9, 0.6)
        v["object_score_logits"][0, 0] = 8.0
        v["obj_ptrs"][...] = rng.standard_normal(v["obj_ptrs"].shape)
        v["maskmem_feat"][...] = memory()
        selector = CandidateSelector(config, box_space=(S, S))
        ious, score = np.array(v["iou_scores"])[0], float(np.array(v["object_score_logits"])[0, 0])
        for _ in range(config.stable_frames_threshold + 5):  # into the stable phase: all 3 boxes measured
            chosen = selector.select(v["masks"][0, 1:4], ious[1:4], score)
        assert chosen.phase == "stable", chosen.phase
        index = 1 + chosen.index
        logits = np.array(v["masks"][0, index])
        frames, new_pointer = itertools.count(WARM_FRAMES), pointer()

        def memory_inputs():  # VideoPredictor._memory_inputs
            s = bank.select_for(WARM_FRAMES)
            return ([m.astype(np.float16, copy=False) for m in s.memories], np.asarray(s.tpos_enc_index, np.int32),
                    np.stack(s.obj_ptrs).astype(np.float32, copy=False), np.asarray(s.obj_ptr_tdiff, np.int32))

        memories, tpos, pointers, tdiff = memory_inputs()

        def write_memories():  # InferenceRunner.hold: the one new memory (the slot holds the other 6), the rest copied
            v["memory_feats"][MAX_MEMORIES - 1] = memories[-1][0]
            coords, labels = prompt_tensors([None], width, height, S)
            for name, a in (("memory_tpos", tpos), ("memory_obj_ptrs", pointers), ("obj_ptr_tdiff", tdiff),
                            ("point_coords", coords), ("point_labels", labels)):
                np.copyto(v[name], a)

        steps = {
            "decode JPEG (on the server's event loop up to 640 x 480 pixels, else one thread hop)":
                lambda: decode_image(image, max_pixels=50_000_000, field="frame.image"),
            "memory bank: select 7 memories + 16 pointers, stack the pointers": memory_inputs,
            "frame resized to S x S straight into the sam2_frame_step shm slot (3 MiB)":
                lambda: frame.write_into(v["image"]),
            "the new memory, pointers, their indices, the prompt point into the slot (0.5 MiB)": write_memories,
            "candidate outputs read: IoUs, object score": lambda: (
                np.array(v["iou_scores"])[0], float(np.array(v["object_score_logits"])[0, 0])),
            "SAMURAI selection, stable phase: 3 candidate boxes at S x S + Kalman predict/score/update":
                lambda: selector.select(v["masks"][0, 1:4], ious[1:4], score),
            "of which: box-from-mask (exact, upsampled) of the 3 candidates":
                lambda: [box_from_mask_upsampled(v["masks"][0, k], (S, S)) for k in (1, 2, 3)],
            "chosen candidate's logits + pointer copied out of shm (256 KiB + 1 KiB)":
                lambda: (np.array(v["masks"][0, index]), np.array(v["obj_ptrs"][0, index])),
            "memory encoder output copied out of shm (512 KiB) + bank update":
                lambda: store.add_frame(next(frames), np.array(v["maskmem_feat"]), new_pointer, 0.9, 8.0, 0.8),
            "mask logits to frame size (360x240) + box + COCO RLE":
                lambda: mask_at_resolution(logits, width, height),
        }
        costs = {name: round(float(np.median(timeit.repeat(step, number=1, repeat=reps))) * 1e3, 3)
                 for name, step in steps.items()}
    finally:
        region.close()
        region.unlink()
    costs["sum of the steps (the 'of which' row excluded)"] = round(
        sum(ms for name, ms in costs.items() if not name.startswith("of which")), 2)
    return costs


async def model_meta(triton: triton_aio.InferenceServerClient, model: str) -> dict:
    md, cfg = await triton.get_model_metadata(model), (await triton.get_model_config(model)).config
    tensors = {k: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in getattr(md, k)]
               for k in ("inputs", "outputs")}
    return {"max_batch_size": cfg.max_batch_size, "instances": sum(g.count for g in cfg.instance_group),
            "platform": cfg.platform or cfg.backend, **tensors}


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    frames, box = load_sequence(SEQUENCE, args.frames)
    height, width = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_COLOR).shape[:2]
    boxes = object_boxes(box, args.objects, width, height) if args.objects else []
    triton = triton_aio.InferenceServerClient(stack.triton_url, channel_args=GRPC_LIMITS)
    channel = grpc.aio.insecure_channel(stack.address, options=GRPC_LIMITS)
    try:
        meta = {m: await model_meta(triton, m) for m in MODELS}
        version = (await triton.get_server_metadata()).version
        S = meta["sam2_image_encoder"]["inputs"][0]["shape"][1]
        costs = await asyncio.to_thread(host_costs, S, frames[1], box)
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        await cell(stack, triton, stub, frames[: WARM_FRAMES + 4], [box], 1)  # warm-up: shm registration
        cells, several = [], None
        for conc in args.concurrency:
            cells.append(c := await cell(stack, triton, stub, frames, [box], conc))
            print(f"c={conc}: {c['frames_per_s']} frames/s, overhead {c['overhead_ms_per_frame_per_object']} ms")
        if boxes:
            several = await cell(stack, triton, stub, frames, boxes, 1)
            several["boxes"] = boxes
            print(f"{args.objects} objects, c=1: overhead {several['overhead_ms_per_frame_per_object']} ms per object")
    finally:
        await channel.close()
        await triton.close()
    one, main = byte_breakdown(meta, 1), cells[0]
    target = bytes_target(meta, one, main["triton_bytes_per_frame"])
    bytes_report = {"one_object": one, "target": target}
    if several:
        b, m = byte_breakdown(meta, args.objects), several["triton_bytes_per_frame"]
        bytes_report["several_objects"] = {**b, "measured": m, "exact": m["min"] == m["max"] == b["moved_per_frame"]}
    overhead, bank = main["overhead_ms_per_frame_per_object"], max(c["bank_bytes_per_object"] or 0 for c in cells)
    return {
        "environment": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "triton_version": version,
                        "stand_in_models": True, "image_size": S, "frame_size": [width, height],
                        "orchestrator_env": stack.extra_env, "instances": {m: meta[m]["instances"] for m in PARTS}},
        "method": {"frames_per_session": args.frames, "unmeasured_bank_fill_frames": WARM_FRAMES,
                   "concurrency": args.concurrency, "several_objects": args.objects,
                   "overhead_formula": OVERHEAD_FORMULA},
        "cells": cells, "several_objects": several,
        "bytes": bytes_report,
        "host_costs_ms": costs,
        "targets": {
            "overhead": {"max_ms": TARGET_OVERHEAD_MS, "at_c1": overhead, "pass": overhead <= TARGET_OVERHEAD_MS},
            "memory": {"max_mib": TARGET_MEMORY_MIB, "bank_mib_per_object": round(bank / MIB, 2),
                       "pass": 0 < bank <= TARGET_MEMORY_MIB * MIB},
            "bytes": {"needed_inputs": target["needed_inputs"], "measured_inputs": target["measured_inputs"],
                      "outputs_read": target["outputs_total"], "pass": target["pass_inputs"]}},
        "model_metadata": meta,
    }


def markdown(rep: dict) -> str:
    env, cells, t, several = rep["environment"], rep["cells"], rep["targets"], rep["several_objects"]
    one, tg = rep["bytes"]["one_object"], rep["bytes"]["target"]
    S, ok, mib = env["image_size"], {True: "PASS", False: "FAIL"}, lambda v: f"{v:,} B ({v / MIB:.2f} MiB)"
    all_cells = cells + ([several] if several else [])
    label = lambda c: f"{c['sessions']}" if c is not several else f"1 ({c['objects_per_frame']:g} objects)"
    targets = [[f"overhead <= {TARGET_OVERHEAD_MS:g} ms per frame per object (c=1, 1 object)",
                f"{t['overhead']['at_c1']} ms"],
               [f"memory <= {TARGET_MEMORY_MIB:g} MiB per object (bank)", f"{t['memory']['bank_mib_per_object']} MiB"],
               ["bytes to Triton per frame <= the frame + the memory tensors the step needs",
                (f"{t['bytes']['measured_inputs']:,} vs {t['bytes']['needed_inputs']:,} B "
                 f"(outputs read back, listed apart: {t['bytes']['outputs_read']:,} B)")]]
    targets = [[*x, ok[t[k]["pass"]]] for x, k in zip(targets, t, strict=True)]
    counted = lambda x: f"{x['moved_per_frame']:,}" if x["route"] in (WRITTEN, NEW_ROWS, READ) else "-"
    grpc_only = lambda x: f"{x['grpc_only_per_frame']:,}" if x["route"] != INSIDE else "-"
    lines = [
        "# Tracking benchmark", "",
        (f"{env['date']}; commit {env['git_commit']}; {env['cpu_count']} CPUs (shared); Triton "
         f"{env['triton_version']}; S={S}; {rep['method']['frames_per_session']} Crossing frames (360x240 JPEG) per "
         f"session, one object each (the last cell: {rep['method']['several_objects']} objects in one session), the "
         f"first {WARM_FRAMES} unmeasured (bank fill); orchestrator with --triton-shm on; extra orchestrator "
         f"environment: {env['orchestrator_env'] or '-'}."), "",
        ("**The SAM 2 models are STAND-IN contract models** (the real tensor names, shapes and dtypes, no weights): "
         "their compute time means nothing; the orchestrator's costs, the bytes and the memory carry over."), "",
        ("A tracked frame with one object is two Triton calls: `sam2_frame_step` (a Triton ensemble: image encoder "
         "-> memory attention -> mask decoder) and `sam2_memory_encoder`. With several objects: the encoder once, "
         "then per object `sam2_track_step` (ensemble: attention -> decoder) and the memory encoder, the objects "
         "concurrently."), "",
        *_table(["sessions", "frames", "frames/s", "per session", "latency p50 ms", "p90 ms", "server total_ms",
                 "server triton_ms", "Triton compute ms", "Triton queue ms", "overhead ms/frame/object",
                 "= transport", "+ orchestrator own", "CPU ms/frame orch / triton"],
                [[label(c), c["frames_measured"], c["frames_per_s"], c["frames_per_s_per_session"],
                  *c["latency_ms"].values(), c["server_ms_mean"]["total"], c["server_ms_mean"]["triton"],
                  c["triton_compute_ms_per_frame"], c["triton_queue_ms_per_frame"],
                  *((c["overhead_ms_per_frame_per_object"], c["transport_ms_per_frame"]) if c is not several
                    else ("n/a (overlap, see below)", "n/a")),
                  round(c["orchestrator_own_ms_per_frame"] / c["objects_per_frame"], 2),
                  "{orchestrator} / {tritonserver}".format(**c["cpu_ms_per_frame"])] for c in all_cells]),
        ("Server times are means per measured frame; transport and own are per object too (/ objects per frame). "
         + OVERHEAD_FORMULA), "",
        "Per model, per frame (Triton statistics; shm/gRPC from framewise_triton_transfers_total):", "",
        *_table(["sessions", "model", "compute ms", "queue ms", "requests", "avg batch", "via shm", "via gRPC",
                 "in the sum"],
                [[label(c), m, *(d[k] for k in ("compute_ms", "queue_ms", "requests", "avg_batch", "via_shm",
                                                 "via_grpc")), "yes" if d["summed"] else "no (ensemble)"]
                 for c in all_cells for m, d in c["per_model_per_frame"].items() if d["requests"] or d["summed"]]),
        ("Ensembles against their steps, per frame. Triton adds its steps' compute to an ensemble's statistics "
         "(each step's request reports to the ensemble as a secondary aggregator), so the ensembles are left out of "
         "the sum; their steps' queue is not added. Request time in Triton - the steps' compute and queue is the "
         "ensemble scheduler's own time (tensor hand-over between steps), which the formula counts as transport; "
         "a figure near 0 or below means it is under what these statistics resolve (a backend takes its last "
         "timestamp after it has sent its response, so a step's compute overlaps the next step's start):"), "",
        *_table(["sessions", "ensemble", "compute ms", "its steps' compute ms", "queue ms", "its steps' queue ms",
                 "request time in Triton ms", "- steps' compute and queue = scheduler ms"],
                [[label(c), name, *e.values()] for c in all_cells for name, e in c["ensembles"].items()]),
    ]
    if several:
        base, k = cells[0], several["objects_per_frame"]
        per = lambda c, v: round(v / c["objects_per_frame"], 2)
        lines += [
            f"## Several objects per session ({k:g} objects, 1 session)", "",
            (f"Boxes on frame 0 (the Crossing first ground-truth box moved / scaled): {several['boxes']}; "
             f"objects present per frame: {several['present_per_frame']}. Per frame: the encoder once, then per "
             "object sam2_track_step and sam2_memory_encoder, the objects concurrently: 1 + 2K Triton calls."), "",
            *_table(["objects", "frames/s", "server total_ms", "/ object", "triton_ms", "orchestrator own ms",
                     "own / object", "orchestrator CPU ms", "CPU / object", "Triton compute + queue ms (summed)",
                     "overhead by the formula / object", "bytes/frame (measured)", "bank MiB/object"],
                    [[f"{c['objects_per_frame']:g}", c["frames_per_s"], c["server_ms_mean"]["total"],
                      per(c, c["server_ms_mean"]["total"]), c["server_ms_mean"]["triton"],
                      c["orchestrator_own_ms_per_frame"], per(c, c["orchestrator_own_ms_per_frame"]),
                      c["cpu_ms_per_frame"]["orchestrator"], per(c, c["cpu_ms_per_frame"]["orchestrator"]),
                      round(c["triton_compute_ms_per_frame"] + c["triton_queue_ms_per_frame"], 2),
                      c["overhead_ms_per_frame_per_object"], f"{c['triton_bytes_per_frame']['median']:,}",
                      round((c["bank_bytes_per_object"] or 0) / MIB, 3)]
                     for c in (base, several)]),
            ("The first row is the 1-object cell at c=1 (the main verdict's). With several objects the calls of "
             "different objects overlap in Triton (as far as each part's instance count, tuned for the cores by "
             "engines/cpu_tuning.py, lets them): the statistics sum the overlapping executions' wall times (each stretched by the others "
             "sharing the cores, and queue time that runs while another call computes), so the summed compute + "
             "queue exceeds the frame's time in Triton and the formula's overhead is not meaningful there. The "
             "per-object cost the orchestrator adds shows in its own time (total_ms - triton_ms, triton_ms being "
             "the union of its call intervals) and its CPU per object."), "",
        ]
    lines += [
        f"## Bytes per tracked frame (1 object, full bank: {MAX_MEMORIES} memories, {MAX_POINTERS} pointers)", "",
        "Routes: " + "; ".join(f"**{k}**: {v}" for k, v in ROUTES.items()) + ".", "",
        *_table(["call", "calls/frame", "tensor", "shape", "dtype", "bytes", "route", "counted (shm)",
                 "gRPC-only", "what"],
                [[x["call"], x["calls_per_frame"], x["tensor"], x["shape"], x["dtype"], f"{x['bytes']:,}",
                  x["route"], counted(x), grpc_only(x), x["note"]] for x in one["tensors"]]),
        *_table(["per frame", "bytes"], [
            ["written into shm by the orchestrator (inputs)", mib(one["written_per_frame"])],
            ["read back by the orchestrator (outputs)", mib(one["read_per_frame"])],
            ["= counted, computed (what Held.bytes_moved adds up)", mib(one["moved_per_frame"])],
            ["measured: FrameResult.triton_bytes at c=1, median (min - max)",
             f"{mib(tg['measured_total'])} ({tg['measured_min_max'][0]:,} - {tg['measured_min_max'][1]:,})"],
            ["handed over by reference, every hand-over (not counted; = gRPC-only - counted)",
             mib(one["by_reference_per_frame"])],
            ["inside Triton only (ensemble intermediates)", mib(one["inside_triton_per_frame"])],
            ["a gRPC-only deployment (every input and output of both calls in messages)",
             mib(one["grpc_only_per_frame"])]]),
        ("Decomposition: measured = written + read, "
         + ("**exactly** (every measured frame)." if tg["decomposition_exact"] else
            "**NOT exact**: some frames moved other bytes (an absent object's mask is written, not referenced).")),
        "",
        "### The bytes target: the frame plus the memory tensors the step really needs", "",
        *_table(["inputs, to Triton", "bytes"], [
            *[[k, f"{v:,}"] for k, v in tg["needed"].items()],
            *[[f"+ {k}", f"{v:,}"] for k, v in tg["small_inputs"].items()],
            ["= what the step needs", f"**{tg['needed_inputs']:,}**"],
            ["written by the orchestrator (computed)", f"{tg['computed_inputs']:,}"],
            ["written by the orchestrator (measured total - the outputs below)", f"**{tg['measured_inputs']:,}**"]]),
        *_table(["outputs, read back from Triton (not in the target's figure)", "bytes"],
                [*[[k, f"{v:,}"] for k, v in tg["outputs"].items()], ["total", f"{tg['outputs_total']:,}"]]),
        (f"Inputs: **{ok[tg['pass_inputs']]}**: the orchestrator sends the frame, the one new memory (its slot "
         "still holds the other ones from the previous frame), the pointers and "
         f"{sum(tg['small_inputs'].values())} B of indices, prompt and score, nothing else (no feature map). "
         f"Outputs: {tg['outputs_total']:,} B come back: the candidate masks SAMURAI's selection measures "
         f"(1 MiB counted, 768 KiB of it read), the candidate pointers and scores, and the new memory the bank "
         f"keeps. In + out = {tg['measured_total']:,} B = {tg['total_over_frame_memories_pointers']}x the frame + "
         f"memories + pointers; without shared memory {mib(one['grpc_only_per_frame'])} would cross."), "",
    ]
    if several:
        b = rep["bytes"]["several_objects"]
        lines += [
            f"Several objects ({b['objects']} per frame), per call:", "",
            *_table(["call", "calls/frame", "counted per call (shm)", "gRPC-only per call"],
                    [[x["model"], x["calls_per_frame"], f"{x['moved_per_call']:,}", f"{x['grpc_only_per_call']:,}"]
                     for x in b["calls"]]),
            (f"Computed {mib(b['moved_per_frame'])} per frame (written {b['written_per_frame']:,} + read "
             f"{b['read_per_frame']:,}); measured median {mib(b['measured']['median'])} (min {b['measured']['min']:,},"
             f" max {b['measured']['max']:,}): {'exact' if b['exact'] else 'NOT exact'}. By reference "
             f"{mib(b['by_reference_per_frame'])}; gRPC-only {mib(b['grpc_only_per_frame'])}."), "",
        ]
    costs = rep["host_costs_ms"]
    lines += [
        "## Host-side steps of one tracked frame (1 object), each timed alone in the bench process (median ms)", "",
        *_table(["step", "ms"], [[k, v] for k, v in costs.items()]),
        (f"Measured orchestrator own time (total_ms - triton_ms) at c=1: {cells[0]['orchestrator_own_ms_per_frame']} "
         "ms per frame. Not timed here: the Track stream's messages (request parse, response build) and the task "
         "switches around the two Triton calls (their requests go as messages on reused ModelStreamInfer streams). The 4-call path's steps "
         "(gRPC serialisation of the attention and decoder requests, copying the encoder's outputs out of shm, "
         "np.repeat of the high-res maps) no longer exist."), "",
        "## Memory per tracked object", "",
        *_table(["sessions", "framewise_tracking_session_bytes per object (MiB)",
                 "orchestrator VmRSS growth per session (MiB)", "RssAnon growth per session (MiB)"],
                [[label(c), round((c["bank_bytes_per_object"] or 0) / MIB, 3), c["rss_growth_mib_per_session"],
                  c["rss_anon_growth_mib_per_session"]] for c in all_cells]),
        ("Bank bytes: the metrics endpoint after the last frame, every session still open. RSS growth: orchestrator "
         "VmRSS then minus before the cell's sessions opened, / sessions; it also counts transient frame buffers and "
         "allocator retention, and later cells reuse memory freed by earlier ones."), "",
        "## Targets", "", *_table(["target", "figure", "verdict"], targets),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build = [sys.executable, "build_engines.py", "--target", "cpu", "--output", str(args.repository)]
    subprocess.run(build, cwd=REPO, check=True)  # S=1024; a no-op when up to date
    env = dict(kv.split("=", 1) for kv in args.orchestrator_env)  # diagnostics, e.g. MALLOC_* tunables
    try:
        with track_stack(args.repository, REPO / ".cache" / "bench_track", env) as stack:
            report = asyncio.run(run(args, stack))
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
            diff = ["git", "diff", "--quiet", "HEAD", "--", "server", "engines"]
            dirty = subprocess.run(diff, cwd=REPO, check=False).returncode
            report["environment"]["git_commit"] = commit + ("+uncommitted server/engines changes" if dirty else "")
    except KeyboardInterrupt:
        return 130
    write_report(args.output, "track", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
