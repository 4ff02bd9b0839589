"""`framewise`: the command-line client.

    framewise info                      service, Triton and model state (exit 1 unless serving)
    framewise detect IMAGE [--json]     people (or other classes) in a photo
    framewise remove-background IMAGE -o OUT.png [--background transparent|keep|COLOR|PICTURE]
              [--fit cover|contain] [--bar-color COLOR] [--feather PX] [--crop-person [--person-index N]] [--alpha]
                                        a cut-out, or the subject on a new background, as PNG
    framewise track SOURCE --box x,y,w,h [--json] [--overlay OUT.mp4]
                                        one object through a video or a folder of frames
    framewise segment-video VIDEO --box x,y,w,h [--watch] [--json]
    framewise talking-video IMAGE AUDIO [--all-persons [--max-persons N]] [--background ...] [--skip-matting | --require-matting] [--watch] [--json]
    framewise watch OPERATION [--after N] [--json]
    framewise download OPERATION ARTIFACT OUT
    framewise operations [--filter 'state = RUNNING']
    framewise cancel OPERATION           long-running jobs (see clients/jobs_cli.py)
    framewise admin keys create|list|revoke, admin quotas set|show
                                        administration in the job store (clients/admin_cli.py)

The server address comes from --server, else FRAMEWISE_SERVER, else localhost:50051. With
authentication on, the API key comes from --api-key or FRAMEWISE_API_KEY (sent as
"authorization: Bearer KEY"); --tls / --ca-cert / --client-cert --client-key connect with TLS
and mutual TLS (clients/cli_connection.py lists them with their environment variables).

A refused call prints its status code name and message ("error: UNAUTHENTICATED: ...").
Exit codes: 0 ok, 1 service unreachable / not serving / failed, 2 bad input or usage,
3 refused: UNAUTHENTICATED (no or bad credential) or PERMISSION_DENIED (a scope is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc

from clients import admin_cli, jobs_cli, track_cli
from clients.backgrounds import add_background_options, background_option
from clients.cli_connection import add_connection_options, client_for, describe_refusal
from framewise.v1 import common_pb2, info_service_pb2, vision_service_pb2

_USER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
# Exit 3: the server refused the caller (its credential), not the request.
_REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
EXIT_REFUSED = 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(args.run(args))
    except grpc.aio.AioRpcError as exc:
        print(describe_refusal(exc, args.server), file=sys.stderr)
        if exc.code() in _REFUSED:
            return EXIT_REFUSED
        return 2 if exc.code() in _USER_ERRORS else 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framewise", description="Framewise gRPC inference service client")
    add_connection_options(parser)
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

    remove = commands.add_parser(
        "remove-background", help="cut the subject out of a photo, or put it on a new background (writes a PNG)"
    )
    remove.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    remove.add_argument("-o", "--output", type=Path, required=True, help="where to write the PNG")
    add_background_options(remove)
    remove.add_argument("--feather", type=float, default=0.0, metavar="PX", help="soften the matte's edges over PX pixels (0..64)")
    remove.add_argument("--crop-person", action="store_true", help="detect persons first and cut out the largest one")
    remove.add_argument("--person-index", type=int, default=None, metavar="N", help="with --crop-person: the N-th person, highest score first (0-based)")
    remove.add_argument("--alpha", action="store_true", help="write the matte alone (grayscale PNG); no --background")
    remove.set_defaults(run=_remove_background)

    track_cli.add_parser(commands)
    jobs_cli.add_parsers(commands)
    admin_cli.add_parser(commands)
    return parser


async def _info(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
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
    answered = f" (answered by replica {info.replica_id})" if info.replica_id else ""
    print(f"framewise {info.server_version} at {address}: {health}{answered}")
    mode = "started by the orchestrator" if triton.managed else "external"
    state = "ready" if triton.ready else ("live, not ready" if triton.live else "unreachable")
    print(f"triton {triton.server_version or '?'} at {triton.url} ({mode}): {state}" + (f" - {triton.last_error}" if triton.last_error else ""))
    if info.HasField("security"):
        print(_security_line(info.security))
    print(f"{'model (network)':<48} {'ready':<6} {'backend':<14} source")
    for model in info.models:
        print(f"{_model_label(model):<48} {'yes' if model.ready else 'no':<6} {model.backend:<14} {model.source}")
    if info.replicas:
        print(f"{'replica':<24} {'address':<28} {'live':<5} last heartbeat (UTC)")
        for replica in info.replicas:
            here = " <- answered" if replica.replica_id == info.replica_id else ""
            seen = replica.heartbeat_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            print(f"{replica.replica_id:<24} {replica.address:<28} {'yes' if replica.live else 'no':<5} {seen}{here}")


def _security_line(security: info_service_pb2.SecurityInfo) -> str:
    """"authentication is off ..." stays visible: an open server should never look like a closed one."""
    tls = "TLS on" if security.tls else "no TLS"
    if security.client_certificates_required:
        tls += ", client certificates required"
    where = "loopback only" if security.loopback_only else "reachable from the network"
    mode = f" (--auth {security.auth_mode})" if security.auth_mode else ""
    if security.authentication_required:
        return f"authentication required{mode}; {tls}; listening on {security.listen} ({where})"
    return f"authentication is OFF{mode}: every caller runs as the default tenant; {tls}; listening on {security.listen} ({where})"


def _model_label(model: info_service_pb2.ModelStatus) -> str:
    """"matting v1 U2-Netp (real)", "sam2_image_encoder v1 STAND-IN": the Triton name says the
    job, the network which weights do it."""
    label = model.name + (f" v{model.version}" if model.version else "")
    if model.stand_in:
        return f"{label} STAND-IN"
    if not model.version:  # not loaded: nothing is known about it yet
        return f"{label} (not loaded)"
    return f"{label} {model.network or 'unnamed network'} (real)"


async def _detect(args: argparse.Namespace) -> int:
    data = args.image.read_bytes()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    async with client_for(args) as client:
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


async def _remove_background(args: argparse.Namespace) -> int:
    data = args.image.read_bytes()
    background = background_option(args.background)
    async with client_for(args) as client:
        response = await client.remove_background(
            data,
            background=background,
            fit=args.fit,
            bar_color=args.bar_color,
            alpha_only=args.alpha,
            feather_px=args.feather,
            crop_person=args.crop_person,
            person_index=args.person_index,
        )
    args.output.write_bytes(response.png)
    print(_removal_summary(args.image, args.output, response))
    return 0


_KINDS = {1: "alpha matte", 3: "RGB", 4: "RGBA cut-out"}


def _removal_summary(source: Path, output: Path, response: vision_service_pb2.RemoveBackgroundResponse) -> str:
    """One line: what was written, by which model (real or stand-in), and where the time went."""
    mode = common_pb2.BackgroundMode.Name(response.background_mode).removeprefix("BACKGROUND_MODE_").lower()
    what = _KINDS.get(response.channels, f"{response.channels}-channel") + ("" if response.channels == 1 else f", background {mode}")
    if response.HasField("model"):
        m = response.model
        model = f"{m.name} v{m.version} = {m.network or '?'} ({'STAND-IN' if m.stand_in else 'real'})"
    else:
        model = "no matting (background kept)"
    person = ""
    if response.HasField("person_box"):
        b = response.person_box
        person = f", person #{response.person_index} of {response.persons_found} at ({b.x1:.0f},{b.y1:.0f})-({b.x2:.0f},{b.y2:.0f})"
    t = response.timings
    return (
        f"{source.name} -> {output}: {response.width}x{response.height} {what}, {len(response.png)} bytes; {model}{person}; "
        f"{t.total_ms:.0f} ms (decode {t.decode_ms:.1f}, preprocess {t.preprocess_ms:.1f}, triton {t.triton_ms:.1f}, post {t.postprocess_ms:.1f})"
    )



if __name__ == "__main__":
    sys.exit(main())
