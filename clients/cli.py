"""`framewise`: the command-line client.

    framewise info                      service, Triton and model state (exit 1 unless serving)
    framewise detect IMAGE [--json]     people (or other classes) in a photo
    framewise track SOURCE --box x,y,w,h [--json] [--overlay OUT.mp4]
                                        one object through a video or a folder of frames
    framewise segment-video VIDEO --box x,y,w,h [--watch] [--json]
    framewise talking-video IMAGE AUDIO [--skip-matting | --require-matting] [--watch] [--json]
    framewise watch OPERATION [--after N] [--json]
    framewise download OPERATION ARTIFACT OUT
    framewise operations [--filter 'state = RUNNING']
    framewise cancel OPERATION           long-running jobs (see clients/jobs_cli.py)

The server address comes from --server, else FRAMEWISE_SERVER, else localhost:50051.
Exit codes: 0 ok, 1 service unreachable / not serving / failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients import jobs_cli, track_cli
from clients.sdk import DEFAULT_ADDRESS, FramewiseClient
from framewise.v1 import info_service_pb2, vision_service_pb2

_USER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(args.run(args))
    except grpc.aio.AioRpcError as exc:
        print(_describe(exc, args.server), file=sys.stderr)
        return 2 if exc.code() in _USER_ERRORS else 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framewise", description="Framewise gRPC inference service client")
    parser.add_argument(
        "--server",
        default=os.environ.get("FRAMEWISE_SERVER", DEFAULT_ADDRESS),
        help=f"host:port of the service (env FRAMEWISE_SERVER, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="show service, Triton and model state; exit 1 unless serving")
    info.add_argument("--json", action="store_true", help="print the GetServerInfo answer as JSON")
    info.set_defaults(run=_info)

    detect = commands.add_parser("detect", help="detect objects (default: people) in an image")
    detect.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    detect.add_argument("--json", action="store_true", help='print {"detections": [{"label", "score", "box"}]}')
    detect.add_argument("--confidence", type=float, help="minimum score in [0, 1] (default 0.25)")
    detect.add_argument("--iou", type=float, help="NMS IoU threshold in [0, 1] (default 0.45)")
    detect.add_argument("--classes", default="", help="comma-separated class names (default: person)")
    detect.add_argument("--all-classes", action="store_true", help="keep every class")
    detect.add_argument("--max-detections", type=int, default=0, help="at most this many (default 100)")
    detect.set_defaults(run=_detect)

    track_cli.add_parser(commands)
    jobs_cli.add_parsers(commands)
    return parser


async def _info(args: argparse.Namespace) -> int:
    async with FramewiseClient(args.server, timeout_s=args.timeout) as client:
        health = await client.health_status(timeout_s=min(args.timeout, 5.0))
        info = await client.server_info()
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(info, always_print_fields_with_no_presence=True))
    else:
        _print_info(args.server, health, info)
    return 0 if health == "SERVING" and info.serving else 1


def _print_info(address: str, health: str, info: info_service_pb2.GetServerInfoResponse) -> None:
    triton = info.triton
    print(f"framewise {info.server_version} at {address}: {health}")
    mode = "started by the orchestrator" if triton.managed else "external"
    state = "ready" if triton.ready else ("live, not ready" if triton.live else "unreachable")
    print(f"triton {triton.server_version or '?'} at {triton.url} ({mode}): {state}" + (f" - {triton.last_error}" if triton.last_error else ""))
    print(f"{'model':<24} {'version':<8} {'ready':<6} {'kind':<9} {'backend':<14} source")
    for model in info.models:
        kind = "STAND-IN" if model.stand_in else "real"
        print(f"{model.name:<24} {model.version:<8} {'yes' if model.ready else 'no':<6} {kind:<9} {model.backend:<14} {model.source}")


async def _detect(args: argparse.Namespace) -> int:
    data = args.image.read_bytes()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    async with FramewiseClient(args.server, timeout_s=args.timeout) as client:
        response = await client.detect(
            data,
            confidence=args.confidence,
            iou=args.iou,
            class_names=classes,
            all_classes=args.all_classes,
            max_detections=args.max_detections,
        )
    if args.json:
        print(json.dumps({"detections": [_detection_json(d) for d in response.detections]}))
    else:
        _print_detections(args.image, response)
    return 0


def _detection_json(d: vision_service_pb2.Detection) -> dict[str, object]:
    box = [round(v, 1) for v in (d.box.x1, d.box.y1, d.box.x2, d.box.y2)]
    return {"label": d.label, "score": round(d.score, 4), "box": box}


def _print_detections(path: Path, response: vision_service_pb2.DetectResponse) -> None:
    t = response.timings
    model = response.model
    kind = "STAND-IN" if model.stand_in else "real"
    print(
        f"{path.name}: {response.image_width}x{response.image_height}, {len(response.detections)} detection(s) "
        f"by {model.name} v{model.version} ({kind}) in {t.total_ms:.1f} ms "
        f"(decode {t.decode_ms:.1f}, preprocess {t.preprocess_ms:.1f}, triton {t.triton_ms:.1f}, post {t.postprocess_ms:.1f})"
    )
    if not response.detections:
        return
    print(f"{'#':>3}  {'label':<14} {'score':>6}  {'x1':>7} {'y1':>7} {'x2':>7} {'y2':>7}")
    for i, d in enumerate(response.detections, 1):
        b = d.box
        print(f"{i:>3}  {d.label:<14} {d.score:>6.3f}  {b.x1:>7.1f} {b.y1:>7.1f} {b.x2:>7.1f} {b.y2:>7.1f}")


def _describe(exc: grpc.aio.AioRpcError, address: str) -> str:
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
        return f"error: cannot reach the Framewise service at {address} ({exc.details()}); start it with `make serve` or pass --server"
    lines = [f"error: {exc.code().name}: {exc.details()}"]
    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            lines += [f"  field {v.field}: {v.description}" for v in bad_request.field_violations]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
