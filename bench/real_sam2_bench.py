#!/usr/bin/env python3
"""The real SAM 2.1 architecture, reference against Framewise, on the same seeded weights and frames.

    make bench-real                                   # short run, ~25 minutes on 2 cores
    .venv/bin/python bench/real_sam2_bench.py [--frames 8] [--rounds 2] [--objects 1,3] \
        [--reference-python .venv-export/bin/python]

The bench itself, the orchestrator and Triton run in the project's environment (.venv: the orchestrator never
imports torch); the reference and the export run in the export environment (--reference-python, `make export-env`).

Sides, in alternating order every round (reference first in even rounds, Framewise first in odd ones):

  reference  the SAMURAI video predictor of PyPI absolutely-not-samurai (PyTorch, --threads threads), in its own
             process (so its memory is its own): build_sam2_video_predictor(configs/samurai/sam2.1_hiera_tiny.yaml)
             with torch.manual_seed(seed) weights, init_state on the clip's JPEG folder, add_new_points_or_box,
             propagate_in_video. SAMURAI keeps its Kalman state on the model, so K objects need K predictors: K
             copies of the model, each with its own inference state (sharing the decoded frames), stepped frame by
             frame in lockstep; a frame's time is the sum of the K predictors' times for it (one after the other on
             the same cores, as a user running K SAMURAI trackers would).
  framewise  TrackingService/Track over real gRPC to a real orchestrator (`python -m server`) in front of a real
             tritonserver serving the four parts exported from the same seeded model (build_engines.py --target
             onnx --models sam2 --random-init), in the CPU repository build_engines.py writes by default (tuned
             for this machine). One session per round with all K objects.

Both sides get the same S x S frames (the reference loader's PIL resize of the first --frames JPEGs of the
sequence; Framewise receives them as raw RGB8) and the same boxes (the sequence's first ground-truth box, and for
K > 1 the boxes bench/track_bench.py derives from it). Per frame: latency (frame 0, the prompt frame, reported
apart), per object the mask IoU between the reference's low-res logits upsampled to S x S (bilinear, > 0) and
Framewise's returned mask (>= 0.99 required). Per cell: frames/s over the tracked frames (>= 1), p50 latency,
Triton's per-part compute from its statistics endpoint (deltas), peak PSS summed over each side's process tree
(sampled from /proc/PID/smaps_rollup). Results: bench/results/real_sam2.{json,md}.
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
import threading
import time
from pathlib import Path
from typing import Any

from server.processes import no_grpc_fork_handlers  # no gRPC in it

no_grpc_fork_handlers()  # before gRPC loads: the Stack starts its servers with a preexec_fn

import numpy as np

from server.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))  # parity/ (the clip and box helpers the parity suite uses)
ASSETS = REPO.parent / "shared" / "assets"
DEFAULT_SEQUENCE = ASSETS / "sequences" / "Crossing"
PARTS = ("sam2_image_encoder", "sam2_memory_attention", "sam2_mask_decoder", "sam2_memory_encoder")
# The orchestrator's --triton-shm-idle-release (its default): after the last cell the stack idles
# this long and a few seconds more, then its PSS is taken again (what it keeps once idle).
SHM_IDLE_RELEASE_S = ServerConfig.triton_shm_idle_release_s
MASK_IOU_MIN = 0.99
GRPC_LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=8, help="frames per side per round, prompt frame included (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; sides alternate their order (default 2)")
    p.add_argument("--objects", default="1,3", help="comma-separated object counts (default 1,3)")
    p.add_argument("--threads", type=int, default=2, help="the reference's torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed of the random weights (default 0)")
    p.add_argument("--image-size", type=int, default=1024,
                   help="SAM 2 model size S of both sides (default 1024, SAM 2.1's; 512: the real-time forks')")
    p.add_argument("--sam2-precision", choices=("auto", "f32", "bf16"), default="auto",
                   help="Framewise's SAM 2 parts (build_engines.py --sam2-precision; default auto, what the "
                        "default build gives on this machine)")
    p.add_argument("--sequence", type=Path, default=DEFAULT_SEQUENCE)
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="the exported parts; exported there (random-init, --seed) when missing")
    p.add_argument("--repository", type=Path, default=None,
                   help="serve this CPU repository instead of building one from --onnx-dir (default: build)")
    p.add_argument("--intra-op-threads", type=int, default=None,
                   help="build the repository with this many ORT threads per instance (default: tuned)")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "real_sam2_bench")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="real_sam2", help="results file name (default real_sam2)")
    p.add_argument("--reference-python", type=Path, default=REPO / ".venv-export" / "bin" / "python",
                   help="interpreter of the export environment: the reference and the export (default .venv-export)")
    p.add_argument("--reference-worker", type=Path, help=argparse.SUPPRESS)  # internal: one reference cell
    a = p.parse_args(argv)
    a.objects = [int(k) for k in a.objects.split(",")]
    if a.frames < 2 or a.rounds < 1 or any(k < 1 or k > 4 for k in a.objects):
        p.error("--frames >= 2, --rounds >= 1, objects 1..4")
    return a


def log(message: str) -> None:
    print(f"[real_sam2 {dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Memory: PSS summed over process trees, sampled in a thread
# ---------------------------------------------------------------------------------------------


def process_tree(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in (e for e in os.scandir("/proc") if e.name.isdigit()):
        try:
            ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], list(roots)
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def pss_kib(pids: list[int]) -> int:
    """Summed PSS: a shared page counts once across the processes that map it, unlike summed RSS."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:  # exited meanwhile
            continue
    return total


