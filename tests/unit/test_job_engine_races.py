"""The job engine where timing decides: a finalize repeated after a crash, cancels racing each
other and a restart, a submit cancelled after its operation is stored, a watch of an operation
that ends or disappears meanwhile, a job that cannot start. Unit tests: no Triton, no gRPC
server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import ServiceError
from server.jobs import EventBus, JobState
from server.jobs.engine.admission import Admission
from server.jobs.engine.context import JobContext
from server.jobs.engine.definition import Stage
from server.jobs.files.uploads import UploadStore
from server.jobs.kinds.talking_video import TalkingVideoJob
from server.jobs.store import ArtifactRecord
from server.servicers.jobs import JobServicer
from tests.unit.test_job_engine import (
    DECODING,
    SEGMENT,
    TIMEOUT_S,
    environment,
    req,
    wait,
    wait_done,
)


def _ctx(env, op, workdir: Path) -> JobContext:
    return JobContext(
        operation=op,
        request=jobs_pb2.CreateTalkingVideoRequest(),
        bus=EventBus(env.store),
        storage=env.storage,
        admission=Admission({"detection": 1}),
        workdir=workdir,
        state=JobContext.load_state(workdir),
    )


async def test_talking_video_finalize_is_idempotent_after_a_crash(tmp_path: Path) -> None:
    """kill -9 after FINALIZING moved talk.mp4 (and person.png) into their tiers but before the
    checkpoint: the resumed stage must not fail because its inputs were already moved."""
    async with environment(tmp_path) as env:
        op, _ = await env.store.create_operation(kind=jobs_pb2.JOB_KIND_TALKING_VIDEO, request=b"")
        workdir = env.storage.job_dir(op.name) / "work"
        workdir.mkdir()
        (workdir / "talk.mp4").write_bytes(b"video bytes")
        (workdir / "person.png").write_bytes(b"png bytes")
        pipeline = TalkingVideoJob(None, None, None, None)  # type: ignore[arg-type]
        await pipeline._finalize(_ctx(env, op, workdir))
        first = {a.name: a for a in await env.store.list_artifacts(op.name)}
        # The restarted process runs FINALIZING again from the same working folder.
        await pipeline._finalize(_ctx(env, op, workdir))
        second = {a.name: a for a in await env.store.list_artifacts(op.name)}
        assert set(second) == {"talking_video.mp4", "person.png"}
        for name, record in second.items():
            assert record.sha256 == first[name].sha256 and record.size == first[name].size
            assert Path(record.path).read_bytes() == Path(first[name].path).read_bytes()


def _servicer(env, queue) -> JobServicer:
    return JobServicer(queue, queue.bus, UploadStore(env.storage, max_bytes=1 << 20), env.storage)


async def test_watch_after_sequence_past_the_end_of_a_running_operation_is_refused(tmp_path: Path) -> None:
    """after_sequence beyond last_sequence on an unfinished operation skipped every later event,
    the terminal one included, so the stream heartbeated forever after the job ended."""
    gate = asyncio.Event()

    async def work(ctx: JobContext) -> None:
        await gate.wait()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        servicer = _servicer(env, queue)
        request = jobs_pb2.WatchOperationRequest(name=op.name, after_sequence=op.last_sequence + 50)
        stream = servicer.WatchOperation(request, None)  # type: ignore[arg-type]
        with pytest.raises(ServiceError) as err:
            await asyncio.wait_for(anext(stream), TIMEOUT_S)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.violations[0].field == "after_sequence"
        gate.set()


async def test_watch_of_an_operation_deleted_meanwhile_is_not_found(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, lambda ctx: asyncio.sleep(0)))
        op, _ = await env.store.create_operation(kind=SEGMENT, request=b"")
        await env.store.update_operation(op.name, state=JobState.FAILED)
        servicer = _servicer(env, queue)
        real_get = env.store.get_operation
        calls = 0

        async def get_then_delete(name: str, *, tenant: str | None = None):
            nonlocal calls
            calls += 1
            result = await real_get(name, tenant=tenant)
            if calls == 1:  # DeleteOperation lands between the servicer's check and the replay
                await env.store.delete_operation(name)
            return result

        env.store.get_operation = get_then_delete  # type: ignore[method-assign]
        try:
            stream = servicer.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), None)  # type: ignore[arg-type]
            with pytest.raises(ServiceError) as err:
                await asyncio.wait_for(anext(stream), TIMEOUT_S)
        finally:
            del env.store.get_operation
        assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_concurrent_cancels_append_a_single_terminal_event(tmp_path: Path) -> None:
    """A second CancelOperation (a client retry) re-cancelled the job task while it was writing
    its CANCELLED event; both callers then wrote one: two terminal events."""
    entered = asyncio.Event()

    async def work(ctx: JobContext) -> None:
        entered.set()
        await asyncio.Event().wait()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work))
        real_emit = queue.bus.emit

        async def slow_emit(name, event_type, payload, **kw):
            if event_type == "complete":
                await asyncio.sleep(0.05)  # the store's single writer thread is busy
            return await real_emit(name, event_type, payload, **kw)

        queue.bus.emit = slow_emit  # type: ignore[method-assign]
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        await wait(entered, "the job to start")

        first = asyncio.create_task(queue.cancel(op.name))
        await asyncio.sleep(0.01)  # the job task is now writing its CANCELLED event
        second = asyncio.create_task(queue.cancel(op.name))
        await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT_S)

        events = await env.store.events_after(op.name)
        assert [e.terminal for e in events].count(True) == 1
        assert (await env.store.get_operation(op.name)).state == JobState.CANCELLED


async def test_job_cancelled_before_a_restart_loses_its_placed_artifacts(tmp_path: Path) -> None:
    """Cancel requested, then the process died before the job saw it: on start the job ends
    CANCELLED, and like any cancelled job leaves no artifact file behind."""
    async with environment(tmp_path) as env:
        op, _ = await env.store.create_operation(kind=SEGMENT, request=b"")
        await env.store.update_operation(op.name, state=JobState.RUNNING)
        placed = env.storage.tier_dir("videos") / op.name.rsplit("/", 1)[-1] / "overlay.mp4"
        placed.parent.mkdir(parents=True)
        placed.write_bytes(b"half a job")
        await env.store.add_artifact(
            ArtifactRecord(op.name, "overlay.mp4", jobs_pb2.ARTIFACT_KIND_OVERLAY_MP4, "video/mp4", str(placed), 10, "0" * 64)
        )
        await env.store.request_cancel(op.name)
        queue = env.queue(Stage(DECODING, lambda ctx: asyncio.sleep(0)))
        await queue.start()
        assert (await env.store.get_operation(op.name)).state == JobState.CANCELLED
        assert not placed.exists()


async def test_submit_cancelled_after_the_operation_is_stored_still_runs_it(tmp_path: Path) -> None:
    """The submit RPC's client gives up (deadline) after create_operation committed but before
    the job was queued: the operation stayed QUEUED forever (a retry with the same request_id
    returned that stuck operation) until the next restart."""
    ran = asyncio.Event()

    async def work(ctx: JobContext) -> None:
        ran.set()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work))
        await queue.start()
        real_emit = queue.bus.emit
        emitting = asyncio.Event()

        async def slow_emit(name, event_type, payload, **kw):
            emitting.set()
            await asyncio.sleep(0.05)
            return await real_emit(name, event_type, payload, **kw)

        queue.bus.emit = slow_emit  # type: ignore[method-assign]
        submit = asyncio.create_task(queue.submit(SEGMENT, req("a"), "rid-1"))
        await wait(emitting, "submit to store the operation")
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        queue.bus.emit = real_emit  # type: ignore[method-assign]
        await wait(ran, "the stored operation to run")
        again = await queue.submit(SEGMENT, req("a"), "rid-1")
        for _ in range(100):
            if (await env.store.get_operation(again.name)).done:
                break
            await asyncio.sleep(0.01)
        assert (await env.store.get_operation(again.name)).state == JobState.SUCCEEDED


async def test_a_job_that_cannot_start_fails_instead_of_hanging(tmp_path: Path) -> None:
    """An unreadable state file (or a full disk) before the first stage: the operation ends
    FAILED with a terminal event instead of staying QUEUED for ever, and the lane serves the
    next job."""
    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, lambda ctx: asyncio.sleep(0)))
        op = await queue.submit(SEGMENT, req("broken"))
        workdir = env.storage.job_dir(op.name) / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "state.json").write_text("{not json")
        await queue.start()
        done, events = await wait_done(queue, op.name)
        assert done.state == JobState.FAILED
        assert events[-1].event_type == "error" and events[-1].terminal
        error = jobs_pb2.JobError.FromString(events[-1].payload)
        assert error.kind == "job_start_failed" and not error.will_retry
        ok = await queue.submit(SEGMENT, req("fine"))
        assert (await wait_done(queue, ok.name))[0].state == JobState.SUCCEEDED
