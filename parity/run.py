"""SAMURAI parity: the reference video predictor vs our tracking over the exported ONNX parts.

    .venv-export/bin/python -m parity.run [--frames 30] [--seed 0] [--size tiny]

(``make parity``). Steps:

1. the reference: ``build_sam2_video_predictor(configs/samurai/sam2.1_hiera_<size>.yaml)`` of the
   installed ``sam2`` package (absolutely-not-samurai), samurai_mode on, default post-processing
   overrides, seeded random weights (torch.manual_seed(seed); no checkpoint exists here);
2. the four SAM 2 parts exported from THAT model instance, each checked against its PyTorch code
   path on random inputs (max abs / rel error per output; the batching memory attention and memory
   encoder on 2 rows, each row against the single-object reference);
3. the clip: the first ``--frames`` frames of ../shared/assets/sequences/Crossing, the first
   ground-truth box as the prompt on frame 0; the reference reads the JPEG folder itself
   (``init_state``: PIL resize to S x S, /255, ImageNet normalisation); our predictor gets the very
   same S x S uint8 frames (PIL-resized exactly like the reference's loader, sent as raw RGB8),
   and the box in those S x S pixels computed in float32 as the reference does (box / [W, H] * S),
   so both sides see identical inputs;
4. the reference tracks with ``add_new_points_or_box`` + ``propagate_in_video``, instrumented
   without changing it: a wrapper around ``track_step`` (frame index), around ``_forward_sam_heads``
   (candidates, chosen index, Kalman state after the frame) and a forward pre-hook on
   ``memory_attention`` (which memories and pointers it attends to: each chunk matched exactly
   against the stored per-frame memories / pointers, the temporal-encoding row recovered from the
   position encoding, the pointer distance from its sine encoding);
5. ours: a CPU model repository with the exported parts (build_cpu_repository(sam2_onnx_dir=...)),
   a real Triton started like tests/conftest.py does (ManagedTriton), and VideoPredictor.step()
   driven in-process frame by frame (shared memory on, as the server runs it), instrumented by
   wrapping CandidateSelector.select, MemoryBank.select_for and mask_at_resolution;
6. per frame: chosen candidate, mask IoU (both low-res logits upsampled to S x S the same way,
   > 0), Kalman mean and covariance, memory frames + temporal rows, pointer frames + distances.
   Results: bench/results/parity.json and parity.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
DEFAULT_SEQUENCE = ASSETS / "sequences" / "Crossing"
YOLO_ONNX = ASSETS / "models" / "yolov8n_int8.onnx"

MASK_IOU_MIN = 0.99
KF_TOL = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", type=Path, default=DEFAULT_SEQUENCE, help="OTB folder (img/, groundtruth_rect.txt)")
    parser.add_argument("--frames", type=int, default=30, help="frames to track (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed of the random weights")
    parser.add_argument("--size", default="tiny", help="hiera size (default tiny)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "parity", help="scratch folder")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where parity.json/.md go")
    parser.add_argument("--default-only", action="store_true",
                        help="only the default SAMURAI config (skip the 'branches' scenario)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="torch threads and ONNX Runtime intra-op threads per Triton instance")
    args = parser.parse_args(argv)

    import torch

    from engines.export import sam2_parts

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)

    size = sam2_parts.canonical_size(args.size)
    log(f"building the reference SAMURAI predictor ({sam2_parts.config_name(size)}, seed {args.seed})")
    model = sam2_parts.build_predictor(size, None, seed=args.seed)
    s = int(model.image_size)
    source = sam2_parts.source_description(size, None, args.seed)
    onnx_dir = work / "sam2_onnx"
    log(f"exporting the four parts from that model instance into {onnx_dir}")
    parts = sam2_parts.export_model(model, onnx_dir, source=source, seed=args.seed, log=log)

    frames_dir, box_xyxy, (width, height) = prepare_clip(args.sequence, args.frames, work / "frames")
    frames = load_frames_like_reference(frames_dir, s)
    box_model = model_box(box_xyxy, width, height, s)
    log(f"clip {args.sequence.name}: {len(frames)} frames {width}x{height}, prompt box {box_xyxy} "
        f"-> {[round(v, 3) for v in box_model]} in the {s}x{s} model frame")

    t0 = time.perf_counter()
    scenarios: dict[str, dict[str, Any]] = {"default": {}}
    references = {"default": run_reference(model, frames_dir, box_xyxy, {})}
    if not args.default_only:
        branches = branch_overrides(references["default"])
        if branches:
            scenarios["branches"] = branches
            log(f"scenario 'branches': {branches}")
            references["branches"] = run_reference(model, frames_dir, box_xyxy, branches)
    reference_s = time.perf_counter() - t0
    log(f"reference tracked {len(scenarios)} x {len(frames)} frames in {reference_s:.0f} s")

    t0 = time.perf_counter()
    repo = build_repository(onnx_dir, work / "model_repository_cpu", s, args.threads)
    ours_runs = asyncio.run(run_ours(repo, work, frames, box_model, size, scenarios))
    ours_s = time.perf_counter() - t0
    log(f"ours tracked {len(scenarios)} x {len(frames)} frames in {ours_s:.0f} s "
        f"(repository build + Triton start included)")

    report = compare(references["default"], ours_runs["default"], model, s)
    report["scenarios"] = {}
    for name, overrides in scenarios.items():
        if name != "default":
            report["scenarios"][name] = {"overrides": overrides,
                                         **compare(references[name], ours_runs[name], model, s)}
    report["summary"]["scenarios_pass"] = {name: r["summary"]["pass"] for name, r in report["scenarios"].items()}
    report["summary"]["pass"] = report["summary"]["pass"] and all(report["summary"]["scenarios_pass"].values())
    report["setup"] = {
        "sequence": str(args.sequence.relative_to(ASSETS.parent)) if args.sequence.is_relative_to(ASSETS.parent)
        else str(args.sequence),
        "frames": len(frames), "video_size": [width, height], "image_size": s,
        "prompt_box_xyxy_video": box_xyxy, "prompt_box_xyxy_model": box_model,
        "weights": source, "config": sam2_parts.config_name(size), "seed": args.seed,
        "samurai": {k: getattr(model, k) for k in (
            "samurai_mode", "kf_score_weight", "stable_frames_threshold", "stable_ious_threshold",
            "min_obj_score_logits", "memory_bank_iou_threshold", "memory_bank_obj_score_threshold",
            "memory_bank_kf_score_threshold", "num_maskmem", "max_obj_ptrs_in_encoder",
            "binarize_mask_from_pts_for_mem_enc")},
        "fill_hole_area": model.fill_hole_area,
        "versions": sam2_parts._versions(),
        "reference_s": round(reference_s, 1), "ours_s": round(ours_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    report["parts"] = {name: part.to_dict()["check"] for name, part in parts.items()}
    report["tolerances"] = {
        "parts": {name: {"rtol": r, "atol": a} for name, (r, a) in sam2_parts.TOLERANCES.items()},
        "mask_iou_min": MASK_IOU_MIN, "kalman_abs": KF_TOL,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "parity.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (args.results / "parity.md").write_text(markdown(report))
    log(f"wrote {args.results / 'parity.json'} and {args.results / 'parity.md'}")
    summary = report["summary"]
    print(json.dumps(summary, indent=2, default=_jsonable))
    return 0 if summary["pass"] else 1


def log(message: str) -> None:
    print(f"[parity] {message}", flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------------------------
# The clip
# ---------------------------------------------------------------------------------------------


def prepare_clip(sequence: Path, count: int, folder: Path) -> tuple[Path, list[float], tuple[int, int]]:
    """The first ``count`` JPEGs linked into ``folder`` (the reference's loader reads a folder of
    <int>.jpg), the first ground-truth box as x1, y1, x2, y2 and the video size."""
    from PIL import Image

    images = sorted((sequence / "img").glob("*.jpg"))[:count]
    if len(images) < 2:
        raise SystemExit(f"{sequence}: needs at least 2 frames in img/")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for image in images:
        (folder / image.name).symlink_to(image.resolve())
    first = (sequence / "groundtruth_rect.txt").read_text().splitlines()[0]
    x, y, w, h = (float(v) for v in first.replace(",", " ").split())
    with Image.open(images[0]) as im:
        size = im.size
    return folder, [x, y, x + w, y + h], size


def load_frames_like_reference(folder: Path, s: int) -> list[np.ndarray]:
    """sam2.utils.misc._load_img_as_tensor before its /255: PIL convert("RGB").resize((S, S))."""
    from PIL import Image

    frames = []
    for path in sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem)):
        with Image.open(path) as im:
            frames.append(np.ascontiguousarray(np.array(im.convert("RGB").resize((s, s)))))
    return frames


def model_box(box: list[float], width: int, height: int, s: int) -> list[float]:
    """add_new_points_or_box: box / [W, H] * S in float32."""
    b = np.asarray(box, np.float32).reshape(2, 2)
    scaled = (b / np.array([width, height], np.float32)) * np.float32(s)
    return [float(v) for v in scaled.astype(np.float32).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def branch_overrides(reference: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """SAMURAI thresholds placed between values the default run produced, so that the branches the
    default config never takes with random weights run too: frames rejected from the memory bank
    (predicted IoU / object score under the bank thresholds), warm-up and stable-phase restarts
    (predicted IoU under stable_ious_threshold), a short warm-up. Midpoints between observed
    values: no comparison sits on a knife edge. Empty when the run has too few distinct values."""
    tracked = [r for t, r in reference.items() if t >= 1 and r.get("predicted_iou") is not None]
    ious = sorted({float(r["predicted_iou"]) for r in tracked})
    scores = sorted({float(r["object_score"]) for r in tracked})
    if len(ious) < 3 or len(scores) < 3:
        return {}

    def between(values: list[float], q: float) -> float:
        i = min(max(int(q * (len(values) - 1)), 0), len(values) - 2)
        return (values[i] + values[i + 1]) / 2

    return {
        "memory_bank_iou_threshold": between(ious, 0.5),
        "memory_bank_obj_score_threshold": between(scores, 0.5),
        "stable_ious_threshold": between(ious, 0.25),
        "stable_frames_threshold": 4,
    }


def run_reference(model, frames_dir: Path, box: list[float], overrides: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """One reference run; ``overrides`` set SAMURAI attributes of the model for this run only."""
    import torch
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    saved = {key: getattr(model, key) for key in overrides}
    for key, value in overrides.items():
        setattr(model, key, value)
    model.kf_mean, model.kf_covariance, model.stable_frames, model.frame_cnt = None, None, 0, 0

    records: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] = {"frame": None, "state": None}

    original_track_step = model.track_step
    original_heads = model._forward_sam_heads

    def track_step(*args, **kwargs):
        current["frame"] = kwargs["frame_idx"] if "frame_idx" in kwargs else args[0]
        return original_track_step(*args, **kwargs)

    def forward_sam_heads(*args, **kwargs):
        out = original_heads(*args, **kwargs)
        low_multi, _, ious, low_masks, _, _, score, best_iou, kf_score = out
        n = low_multi.shape[1]
        index = next((i for i in range(n) if torch.equal(low_multi[0, i], low_masks[0, 0])), -1)
        rec = records.setdefault(current["frame"], {})
        rec.update(
            candidates=n, index=index, ious=ious[0].float().tolist(), object_score=float(score.reshape(-1)[0]),
            predicted_iou=float(best_iou), kf_score=None if kf_score is None else float(kf_score),
            kf_mean=None if model.kf_mean is None else np.array(model.kf_mean, dtype=np.float64),
            kf_cov=None if model.kf_covariance is None else np.array(model.kf_covariance, dtype=np.float64),
            stable_frames=int(model.stable_frames),
        )
        return out

    tpos_rows = model.maskmem_tpos_enc[:, 0, 0, :].float()  # [num_maskmem, 64]

    def memory_hook(module, args, kwargs):
        frame = current["frame"]
        state = current["state"]
        memory, memory_pos = kwargs["memory"][:, 0].float(), kwargs["memory_pos"][:, 0].float()
        num_ptr = int(kwargs["num_obj_ptr_tokens"])
        curr = kwargs["curr"][0] if isinstance(kwargs["curr"], list) else kwargs["curr"]
        hw = curr.shape[0]
        stored = {**state["output_dict"]["cond_frame_outputs"], **state["output_dict"]["non_cond_frame_outputs"]}
        pos_enc = state["constants"]["maskmem_pos_enc"][0][0].float().flatten(1).permute(1, 0)  # [HW,64]
        n_mem = (memory.shape[0] - num_ptr) // hw
        memory_frames, rows = [], []
        for k in range(n_mem):
            chunk = memory[k * hw:(k + 1) * hw]
            match = [t for t, out in stored.items() if out.get("maskmem_features") is not None
                     and torch.equal(out["maskmem_features"][0].float().flatten(1).permute(1, 0), chunk)]
            memory_frames.append(match[0] if len(match) == 1 else (match or None))
            delta = (memory_pos[k * hw:(k + 1) * hw] - pos_enc).mean(dim=0)
            rows.append(int(torch.argmin((tpos_rows - delta).abs().amax(dim=1))))
        tokens = memory[n_mem * hw:]
        split = model.hidden_dim // model.mem_dim if model.mem_dim < model.hidden_dim else 1
        ptrs = tokens.reshape(-1, split * model.mem_dim)
        ptr_frames = []
        for p in ptrs:
            match = [t for t, out in stored.items() if torch.equal(out["obj_ptr"][0].float(), p)]
            ptr_frames.append(match[0] if len(match) == 1 else (match or None))
        t_diff_max = min(state["num_frames"], model.max_obj_ptrs_in_encoder) - 1
        cands = torch.arange(-64, 65)
        cand_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(cands / t_diff_max, dim=model.hidden_dim))
        tdiffs = []
        for p in memory_pos[n_mem * hw::split]:
            tdiffs.append(int(cands[torch.argmin((cand_pos - p).abs().amax(dim=1))]))
        records.setdefault(frame, {}).update(
            memory_frames=memory_frames, memory_tpos=rows, ptr_frames=ptr_frames, ptr_tdiff=tdiffs)

    model.track_step = track_step
    model._forward_sam_heads = forward_sam_heads
    handle = model.memory_attention.register_forward_pre_hook(memory_hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            state = model.init_state(video_path=str(frames_dir))
            current["state"] = state
            model.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=box)
            for frame_idx, _, _ in model.propagate_in_video(state):
                out = state["output_dict"]["cond_frame_outputs"].get(frame_idx) or \
                    state["output_dict"]["non_cond_frame_outputs"][frame_idx]
                records.setdefault(frame_idx, {})["low_res_mask"] = out["pred_masks"][0, 0].float().numpy().copy()
    finally:
        handle.remove()
        del model.track_step
        del model._forward_sam_heads
        for key, value in saved.items():
            setattr(model, key, value)
    return records


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def build_repository(onnx_dir: Path, output: Path, s: int, threads: int) -> Path:
    from engines.cpu_repository import build_cpu_repository

    # fp32 on purpose: this suite checks that our arithmetic IS the reference's (Kalman state to
    # 1e-4, the same candidate chosen on every frame), which bf16 would blur; what the default build
    # does on a bf16 CPU is checked against the reference's masks by bench/real_sam2_bench.py.
    return build_cpu_repository(output, YOLO_ONNX, sam2_image_size=s, sam2_onnx_dir=onnx_dir,
                                intra_op_threads=max(1, threads), sam2_precision="f32")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_ours(repo: Path, work: Path, frames: list[np.ndarray], box: list[float], size: str,
                   scenarios: dict[str, dict[str, Any]]) -> dict[str, dict[int, dict]]:
    from grpc_health.v1.health import aio as health_aio
    from prometheus_client import CollectorRegistry

    from server.metrics import Metrics
    from server.sam2 import contract as sam2
    from server.sam2 import video_predictor as video_predictor_module
    from server.sam2.samurai import CandidateSelector, MemoryBank, SamuraiConfig
    from server.sam2.session import TrackingSession
    from server.sam2.video_predictor import VideoPredictor
    from server.triton.client import TritonClient
    from server.triton.launcher import ManagedTriton, TritonPorts
    from server.triton.monitor import TritonMonitor
    from server.triton.runner import InferenceRunner

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    records: dict[int, dict[str, Any]] = {}
    current = {"frame": None}
    original_select_for = MemoryBank.select_for
    original_select = CandidateSelector.select
    original_mask = video_predictor_module.mask_at_resolution

    def select_for(self, frame_idx, num_frames=None):
        selection = original_select_for(self, frame_idx, num_frames)
        records.setdefault(frame_idx, {}).update(
            memory_frames=list(selection.memory_frames), memory_tpos=list(selection.tpos_enc_index),
            ptr_frames=list(selection.obj_ptr_frames), ptr_tdiff=list(selection.obj_ptr_tdiff))
        return selection

    def select(self, mask_logits, predicted_ious, object_score_logit):
        result = original_select(self, mask_logits, predicted_ious, object_score_logit)
        records.setdefault(current["frame"], {}).update(
            # the candidates are the last 3 dims [N,h,w]: however the caller slices its batch
            candidates=int(np.asarray(mask_logits).shape[-3]), index=result.index,
            ious=[float(v) for v in np.asarray(predicted_ious).reshape(-1)], object_score=float(object_score_logit),
            predicted_iou=result.predicted_iou, kf_score=result.kf_score, phase=result.phase,
            restarted=result.restarted,
            kf_mean=None if self.mean is None else np.array(self.mean, dtype=np.float64),
            kf_cov=None if self.covariance is None else np.array(self.covariance, dtype=np.float64),
            stable_frames=int(self.stable_frames))
        return result

    def mask_at_resolution(mask_logits, width, height):
        # the object's [h,w] logits; a caller holding a [1,h,w] row of a batch gives the same mask
        logits = np.array(mask_logits, dtype=np.float32)
        records.setdefault(current["frame"], {})["low_res_mask"] = logits.reshape(logits.shape[-2:])
        return original_mask(mask_logits, width, height)

    ports = TritonPorts(grpc=_free_port(), http=_free_port(), metrics=_free_port())
    managed = ManagedTriton(repo, work / "triton", ports, restart_on_exit=False, startup_timeout_s=600)
    (work / "triton").mkdir(parents=True, exist_ok=True)
    metrics = Metrics(CollectorRegistry())
    await managed.start()
    client = TritonClient(managed.url, metrics=metrics, default_timeout_s=900)
    runner = InferenceRunner(client, metrics, shm_slots_per_model=2)
    MemoryBank.select_for = select_for
    CandidateSelector.select = select
    video_predictor_module.mask_at_resolution = mask_at_resolution
    try:
        monitor = TritonMonitor(client, {"parity": sam2.TRACKING_MODELS}, health_aio.HealthServicer(), metrics)
        await monitor.refresh()
        predictor = VideoPredictor(runner, monitor, max_pixels=1 << 30)
        for name in sam2.MODELS:
            spec = monitor.require_ready(name)
            if spec.stand_in:
                raise SystemExit(f"{name} is a stand-in in {repo}: the parity run needs the real export")
        for name, overrides in scenarios.items():
            records = runs[name] = {}
            await _track(predictor, TrackingSession(SamuraiConfig.for_model(size, **overrides)),  # type: ignore[arg-type]
                         frames, box, records, current, name)
    finally:
        MemoryBank.select_for = original_select_for
        CandidateSelector.select = original_select
        video_predictor_module.mask_at_resolution = original_mask
        await runner.close()
        await client.close()
        await managed.stop()
    return runs


async def _track(predictor, session, frames, box, records, current, name) -> None:
    from framewise.v1 import common_pb2
    from server.sam2.prompts import ObjectPrompt

    h, w = frames[0].shape[:2]
    for t, frame in enumerate(frames):
        current["frame"] = t
        image = common_pb2.Image(raw=common_pb2.RawFrame(
            width=w, height=h, pixel_format=common_pb2.PIXEL_FORMAT_RGB8, data=frame.tobytes()))
        prompts = [ObjectPrompt(1, tuple(box), ())] if t == 0 else []  # type: ignore[arg-type]
        started = time.perf_counter()
        outcome = await predictor.step(session, None, image, prompts, [], timeout_s=900)
        records.setdefault(t, {}).update(candidate_index_0_3=outcome.objects[0].candidate_index,
                                         seconds=time.perf_counter() - started)
        log(f"ours ({name}): frame {t} in {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------------------------


def _upsampled(logits: np.ndarray, s: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)[0, 0].numpy() > 0


def compare(reference: dict[int, dict], ours: dict[int, dict], model, s: int) -> dict[str, Any]:
    rows = []
    frames = sorted(set(reference) & set(ours))
    for t in frames:
        ref, our = reference[t], ours[t]
        row: dict[str, Any] = {"frame": t}
        # candidate index in the same space: reference 0..2 for multimask frames, 0 for a single mask
        our_index = our.get("index")
        row["ref_index"], row["our_index"] = ref.get("index"), our_index
        row["index_match"] = ref.get("index") == our_index
        row["ref_predicted_iou"], row["our_predicted_iou"] = ref.get("predicted_iou"), our.get("predicted_iou")
        row["ref_object_score"], row["our_object_score"] = ref.get("object_score"), our.get("object_score")
        row["ref_kf_score"], row["our_kf_score"] = ref.get("kf_score"), our.get("kf_score")
        row["phase"], row["restarted"] = our.get("phase"), our.get("restarted", False)
        rm, om = ref.get("low_res_mask"), our.get("low_res_mask")
        if rm is not None and om is not None:
            a, b = _upsampled(rm, s), _upsampled(om, s)
            union = int(np.count_nonzero(a | b))
            row["mask_iou"] = 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)
            row["mask_pixels_ref"], row["mask_pixels_ours"] = int(a.sum()), int(b.sum())
            finite = (np.abs(rm) < 1000) & (np.abs(om) < 1000)
            row["logit_max_abs_diff"] = float(np.abs(rm - om)[finite].max(initial=0.0))
        else:
            row["mask_iou"] = None
        for key in ("kf_mean", "kf_cov"):
            r, o = ref.get(key), our.get(key)
            if r is None and o is None:
                row[f"{key}_max_abs_err"] = 0.0
            elif r is None or o is None:
                row[f"{key}_max_abs_err"] = float("inf")
            else:
                row[f"{key}_max_abs_err"] = float(np.abs(np.asarray(r) - np.asarray(o)).max())
        row["ref_stable_frames"], row["our_stable_frames"] = ref.get("stable_frames"), our.get("stable_frames")
        for key in ("memory_frames", "memory_tpos", "ptr_frames", "ptr_tdiff"):
            row[f"ref_{key}"], row[f"our_{key}"] = ref.get(key), our.get(key)
        row["memory_match"] = (ref.get("memory_frames") == our.get("memory_frames")
                               and ref.get("memory_tpos") == our.get("memory_tpos"))
        row["pointer_match"] = (ref.get("ptr_frames") == our.get("ptr_frames")
                                and ref.get("ptr_tdiff") == our.get("ptr_tdiff"))
        rows.append(row)

    ious = [r["mask_iou"] for r in rows if r["mask_iou"] is not None]
    kf_mean = max((r["kf_mean_max_abs_err"] for r in rows), default=0.0)
    kf_cov = max((r["kf_cov_max_abs_err"] for r in rows), default=0.0)
    mismatches = {
        "candidate_index": [r["frame"] for r in rows if not r["index_match"]],
        "memory_frames_or_tpos": [r["frame"] for r in rows if not r["memory_match"]],
        "pointer_frames_or_tdiff": [r["frame"] for r in rows if not r["pointer_match"]],
        "mask_iou_below_min": [r["frame"] for r in rows if r["mask_iou"] is None or r["mask_iou"] < MASK_IOU_MIN],
        "kalman_over_tol": [r["frame"] for r in rows if max(r["kf_mean_max_abs_err"], r["kf_cov_max_abs_err"]) > KF_TOL],
    }
    summary = {
        "frames_compared": len(rows),
        "frames_reference": len(reference), "frames_ours": len(ours),
        "min_mask_iou": min(ious) if ious else None,
        "mean_mask_iou": float(np.mean(ious)) if ious else None,
        "max_logit_abs_diff": max((r.get("logit_max_abs_diff", 0.0) for r in rows), default=0.0),
        "max_kf_mean_abs_err": kf_mean, "max_kf_cov_abs_err": kf_cov,
        "mismatches": mismatches,
        "stable_phase_frames": [r["frame"] for r in rows if r.get("phase") == "stable"],
        "restart_frames": [r["frame"] for r in rows if r.get("restarted")],
        # tracked frames (>= 1) that no later frame's memory selection took, though inside its window
        "unusable_memory_frames": _unused_memory_frames(rows),
        "kalman_changed_pick_frames": [r["frame"] for r in rows if r.get("phase") == "stable"
                                       and r["our_index"] is not None and r["ref_index"] is not None
                                       and ours[r["frame"]].get("ious") is not None
                                       and r["our_index"] != int(np.argmax(ours[r["frame"]]["ious"]))],
    }
    summary["pass"] = (len(rows) == len(reference) == len(ours) and not any(mismatches.values()))
    return {"summary": summary, "frames": rows}


def _unused_memory_frames(rows: list[dict[str, Any]]) -> list[int]:
    """Tracked frames t >= 2 that frame t + 2 does not attend to: frame t + 1 always takes t as its
    previous frame, frame t + 2 only when t was usable (predicted IoU, object score, kf score over
    the bank thresholds). The reference never walks back to frame 1 (its quirk), so 1 is left out."""
    memories = {r["frame"]: set(r.get("our_memory_frames") or []) for r in rows}
    return [t for t in sorted(memories) if t >= 2 and t + 2 in memories and t not in memories[t + 2]]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _summary_lines(s: dict[str, Any]) -> list[str]:
    return [
        (f"**{'PASS' if s['pass'] else 'FAIL'}**: {s['frames_compared']} frames compared; "
         f"min mask IoU {_fmt(s['min_mask_iou'], 6)} (required >= {MASK_IOU_MIN}); max Kalman error "
         f"mean {_fmt(s['max_kf_mean_abs_err'])} / covariance {_fmt(s['max_kf_cov_abs_err'])} (tolerance {KF_TOL}); "
         f"max low-res logit difference {_fmt(s['max_logit_abs_diff'])}."),
        "",
        "Mismatches (frame lists): " + ", ".join(f"{k}: {v or 'none'}" for k, v in s["mismatches"].items()) + ".",
        "",
        (f"Phases (ours, identical in the reference by the Kalman state): warm-up restarts on frames "
         f"{s.get('restart_frames') or 'none'}; stable-phase frames {s['stable_phase_frames'] or 'none'}; frames whose "
         f"pick the Kalman score changed (not the argmax predicted IoU): {s['kalman_changed_pick_frames'] or 'none'}; "
         f"tracked frames left out of the memory bank: {s.get('unusable_memory_frames') or 'none'}."),
    ]


def _frame_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        ("| frame | phase | idx ref/ours | pred IoU ref/ours | obj score ref/ours | mask IoU | logit diff | KF mean err | "
         "KF cov err | memories ref | memories ours | pointers ref | pointers ours |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def mem(side, r=r):
            frames, tpos = r.get(f"{side}_memory_frames"), r.get(f"{side}_memory_tpos")
            return "-" if frames is None else " ".join(f"{f}({t})" for f, t in zip(frames, tpos))

        def ptr(side, r=r):
            frames, diffs = r.get(f"{side}_ptr_frames"), r.get(f"{side}_ptr_tdiff")
            if frames is None:
                return "-"
            return " ".join(f"{f}" for f in frames) + f" (d {','.join(str(d) for d in diffs)})"

        flag = "" if r["index_match"] else " ≠"
        phase = (r.get("phase") or "-") + (" restart" if r.get("restarted") else "")
        lines.append(
            f"| {r['frame']} | {phase} | {r['ref_index']}/{r['our_index']}{flag} | "
            f"{_fmt(r['ref_predicted_iou'])}/{_fmt(r['our_predicted_iou'])} | {_fmt(r['ref_object_score'])}/"
            f"{_fmt(r['our_object_score'])} | {_fmt(r['mask_iou'], 6)} | {_fmt(r.get('logit_max_abs_diff'))} | "
            f"{_fmt(r['kf_mean_max_abs_err'])} | {_fmt(r['kf_cov_max_abs_err'])} | {mem('ref')} | "
            f"{mem('our')}{'' if r['memory_match'] else ' ≠'} | {ptr('ref')} | {ptr('our')}"
            f"{'' if r['pointer_match'] else ' ≠'} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    s, setup = report["summary"], report["setup"]
    lines = [
        "# SAMURAI parity: reference video predictor vs Framewise tracking over the exported ONNX parts",
        "",
        (f"Generated by `make parity` (`parity/run.py`). Clip `{setup['sequence']}`, first {setup['frames']} frames "
         f"({setup['video_size'][0]}x{setup['video_size'][1]}), prompt = first ground-truth box "
         f"{[round(v, 1) for v in setup['prompt_box_xyxy_video']]} on frame 0. Model: {setup['weights']}, "
         f"`{setup['config']}`, S={setup['image_size']}. Reference: `SAM2VideoPredictor` of "
         f"absolutely-not-samurai {setup['versions'].get('absolutely-not-samurai', '?')} (samurai_mode on, "
         f"kf_score_weight {setup['samurai']['kf_score_weight']}, built by `build_sam2_video_predictor` with its "
         f"default post-processing overrides), torch {setup['versions'].get('torch', '?')} on CPU. "
         f"Ours: `VideoPredictor` (server/sam2/video_predictor.py) over the four parts exported from that same model "
         f"instance, served by a real Triton (python backend, ONNX Runtime {setup['versions'].get('onnxruntime', '?')}"
         f", shared memory). Both sides get the same {setup['image_size']}x{setup['image_size']} uint8 frames (the "
         f"reference loader's PIL resize; ours would otherwise resize with OpenCV) and the same prompt box in model "
         f"pixels (float32 box / [W, H] * S)."),
        "",
        f"## Overall: {'PASS' if s['pass'] else 'FAIL'}",
        "",
        "### Scenario `default` (the SAMURAI config as shipped)",
        "",
        *_summary_lines(s),
    ]
    for name, scenario in report.get("scenarios", {}).items():
        lines += [
            "",
            f"### Scenario `{name}`",
            "",
            ("Same weights and clip; SAMURAI thresholds moved between values the default run produced, on both "
             "sides, so that the branches random weights never reach with the shipped config run too: "
             f"`{json.dumps(scenario['overrides'])}`."),
            "",
            *_summary_lines(scenario["summary"]),
        ]
    lines += [
        "",
        "## Per-part export checks (ONNX Runtime vs PyTorch, random inputs)",
        "",
        "| part | output | max abs err | max rel err | tolerance (atol + rtol·|ref|) | ok |",
        "|---|---|---|---|---|---|",
    ]
    for name, check in report["parts"].items():
        if not check:
            continue
        for out in check["outputs"]:
            lines.append(f"| {name} | {out['name']} {list(out['shape'])} | {out['max_abs']:.2e} | {out['max_rel']:.2e} "
                         f"| {check['atol']:g} + {check['rtol']:g}·|ref| | {'yes' if out['ok'] else 'NO'} |")
    legend = ("Candidate index: reference `best_iou_inds` among the 3 multimask candidates (0 = the single mask on "
              "the prompt frame) vs ours (`CandidateSelector`). Mask IoU: both low-res logits upsampled to SxS the "
              "same way, > 0. KF: max abs difference of the Kalman mean / covariance after the frame. Memories: "
              "frames (row of maskmem_tpos_enc) the memory attention reads; pointers: frames (signed distance).")
    lines += ["", "## Per frame, scenario `default`", "", legend, "", *_frame_table(report["frames"])]
    for name, scenario in report.get("scenarios", {}).items():
        lines += ["", f"## Per frame, scenario `{name}`", "", *_frame_table(scenario["frames"])]
    lines += ["", (f"Times: reference {setup['reference_s']} s, ours {setup['ours_s']} s, total {setup['total_s']} s "
                   f"(2 CPU cores)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