class PeakPss:
    """Samples the summed PSS of the process trees under ``roots()`` every ``interval_s``; ``peak_mib``."""

    def __init__(self, roots, interval_s: float = 0.5) -> None:
        self.roots, self.interval_s, self.peak_kib = roots, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        roots = self.roots()
        if roots:
            self.peak_kib = max(self.peak_kib, pss_kib(process_tree(roots)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)


# ---------------------------------------------------------------------------------------------
# The reference, in its own process
# ---------------------------------------------------------------------------------------------


def reference_worker(spec_path: Path) -> int:
    """One reference cell: K predictors over the clip; writes per-frame times and low-res logits."""
    import copy

    import torch

    from engines.export import sam2_parts

    spec = json.loads(spec_path.read_text())
    torch.set_grad_enabled(False)
    torch.set_num_threads(spec["threads"])
    model = sam2_parts.build_predictor(spec["size"], None, seed=spec["seed"], image_size=spec["image_size"])
    predictors = [model] + [copy.deepcopy(model) for _ in spec["boxes"][1:]]
    times = [0.0] * spec["frames"]
    logits: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        states = []
        for k, (predictor, box) in enumerate(zip(predictors, spec["boxes"])):
            state = predictor.init_state(video_path=spec["frames_dir"])
            if states:  # the decoded frames once, shared (a fair lower bound of K trackers' memory)
                state["images"] = states[0]["images"]
            states.append(state)
        generators = []
        for predictor, state, box in zip(predictors, states, spec["boxes"]):
            started = time.perf_counter()
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=box)
            times[0] += time.perf_counter() - started
            generators.append(predictor.propagate_in_video(state))
        for t in range(spec["frames"]):
            for k, (generator, state) in enumerate(zip(generators, states)):
                started = time.perf_counter()
                frame_idx, _, _ = next(generator)
                times[t] += time.perf_counter() - started
                out = state["output_dict"]["cond_frame_outputs"].get(frame_idx) or \
                    state["output_dict"]["non_cond_frame_outputs"][frame_idx]
                logits[f"{frame_idx}_{k}"] = out["pred_masks"][0, 0].float().numpy().copy()
    # The reference's low-res logits upsampled to S x S (bilinear, > 0, as SAM 2 does), packed: the bench
    # process has no torch.
    import torch.nn.functional as F

    s = int(model.image_size)
    masks = {}
    for key, value in logits.items():
        up = F.interpolate(torch.from_numpy(value)[None, None], size=(s, s), mode="bilinear", align_corners=False)
        masks[key] = np.packbits(up[0, 0].numpy() > 0)
    np.savez(spec["output"], times=np.asarray(times), **masks)
    Path(spec["output"]).with_suffix(".versions.json").write_text(json.dumps(sam2_parts._versions()))
    return 0


