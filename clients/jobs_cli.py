"""Long-running jobs from the command line.

    framewise segment-video VIDEO --box x,y,w,h [--prompt-frame N] [--sample-fps F] [--max-frames N]
                            [--server-path] [--watch] [--json]
    framewise talking-video IMAGE AUDIO [--person-index N | --person-point x,y | --all-persons [--max-persons N]]
                            [--background transparent|keep|COLOR|PICTURE] [--fit cover|contain] [--bar-color COLOR]
                            [--skip-matting | --require-matting] [--watch] [--json]
    framewise watch OPERATION [--after N] [--json]
    framewise download OPERATION ARTIFACT OUT
    framewise operations [--filter 'state = RUNNING'] [--json]
    framewise cancel OPERATION

Without --watch a submit command prints the operation name (with --json, the operation as a JSON
object) and returns at once. With --watch (and in `watch`) a progress bar with the stage runs on
stderr, retries are shown as they happen and a summary with the artifacts ends it; with --json,
stdout gets one JSON object per event instead:

    {"sequence": 3, "stage": "DETECTION_COMPLETE", "percent": 40, "message": "Detected 2 persons ..."}
    {"sequence": 7, "type": "progress", "stage": "TRACKING", "percent": 52.5, "message": "...", "done": 4, "total": 8}
    {"sequence": 9, "type": "error", "stage": "DID_PROCESSING", "error_class": "EXTERNAL", "kind": "...",
     "description": "...", "will_retry": true, "attempt": 1}
    {"sequence": 9, "type": "heartbeat"}
    {"sequence": 14, "type": "complete", "state": "SUCCEEDED", "operation": "operations/...", "artifacts": [...]}

A talking video's "complete" line (and its operation's JSON once done) adds the per-person results:
"persons_found", "background" and "persons": [{"person": 1, "box": [x1, y1, x2, y2], "score",
"state", "artifacts", "did_talk_id", "matting_skipped", "matting_skipped_reason", "background",
"error" (only when the person failed)}]; the human summary prints one row per person.

Exit codes: 0 the job succeeded (or the request was accepted), 1 the job FAILED or was CANCELLED,
an RPC failed or the operation is unknown (NOT_FOUND), 2 bad input or usage. The watch stream
reconnects by itself and resumes after the last event seen, so no event is lost or repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.longrunning import operations_pb2

from clients.backgrounds import add_background_options, background_option
from clients.jobs_sdk import (
    DownloadResult,
    IntegrityError,
    JobResponse,
    StreamBroken,
    artifact_kind_name,
    background_fit_name,
    background_mode_name,
    error_class_name,
    job_metadata,
    kind_name,
    operation_response,
    person_artifacts,
    stage_name,
    state_name,
    status_code,
    talking_video_persons,
)
from clients.cli_connection import client_for, describe_refusal
from clients.sdk import FramewiseClient
from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as pb

# Without an event or heartbeat (every 30 s by default) for this long, the watch stream is taken
# for dead (a half-open connection) and re-opened.
WATCH_IDLE_TIMEOUT_S = 150.0
_BAR_WIDTH = 20

Command = Callable[[argparse.Namespace], Awaitable[int]]


def add_parsers(commands: argparse._SubParsersAction) -> None:
    segment = commands.add_parser("segment-video", help="track an object through a whole video as a job (mask, overlay, JSON)")
    segment.add_argument("video", help="local video file (uploaded first), or with --server-path a file under the server's media root")
    segment.add_argument("--box", metavar="X,Y,W,H", help="x, y, width, height of the object on the prompt frame, in pixels")
    segment.add_argument("--point", action="append", default=[], metavar="X,Y", help="a point on the object (repeatable)")
    segment.add_argument(
        "--negative-point", action="append", default=[], metavar="X,Y", help="a point on the background (repeatable)"
    )
    segment.add_argument("--prompt-frame", type=int, default=0, metavar="N", help="frame (after sampling) the prompt is on (default 0)")
    segment.add_argument("--sample-fps", type=float, default=0.0, metavar="F", help="process at most F frames per second (default: all)")
    segment.add_argument("--max-frames", type=int, default=0, metavar="N", help="process at most N frames (default: all)")
    segment.add_argument("--server-path", action="store_true", help="VIDEO is a path on the server, relative to its media root")
    _add_submit_options(segment)
    segment.set_defaults(run=_segment_video)

    talking = commands.add_parser("talking-video", help="photo of a person + audio -> talking-head video (D-ID) as a job")
    talking.add_argument("image", type=Path, help="photo with at least one person (JPEG, PNG, WebP)")
    talking.add_argument("audio", type=Path, help="speech (WAV, MP3, ...)")
    person = talking.add_mutually_exclusive_group()
    person.add_argument("--person-index", type=int, metavar="N", help="the N-th person detected, highest score first (default: the largest)")
    person.add_argument("--person-point", metavar="X,Y", help="the person whose box contains this point")
    person.add_argument("--all-persons", action="store_true", help="one video per detected person, highest score first")
    talking.add_argument("--max-persons", type=int, metavar="N", help="with --all-persons: at most N persons (default: the server's limit)")
    add_background_options(talking)
    matting = talking.add_mutually_exclusive_group()
    matting.add_argument("--skip-matting", action="store_true", help="send the crop as it is, without background removal")
    matting.add_argument("--require-matting", action="store_true",
                         help="fail the job if background removal fails (by default it goes on with the plain crop)")
    _add_submit_options(talking)
    talking.set_defaults(run=_talking_video)

    watch = commands.add_parser("watch", help="follow an operation's events until it ends; exit 1 unless it succeeded")
    watch.add_argument("operation", help="operation name (operations/<id>, or just the id)")
    watch.add_argument("--after", type=int, default=0, metavar="N", help="only events after sequence N (resume)")
    watch.add_argument("--json", action="store_true", help="print one JSON object per event")
    watch.set_defaults(run=_operation_command(_watch))

    download = commands.add_parser("download", help="download an artifact of a finished operation (sha256 checked)")
    download.add_argument("operation", help="operation name (operations/<id>, or just the id)")
    download.add_argument("artifact", help="artifact name, for example talking_video.mp4 or overlay.mp4")
    download.add_argument("out", type=Path, help="file to write (or an existing folder to write ARTIFACT into)")
    download.set_defaults(run=_operation_command(_download))

    operations = commands.add_parser("operations", help="list operations, oldest first")
    operations.add_argument(
        "--filter", default="", help="'state = RUNNING', 'kind = TALKING_VIDEO AND done = true', 'state = FAILED OR state = CANCELLED'"
    )
    operations.add_argument("--limit", type=int, default=0, metavar="N", help="show at most N operations")
    operations.add_argument("--json", action="store_true", help="print one JSON object per operation")
    operations.set_defaults(run=_operation_command(_operations))

    cancel = commands.add_parser("cancel", help="cancel a queued or running operation")
    cancel.add_argument("operation", help="operation name (operations/<id>, or just the id)")
    cancel.set_defaults(run=_operation_command(_cancel))


def _add_submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watch", action="store_true", help="follow the job until it ends; exit 1 unless it succeeded")
    parser.add_argument("--json", action="store_true", help="print the operation (or with --watch, each event) as JSON")
    parser.add_argument("--request-id", default="", help="client-chosen id that makes the submission idempotent")


def _operation_command(run: Command) -> Command:
    """Commands about an existing operation: an unknown one (NOT_FOUND) is a failed lookup, exit 1."""

    @functools.wraps(run)
    async def wrapper(args: argparse.Namespace) -> int:
        try:
            return await run(args)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            print(describe_refusal(exc, args.server), file=sys.stderr)
            return 1

    return wrapper


# ---------------------------------------------------------------------------- submit commands


async def _segment_video(args: argparse.Namespace) -> int:
    box = _parse_box(args.box) if args.box else None
    points = [(*_parse_point(p, "--point"), True) for p in args.point]
    points += [(*_parse_point(p, "--negative-point"), False) for p in args.negative_point]
    if box is None and not points:
        raise ValueError("give the object with --box x,y,w,h and/or --point x,y")
    if not args.server_path:
        _check_file(Path(args.video), "VIDEO")
    progress = _Progress(quiet=args.json)
    async with client_for(args) as client:
        op = await client.segment_video(
            None if args.server_path else Path(args.video),
            server_path=args.video if args.server_path else None,
            box=box,
            points=points,
            prompt_frame_index=args.prompt_frame,
            sample_fps=args.sample_fps,
            max_frames=args.max_frames,
            request_id=args.request_id,
            on_upload_progress=None if args.server_path else lambda done, total: progress.bytes("uploading", done, total),
        )
        progress.close()
        return await _submitted(client, op, args)


async def _talking_video(args: argparse.Namespace) -> int:
    _check_file(args.image, "IMAGE")
    _check_file(args.audio, "AUDIO")
    point = _parse_point(args.person_point, "--person-point") if args.person_point else None
    if args.max_persons is not None and not args.all_persons:
        raise ValueError("--max-persons applies with --all-persons")
    background = background_option(args.background)
    async with client_for(args) as client:
        op = await client.create_talking_video(
            args.image,
            args.audio,
            person_index=args.person_index,
            person_point=point,
            all_persons=args.all_persons,
            max_persons=args.max_persons,
            background=background,
            fit=args.fit,
            bar_color=args.bar_color,
            skip_matting=args.skip_matting,
            require_matting=args.require_matting,
            request_id=args.request_id,
        )
        return await _submitted(client, op, args)


async def _submitted(client: FramewiseClient, op: operations_pb2.Operation, args: argparse.Namespace) -> int:
    meta = job_metadata(op)
    if not args.watch:
        if args.json:
            print(json.dumps(operation_json(op)))
        else:
            print(op.name)
        return 0
    queued = f", queue position {meta.queue_position}" if meta.state == pb.JOB_STATE_QUEUED else ""
    print(f"{op.name}: {kind_name(meta.kind)} {state_name(meta.state)}{queued}", file=sys.stderr)
    return await _follow(client, op.name, 0, args.json)


# ---------------------------------------------------------------------------- operation commands


async def _watch(args: argparse.Namespace) -> int:
    if args.after < 0:
        raise ValueError("--after must be >= 0")
    async with client_for(args) as client:
        return await _follow(client, _operation_name(args.operation), args.after, args.json)


async def _download(args: argparse.Namespace) -> int:
    name = _operation_name(args.operation)
    out: Path = args.out / args.artifact if args.out.is_dir() else args.out
    progress = _Progress()
    async with client_for(args) as client:
        try:
            result: DownloadResult = await client.download_artifact(
                name,
                args.artifact,
                out,
                on_progress=lambda done, total: progress.bytes("downloading", done, total),
                on_retry=lambda attempt, error, delay: progress.note(
                    f"download interrupted ({_error_text(error)}); resuming in {delay:.1f} s (attempt {attempt})"
                ),
            )
        except (IntegrityError, StreamBroken) as exc:
            progress.close()
            print(f"error: {exc}", file=sys.stderr)
            return 1
    progress.close()
    resumed = f", resumed {result.resumed} time(s)" if result.resumed else ""
    print(f"wrote {result.path}: {result.size_bytes} bytes, {result.media_type or 'unknown type'}, sha256 {result.sha256}{resumed}")
    return 0


async def _operations(args: argparse.Namespace) -> int:
    count = 0
    async with client_for(args) as client:
        if not args.json:
            print(f"{'operation':<44} {'kind':<14} {'state':<10} {'stage':<26} {'percent':>7}  created")
        async for op in client.list_operations(args.filter, page_size=50):
            if args.json:
                print(json.dumps(operation_json(op)))
            else:
                meta = job_metadata(op)
                created = meta.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if meta.HasField("create_time") else ""
                print(
                    f"{op.name:<44} {kind_name(meta.kind):<14} {state_name(meta.state):<10} "
                    f"{stage_name(meta.stage):<26} {_percent(meta.percent):>6}%  {created}"
                )
            count += 1
            if args.limit and count >= args.limit:
                break
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    name = _operation_name(args.operation)
    async with client_for(args) as client:
        await client.cancel_operation(name)
        op = await client.get_operation(name)
    meta = job_metadata(op)
    print(f"{name}: cancel requested; now {state_name(meta.state)} ({stage_name(meta.stage)})")
    return 0


# ---------------------------------------------------------------------------- following a job


async def _follow(client: FramewiseClient, name: str, after: int, as_json: bool) -> int:
    """Print the events of `name` after `after` until the terminal one; 0 if it SUCCEEDED, else 1."""
    progress = _Progress(quiet=as_json)
    started = time.monotonic()
    last_event: pb.WatchOperationResponse | None = None
    last_sequence = after
    # With --json the "complete" line waits for the operation, whose results it carries.
    complete: pb.WatchOperationResponse | None = None

    def on_retry(attempt: int, error: BaseException, delay: float) -> None:
        progress.note(
            f"watch stream interrupted ({_error_text(error)}); reconnecting after sequence {last_sequence} "
            f"in {delay:.1f} s (attempt {attempt})"
        )

    try:
        events = client.watch(name, after, idle_timeout_s=WATCH_IDLE_TIMEOUT_S, on_retry=on_retry)
        async for event in events:
            kind = event.WhichOneof("event")
            if as_json and kind == "complete":
                complete = event
            elif as_json:
                print(json.dumps(event_json(event)), flush=True)
            else:
                progress.event(event)
            if kind != "heartbeat":
                last_event, last_sequence = event, event.sequence
    except (StreamBroken, TimeoutError) as exc:  # the reconnects ran out
        progress.close()
        detail = str(exc) or f"no event or heartbeat for {WATCH_IDLE_TIMEOUT_S:.0f} s"
        print(f"error: lost the watch stream of {name} ({detail}); resume with: framewise watch {name} --after {last_sequence}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:  # Ctrl-C
        progress.close()
        print(f"\nstopped watching; the job goes on. Resume with: framewise watch {name} --after {last_sequence}", file=sys.stderr)
        raise
    progress.close()
    try:
        op = await client.get_operation(name)
    except BaseException:
        if complete is not None:  # the event as it came, without the results it could not get
            print(json.dumps(event_json(complete)), flush=True)
        raise
    if complete is not None:
        print(json.dumps(event_json(complete) | _results_json(operation_response(op))), flush=True)
    meta = job_metadata(op)
    if last_event is not None and last_event.WhichOneof("event") == "error":
        error = last_event.error
        print(
            f"{name} FAILED at {stage_name(error.stage)}: {error.kind}: {error.description} "
            f"({error_class_name(error.error_class)})",
            file=sys.stderr,
        )
        return 1
    if meta.state != pb.JOB_STATE_SUCCEEDED:
        reason = f": {status_code(op.error.code).name}: {op.error.message}" if op.HasField("error") else ""
        print(f"{name} {state_name(meta.state)}{reason}", file=sys.stderr)
        return 1
    if not as_json:
        _print_summary(op, meta, time.monotonic() - started)
    return 0


def _print_summary(op: operations_pb2.Operation, meta: pb.JobMetadata, watched_s: float) -> None:
    took = watched_s
    if meta.HasField("create_time") and meta.HasField("end_time"):
        took = (meta.end_time.ToDatetime() - meta.create_time.ToDatetime()).total_seconds()
    print(f"{op.name}: {kind_name(meta.kind)} SUCCEEDED in {took:.1f} s")
    response = operation_response(op)
    if isinstance(response, pb.CreateTalkingVideoResponse):
        b = response.person_box
        matting = "matting skipped" if response.matting_skipped else "background removed"
        print(f"  person box {b.x1:.0f},{b.y1:.0f},{b.x2:.0f},{b.y2:.0f}; {matting}; D-ID talk {response.did_talk_id}")
        _print_persons(response)
    elif isinstance(response, pb.SegmentVideoResponse):
        print(
            f"  {response.frames_processed} frames of a {response.width}x{response.height} video "
            f"at {response.source_fps:.2f} fps"
        )
    artifacts = list(response.artifacts) if response is not None else []
    if isinstance(response, pb.CreateTalkingVideoResponse) and response.video.name not in {a.name for a in artifacts}:
        artifacts.insert(0, response.video)
    if not artifacts:
        return
    print(f"  {'artifact':<24} {'kind':<16} {'media type':<18} {'size':>10}  sha256")
    for a in artifacts:
        print(f"  {a.name:<24} {artifact_kind_name(a.kind):<16} {a.media_type:<18} {_size(a.size_bytes):>10}  {a.sha256[:16]}")
    main = next((a for a in artifacts if a.kind in (pb.ARTIFACT_KIND_TALKING_VIDEO, pb.ARTIFACT_KIND_OVERLAY_MP4)), artifacts[0])
    print(f"download one with: framewise download {op.name} {main.name} OUT")


def _print_persons(response: pb.CreateTalkingVideoResponse) -> None:
    """One row per person tried (rank, state, box, background, artifacts), with the error of a
    person who failed beneath it."""
    persons = talking_video_persons(response)
    made = sum(p.state == pb.JOB_STATE_SUCCEEDED for p in persons)
    print(f"  persons: {response.persons_found} found, {len(persons)} tried, {made} video(s) made")
    print(f"  {'#':>3}  {'state':<10} {'box x1,y1,x2,y2':<20} {'background':<24} artifacts")
    for p in persons:
        b = p.box
        box = f"{b.x1:.0f},{b.y1:.0f},{b.x2:.0f},{b.y2:.0f}"
        names = ", ".join(a.name for a in person_artifacts(p)) or "-"
        print(f"  {p.person:>3}  {state_name(p.state):<10} {box:<20} {_background_text(p.background):<24} {names}")
        if p.HasField("error"):
            e = p.error
            print(f"       error at {stage_name(e.stage)}: {e.kind}: {e.description} ({error_class_name(e.error_class)})")


def _background_text(background: common_pb2.Background) -> str:
    """"color #00ff00", "image (contain, bars #000000)", "transparent", ..."""
    mode = background_mode_name(background.mode or common_pb2.BACKGROUND_MODE_TRANSPARENT).lower()
    if background.mode == common_pb2.BACKGROUND_MODE_COLOR:
        return f"{mode} {background.color}"
    if background.mode == common_pb2.BACKGROUND_MODE_IMAGE:
        fit = background_fit_name(background.fit or common_pb2.BACKGROUND_FIT_COVER).lower()
        return f"{mode} ({fit}, bars {background.color})" if background.color else f"{mode} ({fit})"
    return mode


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, a line per change otherwise."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.drawn = 0  # length of the line on screen, 0 when none
        self.last_key: object = None

    def event(self, event: pb.WatchOperationResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "stage_update":
            u = event.stage_update
            self._line(self._stage_text(u.stage, u.percent, u.message), key=("stage", event.sequence))
        elif kind == "progress_update":
            u = event.progress_update
            message = u.message or (f"{u.done}/{u.total}" if u.total else "")
            self._line(self._stage_text(u.stage, u.percent, message), key=("progress", u.stage, int(u.percent // 10)))
        elif kind == "error":
            e = event.error
            what = f"{error_class_name(e.error_class)} error at {stage_name(e.stage)}: {e.kind}: {e.description}"
            if e.will_retry:
                self.note(f"retry: attempt {e.attempt} failed ({what}); retrying")
            # The final error is reported once the stream ends.
        elif kind == "complete":
            c = event.complete
            self.note(f"{state_name(c.state)}: {len(c.artifacts)} artifact(s)")

    def bytes(self, what: str, done: int, total: int) -> None:
        percent = 100.0 * done / total if total > 0 else 100.0
        text = f"{_bar(percent)} {what} {_size(done)} of {_size(total)} {percent:3.0f}%"
        self._line(text, key=(what, int(percent // 10)))

    def note(self, text: str) -> None:
        self._end_line()
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._end_line()

    @staticmethod
    def _stage_text(stage: int, percent: float, message: str) -> str:
        return f"{_bar(percent)} {stage_name(stage)} {_percent(percent):>3}% {message}"

    def _line(self, text: str, *, key: object) -> None:
        """Redraw the status line; off a terminal print it only when `key` changes (a line per
        stage or per 10 %, not per frame)."""
        if self.quiet:
            return
        if not self.tty:
            if key != self.last_key:
                self.last_key = key
                print(text, file=sys.stderr, flush=True)
            return
        width = max(shutil.get_terminal_size((100, 20)).columns - 1, 20)
        text = text if len(text) <= width else text[: width - 3] + "..."
        print("\r" + text.ljust(self.drawn), end="", file=sys.stderr, flush=True)
        self.drawn = len(text)

    def _end_line(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = 0


# ---------------------------------------------------------------------------- JSON


def event_json(event: pb.WatchOperationResponse) -> dict[str, object]:
    """One watch event as the --json line: stage updates as {sequence, stage, percent, message};
    the other events add "type" ("progress", "error", "complete", "heartbeat") and their fields."""
    out: dict[str, object] = {"sequence": event.sequence}
    kind = event.WhichOneof("event")
    if kind == "stage_update":
        u = event.stage_update
        out.update(stage=stage_name(u.stage), percent=_percent(u.percent), message=u.message)
    elif kind == "progress_update":
        p = event.progress_update
        out.update(type="progress", stage=stage_name(p.stage), percent=_percent(p.percent), message=p.message, done=p.done, total=p.total)
    elif kind == "error":
        e = event.error
        out.update(
            type="error",
            stage=stage_name(e.stage),
            error_class=error_class_name(e.error_class),
            kind=e.kind,
            description=e.description,
            will_retry=e.will_retry,
            attempt=e.attempt,
        )
    elif kind == "complete":
        c = event.complete
        out.update(type="complete", state=state_name(c.state), operation=event.name, artifacts=[artifact_json(a) for a in c.artifacts])
    elif kind == "heartbeat":
        out["type"] = "heartbeat"
    return out


def artifact_json(a: pb.Artifact) -> dict[str, object]:
    return {
        "name": a.name,
        "kind": artifact_kind_name(a.kind),
        "media_type": a.media_type,
        "size_bytes": a.size_bytes,
        "sha256": a.sha256,
    }


def background_json(background: common_pb2.Background) -> dict[str, object]:
    """{"mode": "COLOR", "color": "#00ff00"}; "fit" with an IMAGE background (the picture itself
    is never echoed)."""
    out: dict[str, object] = {"mode": background_mode_name(background.mode or common_pb2.BACKGROUND_MODE_TRANSPARENT)}
    if background.color:
        out["color"] = background.color
    if background.mode == common_pb2.BACKGROUND_MODE_IMAGE:
        out["fit"] = background_fit_name(background.fit or common_pb2.BACKGROUND_FIT_COVER)
    return out


def person_json(p: pb.TalkingVideoPerson) -> dict[str, object]:
    """One person of a talking video: rank, box (corners, original pixels), state, artifacts, and
    its error when it failed."""
    out: dict[str, object] = {
        "person": p.person,
        "box": [round(v, 1) for v in (p.box.x1, p.box.y1, p.box.x2, p.box.y2)],
        "score": round(p.score, 4),
        "state": state_name(p.state),
        "artifacts": [artifact_json(a) for a in person_artifacts(p)],
        "did_talk_id": p.did_talk_id,
        "matting_skipped": p.matting_skipped,
        "matting_skipped_reason": p.matting_skipped_reason,
        "background": background_json(p.background),
    }
    if p.HasField("error"):
        e = p.error
        out["error"] = {
            "stage": stage_name(e.stage),
            "error_class": error_class_name(e.error_class),
            "kind": e.kind,
            "description": e.description,
            "attempt": e.attempt,
        }
    return out


def _results_json(response: JobResponse | None) -> dict[str, object]:
    """What a finished job's JSON adds beyond its artifacts: a talking video's persons."""
    if not isinstance(response, pb.CreateTalkingVideoResponse):
        return {}
    return {
        "persons_found": response.persons_found,
        "background": background_json(response.background),
        "persons": [person_json(p) for p in talking_video_persons(response)],
    }


def operation_json(op: operations_pb2.Operation) -> dict[str, object]:
    meta = job_metadata(op)
    out: dict[str, object] = {
        "name": op.name,
        "done": op.done,
        "kind": kind_name(meta.kind),
        "state": state_name(meta.state),
        "stage": stage_name(meta.stage),
        "percent": _percent(meta.percent),
        "message": meta.message,
        "last_sequence": meta.last_sequence,
        # The replica running the job (or that ran it last); "" before any claimed it.
        "replica": meta.replica,
    }
    if meta.state == pb.JOB_STATE_QUEUED:
        out["queue_position"] = meta.queue_position
    if meta.HasField("create_time"):
        out["create_time"] = meta.create_time.ToJsonString()
    if op.HasField("error"):
        out["error"] = {"code": status_code(op.error.code).name, "message": op.error.message}
    response = operation_response(op)
    if response is not None:
        out["artifacts"] = [artifact_json(a) for a in response.artifacts]
        out.update(_results_json(response))
    return out


# ---------------------------------------------------------------------------- parsing and formatting


def _parse_box(text: str) -> tuple[float, float, float, float]:
    """x,y,w,h (as `framewise track`) -> corners x1, y1, x2, y2."""
    from clients.track_cli import _parse_box as parse_xywh

    x1, y1, x2, y2 = parse_xywh(text)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"--box width and height must be positive, got {text!r}")
    return x1, y1, x2, y2


def _parse_point(text: str, option: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be x,y (two numbers), got {text!r}") from None
    return x, y


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")


def _operation_name(text: str) -> str:
    text = text.strip()
    return text if text.startswith("operations/") else f"operations/{text}"


def _percent(value: float) -> float | int:
    rounded = round(value, 1)
    return int(rounded) if rounded.is_integer() else rounded


def _bar(percent: float) -> str:
    filled = max(0, min(_BAR_WIDTH, round(percent / 100 * _BAR_WIDTH)))
    return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _error_text(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
