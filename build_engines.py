#!/usr/bin/env python3
"""Build Framewise model repositories for Triton.

    python build_engines.py --target cpu        # CPU repository: python backend + ONNX Runtime
    python build_engines.py --target onnx       # export the real networks to ONNX (export env)
    python build_engines.py --target tensorrt   # FP16 TensorRT plans into model_repository/ (on the GPU)

cpu: yolov8 (the real int8 weights, --yolo-onnx), matting (the real U^2-Netp weights,
--u2netp-onnx; S = 320 from the graph) and the four SAM 2 parts as STAND-IN contract models
(exact tensor contracts, no learned meaning: no SAM 2 weights on these machines), sized by
--sam2-image-size.

onnx (needs the export environment: `make export-env`, then `.venv-export/bin/python
build_engines.py --target onnx ...`): YOLOv8 through Ultralytics (--yolo-weights FILE.pt, or
--random-init: yolov8n.yaml with seeded random weights), the GPU's matting network, BiRefNet,
from a local Hugging Face snapshot folder (--birefnet-snapshot DIR; there is no BiRefNet without
one; written as matting.onnx, the Triton model it serves), the SAM 2 parts through
engines/export/sam2_parts.py (export_parts) at --sam2-image-size. Every graph has the contract of
the CPU repository (uint8 NHWC images in, preprocessing inside), is checked by onnx.checker and compared with PyTorch in
ONNX Runtime on random inputs (max abs/rel errors printed, tolerances stated), and EXPORT.json
records it all.

tensorrt (inside nvcr.io/nvidia/tensorrt:24.10-py3 on the T4): FP16 plans built from those
ONNX files with the TensorRT Python API, optimization profiles for the dynamic dims, written as
model_repository/<model>/1/model.sm<cc>.plan (cc_model_filenames in the committed configs). It
stops with exit status 2 before writing anything when TensorRT, a CUDA GPU, an ONNX file or a
config is missing.

torch, ultralytics and tensorrt are imported only on those paths, never for --target cpu.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from engines.cpu_tuning import SAM2_PRECISION_CHOICES

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUTPUT = {
    "cpu": REPO_ROOT / ".cache" / "model_repository_cpu",
    "onnx": REPO_ROOT / ".cache" / "onnx",
    "tensorrt": REPO_ROOT / "model_repository",
}
SAM2_PARTS = ("sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder")
ALL_MODELS = ("yolov8", "matting", *SAM2_PARTS)
# --models also takes the network the GPU serves as `matting`.
MODEL_ALIASES = {"birefnet": "matting"}
BIREFNET_SNAPSHOT_ENV = "FRAMEWISE_BIREFNET_SNAPSHOT"
EXPORT_REPORT = "EXPORT.json"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _sam2_image_size(text: str) -> int:
    value = int(text)
    if value < 64 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16, >= 64; got {value}")
    return value


def _models(text: str) -> tuple[str, ...]:
    chosen: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        names = SAM2_PARTS if item == "sam2" else ALL_MODELS if item == "all" else (MODEL_ALIASES.get(item, item),)
        for name in names:
            if name not in ALL_MODELS:
                raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from all, sam2, {', '.join(ALL_MODELS)} "
                                                 f"(birefnet = matting)")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise argparse.ArgumentTypeError("no model named")
    return tuple(chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["cpu", "onnx", "tensorrt"], default="cpu")
    parser.add_argument("--output", type=Path,
                        help="cpu: repository directory (default .cache/model_repository_cpu); onnx: folder of "
                             "<model>.onnx files (default .cache/onnx); tensorrt: the GPU repository whose "
                             "committed configs the plans go beside (default model_repository/)")
    parser.add_argument("--force", action="store_true", help="cpu: rebuild even when up to date")

    cpu = parser.add_argument_group("--target cpu")
    cpu.add_argument("--yolo-onnx", type=Path,
                     help="YOLOv8 ONNX weights (default: $FRAMEWISE_YOLO_ONNX, else "
                          "../shared/assets/models/yolov8n_int8.onnx next to the repo)")
    cpu.add_argument("--u2netp-onnx", type=Path,
                     help="U^2-Netp ONNX weights served as `matting` (default: $FRAMEWISE_U2NETP_ONNX, else "
                          "../shared/assets/models/u2netp.onnx next to the repo)")
    cpu.add_argument("--cpu-cores", type=_positive_int, default=None,
                     help="tune instances and ONNX Runtime threads for this many cores (default: the cores "
                          "this process may use, CPU affinity and cgroup quota; engines/cpu_tuning.py)")
    cpu.add_argument("--instances", type=_positive_int, default=None,
                     help="Triton instances of yolov8 (default: tuned for the cores)")
    cpu.add_argument("--intra-op-threads", type=_positive_int, default=None,
                     help="ONNX Runtime intra-op threads per instance, every model (default: tuned for the cores)")
    cpu.add_argument("--max-batch-size", type=_positive_int, default=8, help="yolov8 max batch size")
    cpu.add_argument("--max-queue-delay-us", type=_non_negative_int, default=0,
                     help="dynamic batching max queue delay in microseconds (default 0: on CPU the model "
                          "runs a batch's images one by one, so waiting for a batch only adds latency)")
    cpu.add_argument("--sam2-onnx-dir", type=Path, default=None,
                     help="serve the real SAM 2 parts exported into this folder (<part>.onnx, by "
                          "engines/export/sam2_parts.py or --target onnx) instead of the stand-ins")
    cpu.add_argument("--sam2-precision", choices=SAM2_PRECISION_CHOICES, default="auto",
                     help="the SAM 2 parts' arithmetic: f32 (ONNX Runtime), bf16 (OpenVINO; for CPUs with AMX "
                          "or AVX512-BF16) or auto (default: bf16 for real parts where the CPU has it, else f32; "
                          "engines/cpu_tuning.py)")
    parser.add_argument("--sam2-image-size", type=_sam2_image_size, default=1024,
                        help="SAM 2 model size S: image S x S, features S/16, masks S/4 (default 1024). "
                             "cpu: the stand-ins' size, and the size --sam2-onnx-dir's parts must have; onnx: "
                             "the size the real parts are exported at (a multiple of 32 for SAM 2.1's hiera)")

    onnx = parser.add_argument_group("--target onnx (and --models for tensorrt)")
    onnx.add_argument("--models", type=_models, default=ALL_MODELS,
                      help="comma-separated: all (default), yolov8, matting (BiRefNet on the GPU; `birefnet` "
                           "works too), sam2 (the four parts) or a part")
    onnx.add_argument("--random-init", action="store_true",
                      help="seeded random weights: YOLOv8 from yolov8n.yaml, SAM 2 from its config; BiRefNet "
                           "only with --birefnet-snapshot (its architecture code lives in the snapshot)")
    onnx.add_argument("--seed", type=int, default=0, help="seed of --random-init and of the check inputs")
    onnx.add_argument("--yolo-weights", type=Path, help="Ultralytics YOLOv8 checkpoint (.pt)")
    onnx.add_argument("--yolo-variant", default="yolov8n", help="architecture for --random-init (default yolov8n)")
    onnx.add_argument("--yolo-end2end", action="store_true",
                      help="also write yolov8_end2end.onnx (NMS inside, batch 1: output0 [1,300,6] x1,y1,x2,y2,score,"
                           "class; not served by model_repository/)")
    onnx.add_argument("--birefnet-snapshot", type=Path,
                      default=Path(os.environ[BIREFNET_SNAPSHOT_ENV]) if os.environ.get(BIREFNET_SNAPSHOT_ENV) else None,
                      help="local Hugging Face snapshot folder of BiRefNet (lite preferred on a T4): config.json, "
                           f"its modelling code, model.safetensors (default ${BIREFNET_SNAPSHOT_ENV})")
    onnx.add_argument("--sam2-checkpoint", type=Path, help="SAM 2.1 checkpoint (.pt) for the SAM 2 parts")
    onnx.add_argument("--sam2-size", default="tiny",
                      help="SAM 2.1 hiera size: tiny (default, the T4 budget's), small, base_plus, large")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; >= 16 for GridSample)")
    onnx.add_argument("--check-batch", type=_positive_int, default=None,
                      help="batch size of the ORT-vs-PyTorch check inputs (default: 2 for YOLOv8, 1 for BiRefNet)")

    trt = parser.add_argument_group("--target tensorrt")
    trt.add_argument("--onnx-dir", type=Path, default=DEFAULT_OUTPUT["onnx"],
                     help="where the ONNX files are (default .cache/onnx, --target onnx's default output)")
    trt.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace (GiB)")
    trt.add_argument("--allow-trt-mismatch", action="store_true",
                     help="build with a TensorRT other than the pinned one (the serving Triton must match it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target == "cpu":
        return _run_cpu(args)
    if args.target == "onnx":
        return _run_onnx(args)
    return _run_tensorrt(args)


# --- cpu ------------------------------------------------------------------------------------------

def _run_cpu(args: argparse.Namespace) -> int:
    from engines.cpu_repository import (
        MissingWeightsError,
        build_cpu_repository,
        default_u2netp_onnx,
        default_yolo_onnx,
        read_manifest,
    )

    output = args.output or DEFAULT_OUTPUT["cpu"]
    before = read_manifest(output)
    try:
        path = build_cpu_repository(
            output, args.yolo_onnx or default_yolo_onnx(),
            instances=args.instances, intra_op_threads=args.intra_op_threads, cpu_cores=args.cpu_cores,
            max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
            sam2_image_size=args.sam2_image_size, force=args.force, sam2_onnx_dir=args.sam2_onnx_dir,
            u2netp_onnx=args.u2netp_onnx or default_u2netp_onnx(), sam2_precision=args.sam2_precision,
        )
    except (MissingWeightsError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"build_engines.py: {exc}", file=sys.stderr)
        return 1

    after = read_manifest(path)
    if before is not None and before.get("build_id") == after.get("build_id"):
        print(f"CPU model repository {path} is up to date (use --force to rebuild)")
        return 0
    print(f"wrote CPU model repository {path}:")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        print(f"  {file.relative_to(path)}  ({file.stat().st_size:,} bytes)")
    return 0


# --- onnx -----------------------------------------------------------------------------------------

def _missing_modules(*names: str) -> list[str]:
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def onnx_preflight(args: argparse.Namespace) -> list[str]:
    """Why the export cannot start (nothing imported beyond find_spec, nothing written)."""
    problems: list[str] = []
    models = args.models
    needed = ["torch", "onnxruntime"]
    if "yolov8" in models:
        needed.append("ultralytics")
    if "matting" in models:
        needed.append("safetensors")
    missing = _missing_modules(*needed)
    if missing:
        problems.append(f"the export environment is missing {', '.join(missing)} (this Python: {sys.executable}). "
                        f"Create it with `make export-env` and run `.venv-export/bin/python build_engines.py "
                        f"--target onnx ...`; the orchestrator's .venv never gets torch")
    if "yolov8" in models:
        if args.yolo_weights is None and not args.random_init:
            problems.append("yolov8: pass --yolo-weights FILE.pt (an Ultralytics checkpoint) or --random-init")
        elif args.yolo_weights is not None and not args.yolo_weights.expanduser().is_file():
            problems.append(f"yolov8: --yolo-weights {args.yolo_weights} does not exist")
    if "matting" in models:
        if args.birefnet_snapshot is None:
            problems.append(
                "matting: the GPU's matting network, BiRefNet, needs --birefnet-snapshot DIR (or $" + BIREFNET_SNAPSHOT_ENV + "), a "
                "local Hugging Face snapshot folder (e.g. ZhengPeng7/BiRefNet_lite: config.json, birefnet.py, "
                "BiRefNet_config.py, model.safetensors). --random-init cannot replace it: no package on PyPI "
                "ships BiRefNet's modelling code, it comes with the snapshot. Leave matting out with "
                "--models yolov8,sam2")
        else:
            from engines.export.birefnet import SnapshotError, describe_snapshot

            try:
                info = describe_snapshot(args.birefnet_snapshot)
                if info["weights"] is None and not args.random_init:
                    problems.append(f"matting (BiRefNet): {info['path']} has no model.safetensors or pytorch_model.bin "
                                    f"(pass --random-init to export its architecture with random weights)")
            except SnapshotError as exc:
                problems.append(f"matting (BiRefNet): {exc}")
    if any(m in SAM2_PARTS for m in models):
        if _missing_modules("engines.export.sam2_parts"):
            problems.append("sam2: the SAM 2 exporter engines/export/sam2_parts.py is not in this checkout; "
                            "leave the parts out with --models yolov8,matting")
        elif args.sam2_checkpoint is None and not args.random_init:
            problems.append("sam2: pass --sam2-checkpoint FILE.pt (SAM 2.1) or --random-init")
        elif args.sam2_checkpoint is not None and not args.sam2_checkpoint.expanduser().is_file():
            problems.append(f"sam2: --sam2-checkpoint {args.sam2_checkpoint} does not exist")
    return problems


def _run_onnx(args: argparse.Namespace) -> int:
    problems = onnx_preflight(args)
    if problems:
        print("build_engines.py --target onnx: cannot start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2

    output = (args.output or DEFAULT_OUTPUT["onnx"]).expanduser().absolute()
    output.mkdir(parents=True, exist_ok=True)
    log = _log
    results = []
    failures: list[str] = []

    def run(label: str, fn) -> None:
        try:
            results.extend(fn())
        except Exception as exc:  # noqa: BLE001 - report every model, then fail
            import traceback

            traceback.print_exc()
            failures.append(f"{label}: {type(exc).__name__}: {exc}")

    if "yolov8" in args.models:
        from engines.export.yolo import export_yolov8, export_yolov8_end2end

        yolo = {"weights": args.yolo_weights, "random_init": args.random_init, "variant": args.yolo_variant,
                "seed": args.seed, "opset": args.opset, "log": log}
        run("yolov8", lambda: export_yolov8(output, check_batch=args.check_batch or 2, **yolo))
        if args.yolo_end2end:
            run("yolov8_end2end", lambda: export_yolov8_end2end(output, **yolo))
    if "matting" in args.models:
        from engines.export.birefnet import export_birefnet

        run("matting (BiRefNet)", lambda: export_birefnet(
            output, snapshot=args.birefnet_snapshot, random_init=args.random_init, seed=args.seed,
            opset=args.opset, check_batch=args.check_batch or 1, log=log))
    parts = tuple(m for m in args.models if m in SAM2_PARTS)
    if parts:
        run("sam2", lambda: _export_sam2(args, output, parts, log))

    failures += _contract_failures(results, args.sam2_image_size)
    report = _write_report(output, results, args)
    failed_checks = [r.name for r in results if r.report is not None and not r.report.ok]
    print(f"\nONNX export into {output} ({EXPORT_REPORT} has the details):")
    for r in results:
        check = r.report
        figures = (f"max abs {check.max_abs:.2e}, max rel {check.max_rel:.2e} "
                   f"(atol {check.atol:g}, rtol {check.rtol:g}) {'PASS' if check.ok else 'FAIL'}") if check else "no check"
        print(f"  {r.path.name:28s} {figures}   [{r.source}]")
    if failures or failed_checks:
        for f in failures:
            print(f"  FAILED {f}", file=sys.stderr)
        for name in failed_checks:
            print(f"  CHECK FAILED {name}: ONNX Runtime and PyTorch disagree beyond the tolerances", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0


def _export_sam2(args: argparse.Namespace, output: Path, parts: tuple[str, ...], log) -> list:
    """The SAM 2 parts, by the SAM 2 exporter's entry point ``export_parts`` (one model for all the
    parts asked for: they share its learned constants), at model size --sam2-image-size."""
    from engines.export import sam2_parts  # the export path only (imports torch and sam2)

    checkpoint = args.sam2_checkpoint.expanduser() if args.sam2_checkpoint is not None else None
    # A checkpoint wins over --random-init (which may be there for YOLOv8 in the same command).
    return sam2_parts.export_parts(output, parts=parts, checkpoint=checkpoint, size=args.sam2_size,
                                   random_init=checkpoint is None and args.random_init, seed=args.seed,
                                   image_size=args.sam2_image_size, opset=args.opset, check=True,
                                   log=lambda message: log(f"[sam2] {message}"))


def _contract_failures(results: list, sam2_image_size: int) -> list[str]:
    """Every served graph must match its committed GPU config (model_repository/), which matches
    the CPU repository: names, dtypes, dims. The SAM 2 parts must also have the CPU repository's
    contract at --sam2-image-size (what --target cpu --sam2-onnx-dir demands); the GPU configs are
    written for one S, so a part exported at another S is not compared with them (a line says so)."""
    from engines import tensorrt_build as trtb

    failures = []
    gpu_s = _gpu_sam2_image_size(trtb)
    for r in results:
        if r.name in SAM2_PARTS:
            from engines.export import sam2_parts

            problems = sam2_parts.contract_mismatches(r.path, sam2_image_size)
            if problems:
                failures.append(f"{r.name}: not the model contract at S={sam2_image_size}: " + "; ".join(problems))
                continue
            print(f"{r.path.name}: tensor contract matches the CPU repository's at S={sam2_image_size}")
            if sam2_image_size != gpu_s:
                print(f"{r.path.name}: not compared with model_repository/ (sized for S={gpu_s}): a GPU build needs "
                      f"--sam2-image-size {gpu_s}")
                continue
        config_path = trtb.MODEL_REPOSITORY / r.name / "config.pbtxt"
        if not getattr(r, "in_repository", True) or not config_path.is_file():
            continue
        problems = trtb.contract_mismatches(r.path, trtb.read_config(config_path))
        if problems:
            failures.append(f"{r.name}: differs from {config_path.relative_to(REPO_ROOT)}: " + "; ".join(problems))
        else:
            print(f"{r.path.name}: tensor contract matches {config_path.relative_to(REPO_ROOT)}")
    return failures


def _gpu_sam2_image_size(trtb) -> int | None:
    """The model size S the committed GPU repository serves (its image encoder's input side)."""
    config_path = trtb.MODEL_REPOSITORY / "sam2_image_encoder" / "config.pbtxt"
    if not config_path.is_file():
        return None
    return trtb.read_config(config_path).inputs[0].dims[0]


def _write_report(output: Path, results: list, args: argparse.Namespace) -> Path:
    import datetime as dt
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "torchvision", "ultralytics", "onnx", "onnxruntime", "absolutely-not-samurai", "transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    path = output / EXPORT_REPORT
    previous = {}
    if path.is_file():
        try:
            previous = {m["name"]: m for m in json.loads(path.read_text()).get("models", [])}
        except (ValueError, KeyError, TypeError):
            previous = {}
    for r in results:
        previous[r.name] = r.to_dict() if hasattr(r, "to_dict") else dict(r)
    data = {
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "opset": args.opset,
        "random_init": args.random_init,
        "seed": args.seed,
        "models": list(previous.values()),
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def _log(message: str) -> None:
    print(message, flush=True)


# --- tensorrt -------------------------------------------------------------------------------------

def _run_tensorrt(args: argparse.Namespace) -> int:
    from engines import tensorrt_build as trtb

    repository = (args.output or DEFAULT_OUTPUT["tensorrt"]).expanduser().absolute()
    try:
        checked = trtb.preflight(args.onnx_dir.expanduser().absolute(), repository, tuple(args.models),
                                 allow_version_mismatch=args.allow_trt_mismatch)
    except trtb.BuildError as exc:
        print(f"build_engines.py --target tensorrt: {exc}", file=sys.stderr)
        return 2
    try:
        plans = trtb.build_repository(args.onnx_dir.expanduser().absolute(), repository, tuple(args.models),
                                      workspace_bytes=int(args.workspace_gb * 2**30), log=_log, checked=checked)
    except trtb.BuildError as exc:
        print(f"build_engines.py --target tensorrt: {exc}", file=sys.stderr)
        return 1
    print(f"\nwrote {len(plans)} TensorRT plan(s) into {repository}:")
    for plan in plans:
        print(f"  {plan.path.relative_to(repository)}  {plan.bytes / 2**20:.1f} MiB  ({plan.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