def run_reference(args: argparse.Namespace, frames_dir: Path, boxes: list[list[float]], cell: str) -> dict[str, Any]:
    spec_path = args.work / f"reference_{cell}.json"
    output = args.work / f"reference_{cell}.npz"
    spec_path.write_text(json.dumps({"threads": args.threads, "size": "tiny", "seed": args.seed, "boxes": boxes,
                                     "image_size": args.image_size,
                                     "frames": args.frames, "frames_dir": str(frames_dir), "output": str(output)}))
    command = [str(args.reference_python), str(Path(__file__).resolve()), "--reference-worker", str(spec_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with PeakPss(lambda: [proc.pid] if proc.poll() is None else []) as peak:
        text, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"reference worker failed ({proc.returncode}):\n{text.decode(errors='replace')[-3000:]}")
    data = np.load(output)
    masks = {key: data[key] for key in data.files if key != "times"}
    versions = json.loads(output.with_suffix(".versions.json").read_text())
    return {"times": data["times"].tolist(), "peak_pss_mib": peak.peak_mib, "masks": masks, "versions": versions}


# ---------------------------------------------------------------------------------------------
# Framewise: the real stack
# ---------------------------------------------------------------------------------------------


async def triton_part_stats(url: str) -> dict[str, dict[str, int]]:
    import tritonclient.grpc.aio as triton_aio

    client = triton_aio.InferenceServerClient(url)
    try:
        stats = {}
        for part in PARTS:
            (model,) = (await client.get_inference_statistics(part)).model_stats
            s = model.inference_stats
            stats[part] = {"executions": int(model.execution_count), "compute_ns": int(
                s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns), "queue_ns": int(s.queue.ns)}
        return stats
    finally:
        await client.close()


async def run_framewise(stack, frames: list[np.ndarray], boxes_model: list[list[float]]) -> dict[str, Any]:
    import grpc

    from clients.masks import decode_rle
    from framewise.v1 import common_pb2, tracking_service_pb2_grpc
    from framewise.v1 import tracking_service_pb2 as pb

    before = await triton_part_stats(stack.triton_url)
    h, w = frames[0].shape[:2]
    times, masks = [], {}
    async with grpc.aio.insecure_channel(stack.address, options=GRPC_LIMITS) as channel:
        call = tracking_service_pb2_grpc.TrackingServiceStub(channel).Track(timeout=3600)
        await call.write(pb.TrackRequest(open=pb.OpenSession()))
        opened = await call.read()
        assert opened.WhichOneof("message") == "session", opened
        for t, frame in enumerate(frames):
            prompts = [pb.ObjectPrompt(object_id=k + 1, box=common_pb2.BoundingBox(
                x1=b[0], y1=b[1], x2=b[2], y2=b[3])) for k, b in enumerate(boxes_model)] if t == 0 else []
            image = common_pb2.Image(raw=common_pb2.RawFrame(width=w, height=h, pixel_format=common_pb2.PIXEL_FORMAT_RGB8,
                                                             data=frame.tobytes()))
            started = time.perf_counter()
            await call.write(pb.TrackRequest(frame=pb.TrackFrame(frame_index=t, image=image, prompts=prompts)))
            response = await call.read()
            times.append(time.perf_counter() - started)
            result = response.frame
            assert response.WhichOneof("message") == "frame" and result.frame_index == t, response
            for k, obj in enumerate(result.objects):
                masks[f"{t}_{k}"] = decode_rle(obj.mask)
        # What the open session holds between frames, by the server's own count: every object's
        # memory bank (memories, pointers; Triton keeps nothing between calls). A PSS difference of
        # the orchestrator was tried first: allocator reuse makes it noise at this size (+8.6 MiB
        # for 1 object, +1.4 MiB for 3).
        session_bytes = session_bank_bytes(stack.metrics_url)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
    after = await triton_part_stats(stack.triton_url)
    parts = {part: {key: after[part][key] - before[part][key] for key in after[part]} for part in PARTS}
    return {"times": times, "masks": masks, "parts": parts, "session_mib": round(session_bytes / 2**20, 2)}


def session_bank_bytes(metrics_url: str) -> float:
    """``framewise_tracking_session_bytes`` from the orchestrator's metrics endpoint."""
    import httpx

    text = httpx.get(metrics_url, timeout=10).text
    match = re.search(r"^framewise_tracking_session_bytes ([0-9.e+]+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no framewise_tracking_session_bytes at {metrics_url}")
    return float(match.group(1))


def build_repository(args: argparse.Namespace, s: int) -> Path:
    from engines.cpu_repository import build_cpu_repository, default_yolo_onnx

    if args.repository is not None:
        return args.repository
    if not (args.onnx_dir / "sam2_export.json").is_file():
        log(f"exporting the SAM 2 parts (random-init, seed {args.seed}) into {args.onnx_dir}")
        subprocess.run([str(args.reference_python), str(REPO / "build_engines.py"), "--target", "onnx", "--models", "sam2",
                        "--random-init", "--seed", str(args.seed), "--sam2-image-size", str(s),
                        "--output", str(args.onnx_dir)], cwd=REPO, check=True)
    return build_cpu_repository(args.work / "model_repository_cpu", default_yolo_onnx(), sam2_image_size=s,
                                sam2_onnx_dir=args.onnx_dir, intra_op_threads=args.intra_op_threads,
                                sam2_precision=args.sam2_precision)


# ---------------------------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------------------------


def mask_ious(reference: dict[str, np.ndarray], ours: dict[str, np.ndarray], s: int) -> list[float]:
    """Per frame and object: the reference's S x S mask (packed bits) against ours."""
    ious = []
    for key, packed in sorted(reference.items()):
        ref = np.unpackbits(packed)[: s * s].reshape(s, s).astype(bool)
        our = ours.get(key)
        if our is None:
            ious.append(0.0)
            continue
        union = np.count_nonzero(ref | our)
        ious.append(1.0 if union == 0 else float(np.count_nonzero(ref & our) / union))
    return ious


def summarise(times: list[list[float]]) -> dict[str, Any]:
    """Rounds of per-frame seconds -> frames/s over tracked frames (>= 1), p50 of them, the prompt frame's."""
    tracked = [x for r in times for x in r[1:]]
    return {"fps": round(len(tracked) / sum(tracked), 4), "p50_s": round(float(np.median(tracked)), 3),
            "p90_s": round(float(np.percentile(tracked, 90)), 3),
            "prompt_frame_s": round(float(np.median([r[0] for r in times])), 3), "tracked_frames": len(tracked)}


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Real SAM 2.1 architecture: the reference SAMURAI predictor against Framewise, same weights, same frames",
        "",
        (f"{env['date']}; `bench/real_sam2_bench.py` ({env['argv']}); {env['cores']} cores, load average "
         f"{env['load_start']} at start, {env['load_end']} at the end (other work shares this machine). Weights: "
         f"{env['weights']}, S = {env['image_size']}; clip {env['sequence']}, the first {env['frames']} frames per "
         f"side per round, {env['rounds']} rounds, sides alternating. Reference: absolutely-not-samurai "
         f"{env['versions'].get('absolutely-not-samurai')}, torch {env['versions'].get('torch')}, {env['threads']} "
         f"threads; K objects = K predictors stepped in lockstep, a frame's time = the sum of theirs. Framewise: "
         f"TrackingService/Track over gRPC, one session with K objects, Triton python backend over ONNX Runtime "
         f"{env['versions'].get('onnxruntime')} / OpenVINO {env['versions'].get('openvino')}, repository as "
         f"build_engines.py writes it "
         f"({env['repository_tuning']})."),
        "",
        "| objects | side | frames/s | p50 s/frame | p90 | prompt frame s | peak PSS MiB | speed-up (fps) | min mask IoU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in report["cells"]:
        ref, ours = cell["reference"], cell["framewise"]
        for name, side in (("reference", ref), ("framewise", ours)):
            speed = f"{ours['fps'] / ref['fps']:.2f}x" if name == "framewise" else ""
            iou = f"{cell['parity']['min_iou']:.5f} ({'PASS' if cell['parity']['pass'] else 'FAIL'})" \
                if name == "framewise" else ""
            lines.append(f"| {cell['objects']} | {name} | {side['fps']:.3f} | {side['p50_s']:.2f} | {side['p90_s']:.2f} "
                         f"| {side['prompt_frame_s']:.2f} | {side['peak_pss_mib']:.0f} | {speed} | {iou} |")
    lines += ["", "Triton per-part time (Framewise), per frame (all rounds, prompt frames included):", "",
              "| objects | part | executions | compute ms/frame | queue ms/frame | share of compute |",
              "|---:|---|---:|---:|---:|---:|"]
    for cell in report["cells"]:
        total = sum(p["compute_ms_per_frame"] for p in cell["parts"].values()) or 1
        for part, p in cell["parts"].items():
            lines.append(f"| {cell['objects']} | {part} | {p['executions']} | {p['compute_ms_per_frame']:.0f} | "
                         f"{p['queue_ms_per_frame']:.0f} | {100 * p['compute_ms_per_frame'] / total:.0f} % |")
    lines += ["", (f"Framewise stack idle PSS after start: {report['framewise_idle_pss_mib']:.0f} MiB "
                   f"(orchestrator + tritonserver + its python-backend stubs); "
                   f"{report['framewise_after_last_cell_pss_mib']:.0f} MiB right after its last cell, "
                   f"{report['framewise_after_idle_pss_mib']:.0f} MiB once idle {SHM_IDLE_RELEASE_S + 5:g} s after "
                   f"it (the orchestrator's request slots give their pages back after "
                   f"{SHM_IDLE_RELEASE_S:g} s; the python backend's regions and the runtimes' caches stay). Peak PSS is the maximum of the summed "
                   f"PSS of each side's process tree, sampled every 0.5 s during its cell; the reference's is the "
                   f"worker process (model(s), inference states, decoded frames)."), ""]
    sessions = [(cell["objects"], cell["framewise"].get("session_bank_mib")) for cell in report["cells"]]
    if all(mib is not None for _, mib in sessions):
        lines += ["What one open session holds between frames after its last frame (the orchestrator's "
                  "`framewise_tracking_session_bytes`: every object's memory bank, memories in FP16 and object "
                  "pointers): " + ", ".join(f"{k} object{'s' if k > 1 else ''}: {mib:.2f} MiB" for k, mib in sessions)
                  + f" ({env['frames']} frames; a full bank, from frame 15 on, holds 7 memories and 16 pointers)."]
        peaks = [(cell["objects"], cell["framewise"]["peak_pss_mib"]) for cell in report["cells"]]
        if len(peaks) > 1 and peaks[-1][0] > peaks[0][0]:
            (k0, m0), (k1, m1) = peaks[0], peaks[-1]
            lines += [f"Peak PSS of the stack per added object: {(m1 - m0) / (k1 - k0):.1f} MiB "
                      f"(({m1:.0f} - {m0:.0f}) / {k1 - k0}: Triton's activations are per call, not per object).", ""]
    return "\n".join(lines)


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_worker is not None:
        return reference_worker(args.reference_worker)

    from detect_bench import Stack, write_report
    from parity.run import load_frames_like_reference, model_box, prepare_clip
    from track_bench import object_boxes

    from engines.cpu_repository import read_manifest
    from framewise.v1 import tracking_service_pb2 as pb

    s = args.image_size
    if args.onnx_dir is None:  # one export per size
        args.onnx_dir = REPO / ".cache" / ("sam2_onnx_random" if s == 1024 else f"sam2_onnx_random_s{s}")
    args.work = args.work.absolute()
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    frames_dir, box, (width, height) = prepare_clip(args.sequence, args.frames, args.work / "frames")
    frames = load_frames_like_reference(frames_dir, s)
    repository = build_repository(args, s)
    tuning = (read_manifest(repository) or {}).get("fingerprint", {}).get("parameters", {}).get("tuning", {})
    tuning_text = ", ".join(f"{m}: {t['instances']} x {t['intra_op_threads']} threads"
                            + f", {t.get('runtime', 'onnxruntime')} {t.get('inference_precision', 'f32')}"
                            + (", arena shrinkage" if t.get("arena_shrinkage") else "")
                            + (", compiled for one row" if t.get("fixed_batch") else "")
                            + (", snippets off" if t.get("snippets") is False else "")
                            for m, t in tuning.items() if m in PARTS) or "unknown"
    rewrite = re.search(r'key: "graph_rewrite" value \{ string_value: "([^"]*)"',
                        (repository / "sam2_memory_attention" / "config.pbtxt").read_text())
    tuning_text += f"; memory attention graph: {rewrite.group(1) if rewrite else 'as exported'}"
    log(f"repository {repository} ({tuning_text})")
    service = pb.DESCRIPTOR.services_by_name["TrackingService"].full_name
    stack = Stack(repository, args.work / "stack", {}, models=PARTS, service=service,
                  orchestrator_args=("--max-tracking-sessions", "4",
                                     "--triton-shm-idle-release", str(SHM_IDLE_RELEASE_S)))
    cells: dict[int, dict[str, Any]] = {k: {"reference": [], "framewise": [], "ref_pss": 0.0, "fw_pss": 0.0,
                                            "ious": [], "parts": [], "session_mib": []} for k in args.objects}
    with stack:
        roots = lambda: [p.pid for p in stack.procs.values() if p.poll() is None]  # noqa: E731
        time.sleep(2)
        idle = pss_kib(process_tree(roots())) / 1024
        log(f"stack up: idle PSS {idle:.0f} MiB")
        for r in range(args.rounds):
            for k in args.objects:
                boxes = [list(b) for b in object_boxes(tuple(box), k, width, height)]
                boxes_model = [model_box(b, width, height, s) for b in boxes]
                order = ("reference", "framewise") if r % 2 == 0 else ("framewise", "reference")
                for side in order:
                    if side == "reference":
                        ref = run_reference(args, frames_dir, boxes, f"r{r}_k{k}")
                        cells[k]["reference"].append(ref["times"])
                        cells[k]["ref_pss"] = max(cells[k]["ref_pss"], ref["peak_pss_mib"])
                        log(f"round {r} k={k} reference: {[round(x, 2) for x in ref['times']]} s, "
                            f"peak PSS {ref['peak_pss_mib']:.0f} MiB")
                    else:
                        with PeakPss(roots) as peak:
                            ours = asyncio.run(run_framewise(stack, frames, boxes_model))
                        cells[k]["framewise"].append(ours["times"])
                        cells[k]["fw_pss"] = max(cells[k]["fw_pss"], peak.peak_mib)
                        cells[k]["parts"].append(ours["parts"])
                        cells[k]["session_mib"].append(ours["session_mib"])
                        log(f"round {r} k={k} framewise: {[round(x, 2) for x in ours['times']]} s, "
                            f"peak PSS {peak.peak_mib:.0f} MiB")
                        after_last, last_end = pss_kib(process_tree(roots())) / 1024, time.monotonic()
                versions = ref["versions"]
                ious = mask_ious(ref["masks"], ours["masks"], s)
                cells[k]["ious"].extend(ious)
                log(f"round {r} k={k} mask IoU min {min(ious):.5f}")
        # The sessions are closed; what stays resident once idle slots have given their pages back.
        time.sleep(max(0.0, last_end + SHM_IDLE_RELEASE_S + 5 - time.monotonic()))
        after_idle = pss_kib(process_tree(roots())) / 1024
        log(f"stack PSS right after the last Framewise cell {after_last:.0f} MiB, idle {SHM_IDLE_RELEASE_S + 5:g} s "
            f"after it {after_idle:.0f} MiB")
    report_cells = []
    for k, c in cells.items():
        frames_total = sum(len(t) for t in c["framewise"])
        parts = {}
        for part in PARTS:
            ex = sum(p[part]["executions"] for p in c["parts"])
            parts[part] = {"executions": ex,
                           "compute_ms_per_frame": round(sum(p[part]["compute_ns"] for p in c["parts"]) / 1e6 / frames_total, 1),
                           "queue_ms_per_frame": round(sum(p[part]["queue_ns"] for p in c["parts"]) / 1e6 / frames_total, 1)}
        report_cells.append({
            "objects": k,
            "reference": {**summarise(c["reference"]), "peak_pss_mib": c["ref_pss"], "times_s": c["reference"]},
            "framewise": {**summarise(c["framewise"]), "peak_pss_mib": c["fw_pss"], "times_s": c["framewise"],
                          "session_bank_mib": max(c["session_mib"])},
            "parity": {"min_iou": min(c["ious"]), "mean_iou": float(np.mean(c["ious"])), "frames_objects": len(c["ious"]),
                       "pass": min(c["ious"]) >= MASK_IOU_MIN},
            "parts": parts,
        })
    export = json.loads((args.onnx_dir / "sam2_export.json").read_text()) if args.repository is None else {}
    report = {
        "environment": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": " ".join(sys.argv[1:]) or "defaults", "cores": os.cpu_count(),
            "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
            "weights": export.get("source", "see the repository"), "image_size": s,
            "sequence": str(args.sequence.relative_to(ASSETS.parent)) if args.sequence.is_relative_to(ASSETS.parent)
            else str(args.sequence),
            "frames": args.frames, "rounds": args.rounds, "threads": args.threads,
            "versions": {**versions, "onnxruntime": _version("onnxruntime"), "openvino": _version("openvino")},
            "repository_tuning": tuning_text, "tuning": tuning,
        },
        "framewise_idle_pss_mib": round(idle, 1),
        "framewise_after_last_cell_pss_mib": round(after_last, 1),
        "framewise_after_idle_pss_mib": round(after_idle, 1),
        "cells": report_cells,
        "targets": {"fps_ratio_1_object": 2.0, "fps_ratio_3_objects": 4.0, "mask_iou_min": MASK_IOU_MIN},
    }
    write_report(args.output, args.name, report, markdown(report))
    return 0 if all(c["parity"]["pass"] for c in report_cells) else 1


if __name__ == "__main__":
    sys.exit(main())
