#!/usr/bin/env python3
"""Build Framewise model repositories for Triton.

    python build_engines.py --target cpu      # python backend + ONNX Runtime (this version)

The CPU repository holds yolov8 (the real int8 weights), the four SAM 2 parts and birefnet as
STAND-IN contract models (exact tensor contracts, no learned meaning: no SAM 2 or BiRefNet
weights on these machines), sized by --sam2-image-size and --birefnet-image-size.

The onnx and tensorrt targets (real exports, TensorRT plans for the GPU) are not implemented
in this version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUTPUT = {"cpu": REPO_ROOT / ".cache" / "model_repository_cpu"}


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


def _birefnet_image_size(text: str) -> int:
    value = int(text)
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 64, >= 64; got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["cpu", "onnx", "tensorrt"], default="cpu")
    parser.add_argument("--output", type=Path,
                        help=f"repository directory (cpu default: {DEFAULT_OUTPUT['cpu']})")
    parser.add_argument("--yolo-onnx", type=Path,
                        help="YOLOv8 ONNX weights (default: $FRAMEWISE_YOLO_ONNX, else "
                             "../shared/assets/models/yolov8n_int8.onnx next to the repo)")
    parser.add_argument("--instances", type=_positive_int, default=2,
                        help="Triton instances of yolov8 (the SAM 2 parts have fixed counts for 2 cores)")
    parser.add_argument("--intra-op-threads", type=_positive_int, default=1,
                        help="ONNX Runtime intra-op threads per instance")
    parser.add_argument("--max-batch-size", type=_positive_int, default=8, help="yolov8 max batch size")
    parser.add_argument("--max-queue-delay-us", type=_non_negative_int, default=0,
                        help="dynamic batching max queue delay in microseconds (default 0: on CPU the model "
                             "runs a batch's images one by one, so waiting for a batch only adds latency)")
    parser.add_argument("--sam2-image-size", type=_sam2_image_size, default=1024,
                        help="SAM 2 model size S: image S x S, features S/16, masks S/4 (default 1024)")
    parser.add_argument("--birefnet-image-size", type=_birefnet_image_size, default=1024,
                        help="BiRefNet model size S: image and matte S x S (default 1024, the real one)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)

    if args.target != "cpu":
        print(f"build_engines.py: --target {args.target} is not implemented yet in this version; "
              f"only --target cpu is available.", file=sys.stderr)
        return 2

    from engines.cpu_repository import (MissingWeightsError, build_cpu_repository,
                                        default_yolo_onnx, read_manifest)

    output = args.output or DEFAULT_OUTPUT["cpu"]
    before = read_manifest(output)
    try:
        path = build_cpu_repository(
            output, args.yolo_onnx or default_yolo_onnx(),
            instances=args.instances, intra_op_threads=args.intra_op_threads,
            max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
            sam2_image_size=args.sam2_image_size, birefnet_image_size=args.birefnet_image_size,
            force=args.force,
        )
    except (MissingWeightsError, FileExistsError) as exc:
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


if __name__ == "__main__":
    sys.exit(main())
