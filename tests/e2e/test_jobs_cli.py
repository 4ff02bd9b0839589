"""The jobs commands of the `framewise` CLI (talking-video, segment-video, watch, download,
operations, cancel) against the running orchestrator, and the SDK's resumable watch and
download, both against scripted stubs and through a TCP proxy whose connections are cut."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np
import pytest
from google.longrunning import operations_pb2

from clients.backgrounds import background_option
from clients.channel import Connection
from clients.jobs_sdk import IntegrityError, StreamBroken, job_metadata, operation_result
from clients.sdk import FramewiseClient
from did_emulator import EmulatorHandle
from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as pb
from tests.conftest import Orchestrator, free_port
from tests.e2e.test_cli import FRAMEWISE
from tests.unit.test_did import tone_wav

TALKING_STAGES = [
    ("INITIALIZED", 0), ("UPLOAD_COMPLETE", 20), ("DETECTION_RUNNING", 25), ("DETECTION_COMPLETE", 40),
    ("BACKGROUND_REMOVAL_RUNNING", 50), ("BACKGROUND_REMOVAL_COMPLETE", 60), ("DID_UPLOAD", 70),
    ("DID_PROCESSING", 75), ("DID_COMPLETE", 80), ("FINALIZING", 90), ("COMPLETED", 100),
]  # fmt: skip
SEGMENT_STAGES = ["INITIALIZED", "UPLOAD_COMPLETE", "DECODING", "TRACKING", "WRITING_ARTIFACTS", "FINALIZING", "COMPLETED"]
TIMEOUT_S = 240


def cli(*args: str, server: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FRAMEWISE, "--server", server, *args], check=False, capture_output=True, text=True, timeout=timeout)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def real_events(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line.get("type") != "heartbeat"]


def emulator_reset(did: EmulatorHandle) -> None:
    httpx.post(f"{did.url}/_emulator/reset", timeout=5).raise_for_status()


def inject(did: EmulatorHandle, **spec: object) -> None:
    httpx.post(f"{did.url}/_emulator/faults", json=spec, timeout=5).raise_for_status()


@pytest.fixture(autouse=True)
def _reset_emulator(did_emulator: EmulatorHandle) -> Iterator[None]:
    emulator_reset(did_emulator)
    yield
    emulator_reset(did_emulator)


@pytest.fixture(scope="module")
def voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "voice.wav"
    path.write_bytes(tone_wav(1.0))
    return path


@pytest.fixture(scope="module")
def talking_job(orchestrator: Orchestrator, did_emulator: EmulatorHandle, assets: Path, voice: Path) -> dict:
    """One talking-video job run by the CLI with --watch --json, shared by the tests below."""
    emulator_reset(did_emulator)
    result = cli(
        "talking-video", str(assets / "images" / "zidane.jpg"), str(voice), "--skip-matting", "--watch", "--json",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    return {"result": result, "lines": lines, "events": real_events(lines), "name": lines[-1]["operation"]}


# --------------------------------------------------------------------------- talking video


def test_talking_video_watch_json_streams_every_stage_in_order(talking_job: dict) -> None:
    events = talking_job["events"]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    stage_lines = [e for e in events if "type" not in e]
    assert all(set(e) == {"sequence", "stage", "percent", "message"} for e in stage_lines)
    assert [(e["stage"], e["percent"]) for e in stage_lines] == TALKING_STAGES
    assert stage_lines[-1]["stage"] == "COMPLETED" and stage_lines[-1]["percent"] == 100
    detection = next(e for e in stage_lines if e["stage"] == "DETECTION_COMPLETE")
    assert "Detected 2 persons" in detection["message"]
    complete = events[-1]
    assert complete["type"] == "complete" and complete["state"] == "SUCCEEDED"
    assert complete["operation"].startswith("operations/")
    video = next(a for a in complete["artifacts"] if a["name"] == "talking_video.mp4")
    assert video["kind"] == "TALKING_VIDEO" and video["media_type"] == "video/mp4" and len(video["sha256"]) == 64
    # Heartbeats, if any, carry the last real sequence; the operation name goes to stderr.
    assert all(line["sequence"] <= len(events) for line in talking_job["lines"])
    assert talking_job["name"] in talking_job["result"].stderr


def test_watch_after_resumes_and_prints_a_summary(talking_job: dict, orchestrator: Orchestrator) -> None:
    name = talking_job["name"]
    resumed = cli("watch", name, "--after", "3", "--json", server=orchestrator.address)
    assert resumed.returncode == 0, resumed.stderr
    events = real_events(json_lines(resumed.stdout))
    assert events[0]["sequence"] == 4
    assert events == talking_job["events"][3:]

    # Human output, with the bare id: the progress lines on stderr, the summary on stdout.
    human = cli("watch", name.removeprefix("operations/"), server=orchestrator.address)
    assert human.returncode == 0, human.stderr
    assert "DETECTION_COMPLETE  40% Detected 2 persons" in human.stderr
    assert "COMPLETED 100%" in human.stderr
    assert f"{name}: TALKING_VIDEO SUCCEEDED" in human.stdout
    assert "talking_video.mp4" in human.stdout and "matting skipped" in human.stdout

    last = len(talking_job["events"])
    past = cli("watch", name, "--after", str(last + 5), server=orchestrator.address)
    assert past.returncode == 2 and "INVALID_ARGUMENT" in past.stderr and "after_sequence" in past.stderr


def test_download_writes_the_artifact_and_checks_it(talking_job: dict, orchestrator: Orchestrator, tmp_path: Path) -> None:
    name = talking_job["name"]
    video = next(a for a in talking_job["events"][-1]["artifacts"] if a["name"] == "talking_video.mp4")
    out = tmp_path / "out" / "talk.mp4"
    result = cli("download", name, "talking_video.mp4", str(out), server=orchestrator.address)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert len(data) == video["size_bytes"] and hashlib.sha256(data).hexdigest() == video["sha256"]
    assert video["sha256"] in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["talk.mp4"], "temporary file left behind"
    # Into an existing folder: the artifact's own name.
    into_folder = cli("download", name, "talking_video.mp4", str(tmp_path), server=orchestrator.address)
    assert into_folder.returncode == 0, into_folder.stderr
    assert (tmp_path / "talking_video.mp4").read_bytes() == data

    missing = cli("download", name, "nothing.bin", str(tmp_path / "x"), server=orchestrator.address)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "talking_video.mp4" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_operations_lists_and_filters(talking_job: dict, orchestrator: Orchestrator) -> None:
    listed = cli("operations", "--filter", "state = SUCCEEDED AND kind = TALKING_VIDEO", "--json", server=orchestrator.address)
    assert listed.returncode == 0, listed.stderr
    ops = json_lines(listed.stdout)
    assert talking_job["name"] in [o["name"] for o in ops]
    assert all(o["state"] == "SUCCEEDED" and o["kind"] == "TALKING_VIDEO" and o["done"] for o in ops)
    # The replica that ran them: this one server, named by its default replica id (host name, PID).
    assert {o["replica"] for o in ops} == {f"{socket.gethostname()}-{orchestrator.process.pid}"}
    table = cli("operations", server=orchestrator.address)
    assert table.returncode == 0 and talking_job["name"] in table.stdout
    bad = cli("operations", "--filter", "colour = RED", server=orchestrator.address)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr


def test_cancel_ends_the_job_cancelled(orchestrator: Orchestrator, did_emulator: EmulatorHandle, assets: Path, voice: Path) -> None:
    inject(did_emulator, talk_outcome="done", stage_delay_s=30)
    submitted = cli("talking-video", str(assets / "images" / "zidane.jpg"), str(voice), "--skip-matting", server=orchestrator.address)
    assert submitted.returncode == 0, submitted.stderr
    name = submitted.stdout.strip()
    assert name.startswith("operations/") and "\n" not in name
    cancelled = cli("cancel", name, server=orchestrator.address)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "CANCELLED" in cancelled.stdout
    watched = cli("watch", name, "--json", server=orchestrator.address)
    assert watched.returncode == 1
    assert real_events(json_lines(watched.stdout))[-1] == {
        "sequence": real_events(json_lines(watched.stdout))[-1]["sequence"], "type": "complete", "state": "CANCELLED",
        "operation": name, "artifacts": [],
    }  # fmt: skip
    assert "CANCELLED" in watched.stderr
    again = cli("cancel", name, server=orchestrator.address)
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr


def test_talking_video_submit_json_prints_the_operation(orchestrator: Orchestrator, assets: Path, voice: Path) -> None:
    result = cli(
        "talking-video", str(assets / "images" / "zidane.jpg"), str(voice), "--skip-matting", "--person-index", "0",
        "--json", "--request-id", "cli-test-1",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    op = json.loads(result.stdout)
    assert op["name"].startswith("operations/") and op["kind"] == "TALKING_VIDEO" and op["state"] in ("QUEUED", "RUNNING")
    # The same request id names the same operation; then follow it to the end.
    again = cli("talking-video", str(assets / "images" / "zidane.jpg"), str(voice), "--skip-matting", "--person-index", "0",
                "--request-id", "cli-test-1", server=orchestrator.address)  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip() == op["name"]
    assert cli("watch", op["name"], server=orchestrator.address).returncode == 0


# --------------------------------------------------------------------------- talking video: every person, backgrounds


def test_talking_video_all_persons_over_a_colour(
    orchestrator: Orchestrator, assets: Path, voice: Path, tmp_path: Path
) -> None:
    result = cli(
        "talking-video", str(assets / "images" / "zidane.jpg"), str(voice), "--all-persons", "--background", "#00ff00",
        "--watch", "--json",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    complete = real_events(json_lines(result.stdout))[-1]
    assert complete["type"] == "complete" and complete["state"] == "SUCCEEDED"
    name, persons = complete["operation"], complete["persons"]
    assert complete["persons_found"] == 2 and [p["person"] for p in persons] == [1, 2]
    assert all(p["state"] == "SUCCEEDED" and "error" not in p for p in persons), persons
    assert [[a["name"] for a in p["artifacts"]] for p in persons] == [
        ["person-1.mp4", "person-1-matted.png"], ["person-2.mp4", "person-2-matted.png"],
    ]  # fmt: skip
    green = {"mode": "COLOR", "color": "#00ff00"}
    assert complete["background"] == green and all(p["background"] == green and not p["matting_skipped"] for p in persons)
    assert len({p["did_talk_id"] for p in persons}) == 2 and all(p["did_talk_id"] for p in persons)
    boxes = [p["box"] for p in persons]
    assert boxes[0] != boxes[1] and all(0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 720 for x1, y1, x2, y2 in boxes)
    # The per-person artifacts are the operation's own (same sizes and sha256), ready to download.
    listed = {a["name"]: a for a in complete["artifacts"]}
    assert all(listed[a["name"]] == a for p in persons for a in p["artifacts"])
    photo = cli("download", name, "person-2-matted.png", str(tmp_path), server=orchestrator.address)
    assert photo.returncode == 0, photo.stderr
    pixels = cv2.imread(str(tmp_path / "person-2-matted.png"), cv2.IMREAD_UNCHANGED)
    assert pixels.ndim == 3 and pixels.shape[2] == 3  # RGB: composited, no alpha left
    near_green = (np.abs(pixels.astype(int) - (0, 255, 0)).max(axis=2) <= 8).mean()  # BGR
    assert 0.2 < near_green < 0.9, f"{near_green:.1%} of the photo D-ID got is the green background"

    # The human summary (replayed by `watch`, no new job): a row per person.
    human = cli("watch", name, server=orchestrator.address)
    assert human.returncode == 0, human.stderr
    assert "persons: 2 found, 2 tried, 2 video(s) made" in human.stdout
    for p in persons:
        row = next(line for line in human.stdout.splitlines() if line.startswith(f"  {p['person']:>3}  SUCCEEDED"))
        shown_box = [float(v) for v in row.split()[2].split(",")]
        assert shown_box == pytest.approx(p["box"], abs=1), row
        assert "color #00ff00" in row and row.endswith(f"person-{p['person']}.mp4, person-{p['person']}-matted.png"), row
    # The finished operation's JSON carries the same persons.
    listed_ops = json_lines(cli("operations", "--filter", "kind = TALKING_VIDEO", "--json", server=orchestrator.address).stdout)
    assert next(o for o in listed_ops if o["name"] == name)["persons"] == persons


def test_talking_video_prints_a_failed_persons_error(
    orchestrator: Orchestrator, did_emulator: EmulatorHandle, assets: Path, voice: Path
) -> None:
    # D-ID rejects person 2's talk (permanent: no retry); person 1's video is still made.
    inject(did_emulator, talk_outcome="rejected", source_url="*/person-2-*", kind="FaceError", description="no face in person 2")
    result = cli(
        "talking-video", str(assets / "images" / "zidane.jpg"), str(voice), "--all-persons", "--max-persons", "2",
        "--skip-matting", "--watch",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  persons: 2 found, 2 tried, 1 video(s) made" in lines
    first = next(i for i, line in enumerate(lines) if line.startswith("    1  SUCCEEDED"))
    assert "keep" in lines[first] and lines[first].endswith("person-1.mp4, person-1-crop.jpg"), lines[first]
    second = next(i for i, line in enumerate(lines) if line.startswith("    2  FAILED"))
    assert lines[second].endswith("person-2-crop.jpg"), lines[second]  # the photo is kept, no video
    error = lines[second + 1].strip()
    assert error.startswith("error at DID_PROCESSING: FaceError: ") and "no face in person 2" in error, error
    assert error.endswith("(PERMANENT)"), error


def test_talking_video_refused_options_print_the_status(orchestrator: Orchestrator, assets: Path, voice: Path) -> None:
    photo = str(assets / "images" / "zidane.jpg")
    cases = [
        (["--background", "blurple"], ["INVALID_ARGUMENT", "field background.color", "not a colour"]),
        (["--all-persons", "--max-persons", "99"], ["INVALID_ARGUMENT", "field max_persons"]),
        (["--skip-matting", "--background", "white"], ["INVALID_ARGUMENT", "field background.mode"]),
    ]
    for extra, words in cases:
        result = cli("talking-video", photo, str(voice), *extra, server=orchestrator.address, timeout=60)
        assert result.returncode == 2, (extra, result.stdout, result.stderr)
        assert all(w in result.stderr for w in words), (extra, result.stderr)
        assert result.stdout == ""  # nothing was submitted


# --------------------------------------------------------------------------- video segmentation


def test_segment_video_uploads_and_watches(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    result = cli(
        "segment-video", str(assets / "videos" / "bedroom.mp4"), "--box", "100,100,200,200", "--max-frames", "6",
        "--watch", "--json",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = real_events(json_lines(result.stdout))
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert [e["stage"] for e in events if "type" not in e] == SEGMENT_STAGES
    progress = [e for e in events if e.get("type") == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 6
    complete = events[-1]
    assert complete["type"] == "complete" and complete["state"] == "SUCCEEDED"
    assert {"overlay.mp4", "frames.json", "masks.zip"} <= {a["name"] for a in complete["artifacts"]}
    frames = cli("download", complete["operation"], "frames.json", str(tmp_path), server=orchestrator.address)
    assert frames.returncode == 0, frames.stderr
    assert len(json.loads((tmp_path / "frames.json").read_text())) == 6


def test_segment_video_server_path_human_output(orchestrator: Orchestrator) -> None:
    result = cli(
        "segment-video", "bedroom.mp4", "--server-path", "--box", "300,100,200,300", "--max-frames", "3", "--watch",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "TRACKING" in result.stderr and "%" in result.stderr
    assert "SEGMENT_VIDEO SUCCEEDED" in result.stdout and "3 frames of a 960x540 video" in result.stdout
    assert "overlay.mp4" in result.stdout


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["segment-video", "{tmp}/missing.mp4", "--box", "1,1,10,10"], 2, "missing.mp4 does not exist"),
        (["segment-video", "{videos}/bedroom.mp4", "--box", "1,2,3"], 2, "--box must be x,y,w,h"),
        (["segment-video", "{videos}/bedroom.mp4", "--box", "10,10,0,20"], 2, "width and height must be positive"),
        (["segment-video", "{videos}/bedroom.mp4"], 2, "--box"),
        (["segment-video", "bedroom.mp4", "--server-path", "--box", "5000,10,20,20"], 2, "INVALID_ARGUMENT"),
        (["segment-video", "../videos/bedroom.mp4", "--server-path", "--box", "1,1,10,10"], 2, "server_path"),
        (["talking-video", "{images}/zidane.jpg", "{tmp}/missing.wav"], 2, "missing.wav does not exist"),
        (["talking-video", "{tmp}/notes.txt", "{voice}"], 2, "INVALID_ARGUMENT"),
        (["talking-video", "{images}/zidane.jpg", "{voice}", "--person-point", "5,x"], 2, "--person-point"),
        (["talking-video", "{images}/zidane.jpg", "{voice}", "--max-persons", "2"], 2, "--max-persons applies with --all-persons"),
        (["talking-video", "{images}/zidane.jpg", "{voice}", "--all-persons", "--person-index", "1"], 2, "not allowed with"),
        (["talking-video", "{images}/zidane.jpg", "{voice}", "--background", "{tmp}/beach.png"], 2, "beach.png: no such file"),
        (["talking-video", "{images}/zidane.jpg", "{voice}", "--background", "{tmp}/notes.txt"], 2, "background.image.encoded"),
        (["watch", "operations/0123456789abcdef"], 1, "NOT_FOUND"),
        (["watch", "nosuchjob", "--json"], 1, "NOT_FOUND"),
        (["download", "operations/0123456789abcdef", "talking_video.mp4", "{tmp}/out.mp4"], 1, "NOT_FOUND"),
        (["cancel", "operations/0123456789abcdef"], 1, "NOT_FOUND"),
        (["segment-video", "{videos}/bedroom.mp4", "--box", "1,1,10,10", "--max-frames", "x"], 2, "invalid int value"),
    ],
)
def test_bad_input_exit_codes(
    orchestrator: Orchestrator, assets: Path, voice: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    places = {"tmp": str(tmp_path), "videos": str(assets / "videos"), "images": str(assets / "images"), "voice": str(voice)}
    result = cli(*(a.format(**places) for a in args), server=orchestrator.address, timeout=60)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_exits_1(assets: Path, voice: Path) -> None:
    result = cli("talking-video", str(assets / "images" / "zidane.jpg"), str(voice), server=f"127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 1 and "cannot reach the Framewise service" in result.stderr


# --------------------------------------------------------------------------- SDK: resumable streams (scripted stubs)


def _rpc_error(code: grpc.StatusCode, details: str = "connection lost") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _stage(sequence: int, stage: int = pb.JOB_STAGE_DETECTION_RUNNING) -> pb.WatchOperationResponse:
    event = pb.WatchOperationResponse(sequence=sequence, name="operations/x")
    event.stage_update.stage = stage
    event.stage_update.percent = float(sequence)
    return event


def _heartbeat(sequence: int) -> pb.WatchOperationResponse:
    event = pb.WatchOperationResponse(sequence=sequence, name="operations/x")
    event.heartbeat.SetInParent()
    return event


def _complete(sequence: int) -> pb.WatchOperationResponse:
    event = pb.WatchOperationResponse(sequence=sequence, name="operations/x")
    event.complete.state = pb.JOB_STATE_SUCCEEDED
    return event


class _Stream:
    """A server stream: its items, then an error or a clean end."""

    def __init__(self, items: list[object], error: BaseException | None = None) -> None:
        self.items, self.error, self.cancelled = items, error, False

    async def _run(self) -> AsyncIterator[object]:
        for item in self.items:
            await asyncio.sleep(0)
            yield item
        if self.error is not None:
            raise self.error

    def __aiter__(self) -> AsyncIterator[object]:
        return self._run()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _ScriptedJobs:
    """Stands in for client.jobs: each call of a streaming method returns the next scripted stream."""

    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams
        self.requests: list[object] = []

    def _next(self, request: object, **_: object) -> _Stream:
        self.requests.append(request)
        return self.streams.pop(0)

    WatchOperation = DownloadArtifact = _next


class _ScriptedOperations:
    def __init__(self, op: operations_pb2.Operation) -> None:
        self.op = op

    async def GetOperation(self, request: operations_pb2.GetOperationRequest, **_: object) -> operations_pb2.Operation:
        return self.op


def _done_operation(last_sequence: int) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name="operations/x", done=True)
    op.metadata.Pack(pb.JobMetadata(state=pb.JOB_STATE_SUCCEEDED, last_sequence=last_sequence))
    return op


async def test_watch_reconnects_after_unavailable_and_early_end_without_gap_or_duplicate() -> None:
    async with FramewiseClient(f"127.0.0.1:{free_port()}") as client:
        streams = [
            _Stream([_stage(1), _stage(2), _stage(3)], _rpc_error(grpc.StatusCode.UNAVAILABLE)),
            # The resumed stream repeats an event (at-least-once delivery) and ends early, cleanly.
            _Stream([_stage(3), _stage(4), _heartbeat(4), _stage(5)]),
            _Stream([], _rpc_error(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2")),
            _Stream([_stage(6), _complete(7), _stage(8)]),
        ]
        jobs = _ScriptedJobs(list(streams))
        client.jobs = jobs  # type: ignore[assignment]
        retries: list[tuple[int, grpc.StatusCode]] = []
        events = [
            e async for e in client.watch(
                "operations/x", backoff_s=0.001, on_retry=lambda attempt, error, delay: retries.append((attempt, error.code()))
            )
        ]  # fmt: skip
    real = [e for e in events if e.WhichOneof("event") != "heartbeat"]
    assert [e.sequence for e in real] == [1, 2, 3, 4, 5, 6, 7]
    assert sum(e.WhichOneof("event") == "heartbeat" for e in events) == 1
    assert [r.after_sequence for r in jobs.requests] == [0, 3, 5, 5]
    assert retries == [(1, grpc.StatusCode.UNAVAILABLE), (1, grpc.StatusCode.INTERNAL)]
    assert all(s.cancelled for s in streams)  # every call was ended, also the one left after "complete"


async def test_watch_gives_up_after_bounded_attempts_and_never_retries_not_found() -> None:
    async with FramewiseClient(f"127.0.0.1:{free_port()}") as client:
        streams = [_Stream([_stage(1)] if i == 0 else [], _rpc_error(grpc.StatusCode.UNAVAILABLE)) for i in range(3)]
        jobs = _ScriptedJobs(list(streams))
        client.jobs = jobs  # type: ignore[assignment]
        seen = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for event in client.watch("operations/x", max_attempts=3, backoff_s=0.001):
                seen.append(event.sequence)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert seen == [1] and len(jobs.requests) == 3 and all(s.cancelled for s in streams)

        client.jobs = _ScriptedJobs([_Stream([], _rpc_error(grpc.StatusCode.NOT_FOUND, "no such operation"))])  # type: ignore[assignment]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in client.watch("operations/x", backoff_s=0.001):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # A clean, empty end of a finished operation's stream is its end; of a running one, a break.
        client.jobs = _ScriptedJobs([_Stream([])])  # type: ignore[assignment]
        client.operations = _ScriptedOperations(_done_operation(0))  # type: ignore[assignment]
        assert [e async for e in client.watch("operations/x")] == []
        running = _done_operation(9)
        running.done = False
        client.jobs = _ScriptedJobs([_Stream([]), _Stream([])])  # type: ignore[assignment]
        client.operations = _ScriptedOperations(running)  # type: ignore[assignment]
        with pytest.raises(StreamBroken):
            async for _ in client.watch("operations/x", after_sequence=4, max_attempts=2, backoff_s=0.001):
                pass


def _chunks(data: bytes, size: int, start: int = 0, sha256: str | None = None) -> list[pb.DownloadArtifactResponse]:
    out = []
    for offset in range(start, len(data), size):
        chunk = pb.DownloadArtifactResponse(data=data[offset : offset + size], offset=offset, total_size_bytes=len(data))
        if offset == start:
            chunk.media_type = "application/octet-stream"
            chunk.sha256 = sha256 or hashlib.sha256(data).hexdigest()
        out.append(chunk)
    return out


async def test_download_resumes_from_the_offset_and_verifies(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    async with FramewiseClient(f"127.0.0.1:{free_port()}") as client:
        jobs = _ScriptedJobs([
            _Stream(_chunks(data, 1000)[:3], _rpc_error(grpc.StatusCode.UNAVAILABLE)),
            _Stream(_chunks(data, 1000, start=3000)[:2]),  # ends early, cleanly
            _Stream(_chunks(data, 1000, start=5000)),
        ])  # fmt: skip
        client.jobs = jobs  # type: ignore[assignment]
        result = await client.download_artifact("operations/x", "blob.bin", tmp_path / "blob.bin", backoff_s=0.001)
        assert [r.offset for r in jobs.requests] == [0, 3000, 5000]
        assert (tmp_path / "blob.bin").read_bytes() == data
        assert result.size_bytes == len(data) and result.sha256 == hashlib.sha256(data).hexdigest() and result.resumed == 2

        client.jobs = _ScriptedJobs([_Stream(_chunks(data, 4096, sha256="0" * 64))])  # type: ignore[assignment]
        with pytest.raises(IntegrityError):
            await client.download_artifact("operations/x", "blob.bin", tmp_path / "bad.bin")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]


class _SubmitRecorder:
    """Stands in for client.jobs: records CreateTalkingVideo requests and UploadFile streams."""

    def __init__(self) -> None:
        self.requests: list[pb.CreateTalkingVideoRequest] = []
        self.uploads: list[tuple[pb.UploadHeader, bytes]] = []

    async def CreateTalkingVideo(self, request: pb.CreateTalkingVideoRequest, **_: object) -> operations_pb2.Operation:
        self.requests.append(request)
        return operations_pb2.Operation(name="operations/x")

    async def UploadFile(self, requests: AsyncIterator[pb.UploadFileRequest], **_: object) -> pb.UploadFileResponse:
        messages = [m async for m in requests]
        self.uploads.append((messages[0].header, b"".join(m.chunk for m in messages[1:])))
        return pb.UploadFileResponse(upload_id=f"upload-{len(self.uploads)}")


async def test_sdk_talking_video_options_build_the_request(tmp_path: Path) -> None:
    picture = tmp_path / "beach.png"
    picture.write_bytes(cv2.imencode(".png", np.full((40, 60, 3), (200, 150, 50), np.uint8))[1].tobytes())
    background = background_option(str(picture))  # what `--background beach.png` reads
    assert background == picture.read_bytes()
    async with FramewiseClient(f"127.0.0.1:{free_port()}") as client:
        jobs = _SubmitRecorder()
        client.jobs = jobs  # type: ignore[assignment]
        await client.create_talking_video(
            b"photo", b"audio", all_persons=True, max_persons=2, background=background, fit="contain", bar_color="#202020"
        )
        request = jobs.requests[-1]
        assert request.all_persons and request.max_persons == 2 and not request.HasField("person")
        assert request.background == common_pb2.Background(
            mode=common_pb2.BACKGROUND_MODE_IMAGE, image=common_pb2.Image(encoded=picture.read_bytes()),
            fit=common_pb2.BACKGROUND_FIT_CONTAIN, color="#202020",
        )  # fmt: skip
        assert request.image == b"photo" and request.audio == b"audio" and not jobs.uploads

        # A picture too big to travel inline is uploaded, as the photo would be; a ready
        # Background passed in is left as it was.
        ready = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_IMAGE, image=common_pb2.Image(encoded=bytes(200_000)))
        await client.create_talking_video(b"photo", b"audio", background=ready, inline_limit_bytes=150_000)
        request = jobs.requests[-1]
        header, data = jobs.uploads[-1]
        assert header.kind == pb.FILE_KIND_IMAGE and data == bytes(200_000)
        assert request.background.WhichOneof("image_source") == "image_upload_id"
        assert request.background.image_upload_id == "upload-1" and request.image == b"photo"
        assert ready.WhichOneof("image_source") == "image"

        for word, mode in (("transparent", common_pb2.BACKGROUND_MODE_TRANSPARENT), ("keep", common_pb2.BACKGROUND_MODE_KEEP)):
            await client.create_talking_video(b"photo", b"audio", background=background_option(word))
            assert jobs.requests[-1].background == common_pb2.Background(mode=mode)
        await client.create_talking_video(b"photo", b"audio")
        assert not jobs.requests[-1].HasField("background") and not jobs.requests[-1].all_persons
        with pytest.raises(ValueError, match="max_persons applies with all_persons"):
            await client.create_talking_video(b"photo", b"audio", max_persons=2)
        with pytest.raises(ValueError, match="all_persons"):
            await client.create_talking_video(b"photo", b"audio", all_persons=True, person_index=1)


# --------------------------------------------------------------------------- SDK against the server


class _Proxy:
    """A TCP proxy in front of the orchestrator whose connections can be cut at will."""

    def __init__(self, upstream: str) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.transports: list[asyncio.BaseTransport] = []
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        self.transports += [writer.transport, up_writer.transport]
        for source, dest in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, dest))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, dest: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                dest.write(data)
                await dest.drain()
        dest.close()

    def cut(self) -> None:
        """Reset every open connection (the listener stays up, so the client can reconnect)."""
        for transport in self.transports:
            transport.abort()
        self.transports.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()


async def test_sdk_watch_resumes_across_a_cut_connection(
    orchestrator: Orchestrator, did_emulator: EmulatorHandle, assets: Path
) -> None:
    # D-ID takes ~2 s, so the job is still running when the connection is cut.
    inject(did_emulator, talk_outcome="done", stage_delay_s=1.0)
    proxy = _Proxy(orchestrator.address)
    address = await proxy.start()
    retries: list[BaseException] = []
    try:
        async with FramewiseClient(address, connection=Connection(api_key=orchestrator.api_key)) as client:
            op = await client.create_talking_video(
                (assets / "images" / "zidane.jpg").read_bytes(), tone_wav(1.0), skip_matting=True
            )
            events = []
            async for event in client.watch(op.name, heartbeats=False, backoff_s=0.05, on_retry=lambda a, e, d: retries.append(e)):
                events.append(event)
                if event.sequence == 3:
                    proxy.cut()
            done = await client.get_operation(op.name)
    finally:
        await proxy.close()
    assert retries, "the cut connection was never noticed"
    assert proxy.connections >= 2
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].WhichOneof("event") == "complete" and events[-1].complete.state == pb.JOB_STATE_SUCCEEDED
    # Exactly what a watcher that never lost its stream gets.
    async with FramewiseClient(orchestrator.address, connection=Connection(api_key=orchestrator.api_key)) as direct:
        full = [e async for e in direct.watch(op.name, heartbeats=False)]
        partial = [e async for e in direct.watch(op.name, 5, heartbeats=False)]
        stats = await direct.storage_stats()
        listed = [o.name async for o in direct.list_operations("kind = TALKING_VIDEO", page_size=1)]
        waited = await direct.wait_operation(op.name, timeout_s=5)
    assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in full]
    assert partial == full[5:]
    assert job_metadata(done).state == pb.JOB_STATE_SUCCEEDED and job_metadata(done).last_sequence == full[-1].sequence
    response = operation_result(done)
    assert isinstance(response, pb.CreateTalkingVideoResponse) and response.video.name == "talking_video.mp4"
    assert [t.tier for t in stats.tiers] == ["uploads", "processed", "videos", "temp"]
    assert op.name in listed and len(listed) == len(set(listed))
    assert waited.done and waited.name == op.name


async def test_sdk_uploads_large_inputs_and_downloads(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    async with FramewiseClient(orchestrator.address, connection=Connection(api_key=orchestrator.api_key)) as client:
        image = assets / "images" / "zidane.jpg"
        uploaded = await client.upload_file(image, "image", chunk_bytes=50_000)
        data = image.read_bytes()
        assert uploaded.size_bytes == len(data) and uploaded.sha256 == hashlib.sha256(data).hexdigest()
        # A limit below the photo's size sends it through UploadFile; the audio stays inline.
        uploads: list[object] = []
        upload_file = client.upload_file

        async def spy(source: object, kind: object, **kwargs: object) -> pb.UploadFileResponse:
            uploads.append(kind)
            return await upload_file(source, kind, **kwargs)  # type: ignore[arg-type]

        client.upload_file = spy  # type: ignore[method-assign]
        op = await client.create_talking_video(image, tone_wav(0.5), skip_matting=True, inline_limit_bytes=100_000)
        assert uploads == ["image"]
        async for _ in client.watch(op.name, heartbeats=False):
            pass
        done = await client.wait_operation(op.name)
        response = operation_result(done)
        result = await client.download_artifact(op.name, response.video.name, tmp_path / "talk.mp4")
        assert result.sha256 == response.video.sha256 and result.size_bytes == response.video.size_bytes
        assert hashlib.sha256((tmp_path / "talk.mp4").read_bytes()).hexdigest() == response.video.sha256
        await client.delete_operation(op.name)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.get_operation(op.name)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
