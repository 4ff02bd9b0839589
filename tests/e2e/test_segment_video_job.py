"""SegmentVideoJob's stages run directly with a real JobContext (SQLite store, event bus,
storage, admission) and a real VideoPredictor on the test Triton (SAM 2 stand-ins at S=256),
on a short sampled part of bedroom.mp4. Validation and the stages before tracking need no Triton."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import ServiceError
from server.jobs.engine.admission import Admission
from server.jobs.engine.context import JobContext
from server.jobs.engine.events import EventBus
from server.jobs.engine.failures import JobCancelled, JobFailure
from server.jobs.files.storage import StorageConfig, StorageManager
from server.jobs.files.uploads import UploadStore
from server.jobs.kinds.segment_video import SegmentVideoJob
from server.jobs.kinds.segment_video.propagation import TRACKS_FILE
from server.jobs.store.sqlite import SqliteJobStore
from server.metrics import Metrics
from server.sam2 import contract as sam2
from server.sam2.video_predictor import VideoPredictor
from server.triton.client import TritonClient
from server.triton.monitor import TritonMonitor
from server.triton.runner import InferenceRunner
from server.vision import rle

try:
    import av
except ImportError:  # PyAV is a dev extra: without it there is no masks.mkv
    av = None

VIDEOS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "videos"
BEDROOM = VIDEOS / "bedroom.mp4"  # 960x540, 30 fps, 200 frames
WIDTH, HEIGHT = 960, 540
BOX = common_pb2.BoundingBox(x1=330, y1=140, x2=640, y2=470)
S = jobs_pb2.JobStage
A = jobs_pb2.ArtifactKind
FRAME_BYTES = WIDTH * HEIGHT * 3


@dataclass
class Harness:
    store: SqliteJobStore
    bus: EventBus
    storage: StorageManager
    admission: Admission
    uploads: UploadStore
    tmp: Path

    async def job(self, request: jobs_pb2.SegmentVideoRequest) -> JobContext:
        op, _ = await self.store.create_operation(
            kind=jobs_pb2.JOB_KIND_SEGMENT_VIDEO, request=request.SerializeToString()
        )
        workdir = self.storage.job_dir(op.name)
        return JobContext(
            operation=op,
            request=request,
            bus=self.bus,
            storage=self.storage,
            admission=self.admission,
            workdir=workdir,
            state=JobContext.load_state(workdir),
        )

    async def upload(self, path: Path, kind: int = jobs_pb2.FILE_KIND_VIDEO) -> str:
        data = path.read_bytes()

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(data), 1 << 20):
                yield data[offset : offset + (1 << 20)]

        info = await self.uploads.receive(kind, path.name, len(data), hashlib.sha256(data).hexdigest(), chunks())
        return info.upload_id

    async def events(self, name: str) -> list[tuple[str, object]]:
        parsers = {"stage_update": jobs_pb2.StageUpdate, "progress_update": jobs_pb2.ProgressUpdate}
        return [
            (e.event_type, parsers[e.event_type].FromString(e.payload))
            for e in await self.store.events_after(name)
            if e.event_type in parsers
        ]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    store = await SqliteJobStore(tmp_path / "jobs.db").open()
    storage = StorageManager(StorageConfig(root=tmp_path / "storage"))
    try:
        yield Harness(store, EventBus(store), storage, Admission(), UploadStore(storage, max_bytes=64 << 20), tmp_path)
    finally:
        await store.close()


@pytest.fixture(scope="module")
async def predictor(triton) -> AsyncIterator[VideoPredictor]:  # conftest's TritonProcess
    client = TritonClient(triton.url)
    metrics = Metrics(CollectorRegistry())
    monitor = TritonMonitor(client, {"tracking": sam2.TRACKING_MODELS}, health_aio.HealthServicer(), metrics)
    await monitor.refresh()
    assert monitor.serving, monitor.state.last_error
    runner = InferenceRunner(client, metrics)
    try:
        yield VideoPredictor(runner, monitor, max_pixels=3_000_000)
    finally:
        await runner.close()
        await client.close()


def offline_predictor() -> VideoPredictor:
    """Validation and the stages before TRACKING only read max_pixels."""
    return VideoPredictor(None, None, max_pixels=3_000_000)  # type: ignore[arg-type]


def pipeline(predictor: VideoPredictor, h: Harness, **kwargs: object) -> SegmentVideoJob:
    return SegmentVideoJob(predictor, h.uploads, media_root=VIDEOS, progress_every=4, **kwargs)  # type: ignore[arg-type]


async def run_all(p: SegmentVideoJob, ctx: JobContext) -> None:
    for stage in p.stages():
        await stage.run(ctx)
        await ctx.bus.store.update_operation(ctx.name, last_completed_stage=stage.checkpoint)


def tracks(ctx: JobContext) -> list[dict]:
    return [json.loads(line) for line in (ctx.workdir / TRACKS_FILE).read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- with Triton


async def test_upload_job_tracks_both_ways_and_writes_artifacts(harness: Harness, predictor: VideoPredictor) -> None:
    upload_id = await harness.upload(BEDROOM)
    request = jobs_pb2.SegmentVideoRequest(upload_id=upload_id, prompt_frame_index=5, box=BOX, max_frames=12)
    p = pipeline(predictor, harness)
    await p.validate(request)
    ctx = await harness.job(request)
    await run_all(p, ctx)

    # Stage events in order with their percents; tracking progress in between.
    events = await harness.events(ctx.name)
    stages = [(m.stage, m.percent) for kind, m in events if kind == "stage_update"]
    assert stages == [
        (S.JOB_STAGE_UPLOAD_COMPLETE, 5),
        (S.JOB_STAGE_DECODING, 10),
        (S.JOB_STAGE_TRACKING, 15),
        (S.JOB_STAGE_WRITING_ARTIFACTS, 90),
        (S.JOB_STAGE_FINALIZING, 95),
    ]
    tracking = [m for kind, m in events if kind == "progress_update" and m.stage == S.JOB_STAGE_TRACKING]
    assert [(m.done, m.total) for m in tracking] == [(4, 12), (8, 12), (12, 12)]
    assert [m.percent for m in tracking] == sorted(m.percent for m in tracking) and tracking[-1].percent == 85
    percents = [m.percent for _, m in events]
    assert percents == sorted(percents)
    decoding = next(m for kind, m in events if kind == "stage_update" and m.stage == S.JOB_STAGE_DECODING)
    assert "12 of 200 frames" in decoding.message and "fps" in decoding.message

    # One line per processed frame: backward before the prompt frame, forward from it.
    plan = ctx.state["plan"]
    assert plan == [0, 16, 33, 50, 66, 83, 100, 116, 133, 150, 166, 183]
    lines = tracks(ctx)
    assert [r["frame_index"] for r in lines] == list(range(12))
    assert [r["source_frame_index"] for r in lines] == plan
    assert [r["direction"] for r in lines] == ["backward"] * 5 + ["forward"] * 7
    for record in lines:
        assert record["time_s"] == pytest.approx(record["source_frame_index"] / 30.0)
        (obj,) = record["objects"]
        assert obj["id"] == 1 and obj["rle"]["size"] == [HEIGHT, WIDTH]
        assert rle.decode(obj["rle"]["counts"], HEIGHT, WIDTH).shape == (HEIGHT, WIDTH)

    # Artifacts: recorded, placed, sha256 right; contents agree with tracks.jsonl.
    records = {a.name: a for a in await harness.store.list_artifacts(ctx.name)}
    expected = ["masks.zip", "overlay.mp4", "frames.json"] + (["masks.mkv"] if av is not None else [])
    assert sorted(records) == sorted(expected)
    for record in records.values():
        path = Path(record.path)
        assert path.is_file() and path.stat().st_size == record.size and sha256(path) == record.sha256
        assert path.is_relative_to(harness.storage.tier_dir("videos"))
    labels = [
        np.where(rle.decode(r["objects"][0]["rle"]["counts"], HEIGHT, WIDTH), 255, 0).astype(np.uint8) for r in lines
    ]
    with zipfile.ZipFile(records["masks.zip"].path) as archive:
        assert archive.namelist() == [f"{i:06d}.png" for i in plan]
        for name, expected_mask in zip(archive.namelist(), labels, strict=True):
            png = cv2.imdecode(np.frombuffer(archive.read(name), np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(png, expected_mask)
    if av is not None:
        with av.open(records["masks.mkv"].path) as container:
            decoded = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
        assert len(decoded) == 12
        for got, expected_mask in zip(decoded, labels, strict=True):
            np.testing.assert_array_equal(got, expected_mask)
    capture = cv2.VideoCapture(records["overlay.mp4"].path)
    assert (capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(3), capture.get(4)) == (12, WIDTH, HEIGHT)
    capture.release()
    frames = json.loads(Path(records["frames.json"].path).read_text())
    assert [f["source_frame_index"] for f in frames] == plan
    assert set(frames[0]) == {"frame_index", "source_frame_index", "time_s", "objects"}
    assert set(frames[0]["objects"][0]) == {"id", "box", "score", "present", "object_score", "kalman_selected"}
    assert frames[5]["objects"][0]["box"] == lines[5]["objects"][0]["box"]

    # The response: from the state and the stored artifacts.
    response = await p.response(ctx)
    assert (response.frames_processed, response.source_fps, response.width, response.height) == (
        12,
        30.0,
        WIDTH,
        HEIGHT,
    )
    assert sorted(a.name for a in response.artifacts) == sorted(expected)
    for artifact in response.artifacts:
        assert artifact.sha256 == records[artifact.name].sha256 and artifact.expire_time.seconds > 0
    assert not (ctx.workdir / "source").exists()  # the upload's working copy is gone after FINALIZING

    # Idempotence: TRACKING again without its output (and with the backward frames decoded in
    # blocks of two) gives the same file byte for byte; WRITING_ARTIFACTS again the same masks.
    first = (ctx.workdir / TRACKS_FILE).read_bytes()
    (ctx.workdir / TRACKS_FILE).unlink()
    await ctx.save_state(source=str(BEDROOM))  # FINALIZING removed the working copy
    small = pipeline(predictor, harness, reverse_buffer_bytes=2 * FRAME_BYTES)
    stages_by_checkpoint = {s.checkpoint: s for s in small.stages()}
    await stages_by_checkpoint[S.JOB_STAGE_TRACKING].run(ctx)
    assert (ctx.workdir / TRACKS_FILE).read_bytes() == first
    await stages_by_checkpoint[S.JOB_STAGE_WRITING_ARTIFACTS].run(ctx)
    again = {a.name: a for a in await harness.store.list_artifacts(ctx.name)}
    assert sorted(again) == sorted(records)
    for name in again.keys() - {"overlay.mp4"}:  # libx264's bitstream is not reproducible
        assert again[name].sha256 == records[name].sha256, name
    assert sha256(Path(again["overlay.mp4"].path)) == again["overlay.mp4"].sha256


async def test_server_path_job_forward_only_with_chosen_artifacts(harness: Harness, predictor: VideoPredictor) -> None:
    request = jobs_pb2.SegmentVideoRequest(
        server_path="bedroom.mp4",
        points=[common_pb2.PointPrompt(point=common_pb2.Point(x=480, y=300), label=common_pb2.POINT_LABEL_POSITIVE)],
        sample_fps=10,
        max_frames=6,
        artifacts=[A.ARTIFACT_KIND_FRAMES_JSON, A.ARTIFACT_KIND_MASK_PNG_ZIP],
    )
    p = pipeline(predictor, harness)
    await p.validate(request)
    ctx = await harness.job(request)
    await run_all(p, ctx)
    lines = tracks(ctx)
    assert len(lines) == 6 and {r["direction"] for r in lines} == {"forward"}
    assert ctx.state["plan"] == sampling_reference(sample_fps=10, max_frames=6)
    names = sorted(a.name for a in await harness.store.list_artifacts(ctx.name))
    assert names == ["frames.json", "masks.zip"]
    assert ctx.state["output_fps"] == pytest.approx(30.0 * 6 / 200)
    assert Path(ctx.state["source"]) == BEDROOM.resolve()  # a server path is read in place


def sampling_reference(*, sample_fps: float, max_frames: int) -> list[int]:
    ticks = [round(k * 3) for k in range(67)]  # 30 fps -> 10 fps: every third frame
    keep = [int(np.floor(i * len(ticks) / max_frames + 1e-6)) for i in range(max_frames)]
    return [ticks[i] for i in keep]


# ---------------------------------------------------------------------- without Triton


async def test_stages_before_tracking_and_cancellation(harness: Harness) -> None:
    request = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=3)
    p = pipeline(offline_predictor(), harness)
    ctx = await harness.job(request)
    stages = list(p.stages())
    assert [s.checkpoint for s in stages] == [
        S.JOB_STAGE_UPLOAD_COMPLETE,
        S.JOB_STAGE_DECODING,
        S.JOB_STAGE_TRACKING,
        S.JOB_STAGE_WRITING_ARTIFACTS,
        S.JOB_STAGE_FINALIZING,
    ]
    await stages[0].run(ctx)
    await stages[1].run(ctx)
    assert JobContext.load_state(ctx.workdir)["plan"] == [0, 66, 133]
    ctx.cancel_requested = True
    with pytest.raises(JobCancelled):
        await stages[2].run(ctx)
    assert not (ctx.workdir / TRACKS_FILE).exists()


async def test_corrupt_video_fails_permanently(harness: Harness, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    p = SegmentVideoJob(offline_predictor(), harness.uploads, media_root=media)
    request = jobs_pb2.SegmentVideoRequest(server_path="noise.mp4", box=BOX)
    with pytest.raises(ServiceError) as rejected:
        await p.validate(request)
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rejected.value.violations[0].field == "server_path"
    ctx = await harness.job(request)  # as if the file broke after the submit
    with pytest.raises(JobFailure) as failed:
        await p.stages()[0].run(ctx)
    assert failed.value.error_class == jobs_pb2.ERROR_CLASS_PERMANENT and failed.value.kind == "corrupt_video"
    assert "re-encode" in failed.value.description


def _point(x: float, y: float) -> common_pb2.PointPrompt:
    return common_pb2.PointPrompt(point=common_pb2.Point(x=x, y=y), label=common_pb2.POINT_LABEL_POSITIVE)


@pytest.mark.parametrize(
    ("request_fields", "field", "code"),
    [
        ({"box": BOX}, "upload_id", grpc.StatusCode.INVALID_ARGUMENT),
        ({"upload_id": "0" * 32, "box": BOX}, "upload_id", grpc.StatusCode.NOT_FOUND),
        ({"upload_id": "not-an-id", "box": BOX}, "upload_id", grpc.StatusCode.INVALID_ARGUMENT),
        ({"server_path": "../videos/bedroom.mp4", "box": BOX}, "server_path", grpc.StatusCode.INVALID_ARGUMENT),
        ({"server_path": "missing.mp4", "box": BOX}, "server_path", grpc.StatusCode.NOT_FOUND),
        ({"server_path": "bedroom.mp4"}, "box", grpc.StatusCode.INVALID_ARGUMENT),
        (
            {"server_path": "bedroom.mp4", "box": common_pb2.BoundingBox(x1=10, y1=10, x2=10, y2=50)},
            "box",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {
                "server_path": "bedroom.mp4",
                "box": common_pb2.BoundingBox(x1=10, y1=10, x2=1000, y2=50),
                "max_frames": 5,
            },
            "box",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {"server_path": "bedroom.mp4", "points": [_point(480, 600)], "max_frames": 5},
            "points",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"server_path": "bedroom.mp4", "box": BOX, "sample_fps": -1}, "sample_fps", grpc.StatusCode.INVALID_ARGUMENT),
        ({"server_path": "bedroom.mp4", "box": BOX, "max_frames": -1}, "max_frames", grpc.StatusCode.INVALID_ARGUMENT),
        (
            {"server_path": "bedroom.mp4", "box": BOX, "max_frames": 12, "prompt_frame_index": 12},
            "prompt_frame_index",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {"server_path": "bedroom.mp4", "box": BOX, "sample_fps": 1, "prompt_frame_index": 7},
            "prompt_frame_index",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"server_path": "bedroom.mp4", "box": BOX}, "max_frames", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            {"server_path": "bedroom.mp4", "box": BOX, "max_frames": 5, "artifacts": [A.ARTIFACT_KIND_TALKING_VIDEO]},
            "artifacts",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
async def test_validate_rejects(harness: Harness, request_fields: dict, field: str, code: grpc.StatusCode) -> None:
    p = SegmentVideoJob(offline_predictor(), harness.uploads, media_root=VIDEOS, max_frames=100)
    with pytest.raises(ServiceError) as rejected:
        await p.validate(jobs_pb2.SegmentVideoRequest(**request_fields))
    assert rejected.value.code == code, rejected.value.message
    assert [v.field for v in rejected.value.violations] == [field], rejected.value.message


async def test_validate_rejects_a_non_video_upload_and_disabled_server_paths(harness: Harness, tmp_path: Path) -> None:
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    upload_id = await harness.upload(image, kind=jobs_pb2.FILE_KIND_IMAGE)
    p = SegmentVideoJob(offline_predictor(), harness.uploads, media_root=None)
    with pytest.raises(ServiceError, match="not a FILE_KIND_VIDEO") as rejected:
        await p.validate(jobs_pb2.SegmentVideoRequest(upload_id=upload_id, box=BOX))
    assert rejected.value.violations[0].field == "upload_id"
    with pytest.raises(ServiceError, match="--media-root") as rejected:
        await p.validate(jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX))
    assert rejected.value.violations[0].field == "server_path"
    # Accepted: a valid upload, sampled, prompted on the last sampled frame.
    video_id = await harness.upload(BEDROOM)
    await p.validate(jobs_pb2.SegmentVideoRequest(upload_id=video_id, box=BOX, sample_fps=1, prompt_frame_index=6))
