"""D-ID client against the D-ID emulator, over real HTTP on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import io
import os
import random
import tempfile
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import httpx
import numpy as np
import pytest

from did_emulator import EmulatorHandle, start_emulator
from did_emulator.multipart import parse_multipart
from server.did import DIDClient, DIDError

API_KEY = "test-key-123"
IMAGE = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "images" / "girl-1.jpg"


def tone_wav(seconds: float = 1.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440.0 * t) * 8000).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorHandle]:
    handle = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.05)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _reset(emulator: EmulatorHandle) -> None:
    httpx.post(f"{emulator.url}/_emulator/reset", timeout=5).raise_for_status()


def inject(emulator: EmulatorHandle, **spec: object) -> None:
    httpx.post(f"{emulator.url}/_emulator/faults", json=spec, timeout=5).raise_for_status()


def requests_to(emulator: EmulatorHandle, method: str, prefix: str) -> list[dict]:
    log = httpx.get(f"{emulator.url}/_emulator/requests", timeout=5).json()["requests"]
    return [r for r in log if r["method"] == method and r["path"].startswith(prefix)]


class Recorder:
    """Fake sleep + on_retry: records delays without waiting, so tests stay fast and exact."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.retries: list[tuple[int, DIDError, float]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)

    def on_retry(self, attempt: int, error: DIDError, delay_s: float) -> None:
        self.retries.append((attempt, error, delay_s))


def make_client(emulator: EmulatorHandle, rec: Recorder | None = None, **kwargs: object) -> DIDClient:
    api_key = str(kwargs.pop("api_key", API_KEY))
    options: dict[str, object] = {
        "timeout_s": 5.0,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        "rng": random.Random(7),
    }
    if rec is not None:
        options.update(sleep=rec.sleep, on_retry=rec.on_retry)
    options.update(kwargs)
    return DIDClient(emulator.url, api_key, **options)  # type: ignore[arg-type]


async def upload_both(client: DIDClient) -> tuple[str, str]:
    image_url = await client.upload_image(IMAGE.read_bytes(), "girl-1.jpg", "image/jpeg")
    audio_url = await client.upload_audio(tone_wav(), "voice.wav", "audio/wav")
    return image_url, audio_url


async def test_happy_path_produces_a_real_mp4_with_audio(emulator: EmulatorHandle) -> None:
    async with make_client(emulator) as client:
        image_url, audio_url = await upload_both(client)
        assert image_url.startswith("s3://") and image_url.endswith("/girl-1.jpg")
        assert audio_url.startswith("s3://") and audio_url.endswith("/voice.wav")
        talk_id = await client.create_talk(image_url, audio_url)
        assert talk_id.startswith("tlk_")
        assert (await client.get_talk(talk_id)).status in ("created", "started")
        talk = await client.wait_for_talk(talk_id, poll_interval_s=0.02, timeout_s=20)
        assert talk.status == "done" and talk.result_url and talk.result_url.startswith("http://")
        video = await client.download(talk.result_url)

    expected = cv2.imread(str(IMAGE))
    height, width = expected.shape[:2]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "talk.mp4")
        Path(path).write_bytes(video)
        capture = cv2.VideoCapture(path)
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        capture.release()
        # yuv420p needs even sides: the emulator pads an odd side by one replicated row/column.
        assert frames and frames[0].shape == (height + height % 2, width + width % 2, 3)
        assert len(frames) == pytest.approx(1.5 * 25, abs=2)
        diff = np.abs(frames[0][:height, :width].astype(int) - expected.astype(int)).mean()
        assert diff < 12, f"first frame does not look like the uploaded image (mean abs diff {diff:.1f})"
        with av.open(path) as container:
            assert container.streams.video and container.streams.audio
            audio = container.streams.audio[0]
            assert audio.codec_context.name == "aac"
            samples = sum(f.samples for f in container.decode(audio=0))
            assert samples / audio.sample_rate == pytest.approx(1.5, abs=0.1)


async def test_429_three_times_then_success_honours_retry_after(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    async with make_client(emulator, rec) as client:
        image_url, audio_url = await upload_both(client)
        inject(emulator, path="/talks", method="POST", status=429, times=3, retry_after=0)
        talk_id = await client.create_talk(image_url, audio_url)
    assert talk_id.startswith("tlk_")
    assert [r[0] for r in rec.retries] == [1, 2, 3]
    assert all(r[1].status == 429 and r[1].error_class == "external" and r[1].retryable for r in rec.retries)
    assert rec.sleeps == [0.0, 0.0, 0.0]  # Retry-After: 0 wins over the backoff
    assert [r["status"] for r in requests_to(emulator, "POST", "/talks")] == [429, 429, 429, 201]


async def test_5xx_backoff_is_full_jitter_capped_and_retry_after_used_when_given(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    async with make_client(emulator, rec, backoff_base_s=0.5, backoff_cap_s=1.0, max_attempts=5) as client:
        inject(emulator, path="/images", method="POST", status=503, times=4)
        await client.upload_image(IMAGE.read_bytes(), "a.jpg", "image/jpeg")
        inject(emulator, path="/audios", method="POST", status=429, times=1, retry_after=2.5)
        await client.upload_audio(tone_wav(0.5), "a.wav", "audio/wav")
    ceilings = [0.5, 1.0, 1.0, 1.0]
    assert len(rec.sleeps) == 5
    assert all(0.0 <= delay <= ceiling for delay, ceiling in zip(rec.sleeps[:4], ceilings, strict=True))
    assert len(set(rec.sleeps[:4])) > 1  # jittered, not a fixed schedule
    assert rec.sleeps[4] == 2.5


async def test_permanent_400_surfaces_kind_and_description_without_retry(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    async with make_client(emulator, rec) as client:
        _, audio_url = await upload_both(client)
        with pytest.raises(DIDError) as info:
            await client.create_talk("s3://d-id-emulator/nope/x.jpg", audio_url)
    error = info.value
    assert (error.status, error.kind, error.error_class, error.retryable) == (
        400,
        "ValidationError",
        "permanent",
        False,
    )
    assert "source_url" in error.description and "source_url" in str(error)
    assert rec.retries == [] and len(requests_to(emulator, "POST", "/talks")) == 1


async def test_wrong_key_is_401_with_an_actionable_message(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    async with make_client(emulator, rec, api_key="wrong-key") as client:
        with pytest.raises(DIDError) as info:
            await client.upload_image(IMAGE.read_bytes(), "girl-1.jpg", "image/jpeg")
    error = info.value
    assert (error.status, error.kind, error.error_class, error.retryable) == (
        401,
        "AuthorizationError",
        "permanent",
        False,
    )
    assert "FRAMEWISE_DID_API_KEY" in str(error) and "wrong-key" not in str(error)
    assert rec.retries == []
    with pytest.raises(DIDError, match="FRAMEWISE_DID_API_KEY"):
        DIDClient(emulator.url, "", timeout_s=1)


async def test_402_out_of_credits_is_a_resource_error_not_retried(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    async with make_client(emulator, rec) as client:
        image_url, audio_url = await upload_both(client)
        inject(emulator, path="/talks", method="POST", status=402, times=5, description="not enough credits")
        with pytest.raises(DIDError) as info:
            await client.create_talk(image_url, audio_url)
    error = info.value
    assert (error.status, error.error_class, error.retryable) == (402, "resource", False)
    assert error.kind == "InsufficientCreditsError" and "credits" in str(error)
    assert rec.retries == [] and len(requests_to(emulator, "POST", "/talks")) == 1


async def test_timeouts_are_retried_then_fail_as_recoverable(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    inject(emulator, path="/talks/*", method="GET", delay_s=3, times=3)
    async with make_client(emulator, rec, timeout_s=0.3, max_attempts=3) as client:
        with pytest.raises(DIDError) as info:
            await client.get_talk("tlk_slow")
    error = info.value
    assert (error.status, error.kind, error.error_class, error.retryable) == (None, "Timeout", "recoverable", True)
    assert error.attempts == 3 and "after 3 attempts" in str(error)
    assert [r[0] for r in rec.retries] == [1, 2]
    assert len(requests_to(emulator, "GET", "/talks/tlk_slow")) == 3


async def test_a_talk_is_created_once_per_pair_of_uploads(emulator: EmulatorHandle) -> None:
    # A resumed job or a retried stage asks again with the same uploads: the talk that exists is adopted.
    async with make_client(emulator) as client:
        image_url, audio_url = await upload_both(client)
        first = await client.create_talk(image_url, audio_url)
        assert await client.create_talk(image_url, audio_url) == first
        other_audio = await client.upload_audio(tone_wav(0.5), "other.wav", "audio/wav")
        assert await client.create_talk(image_url, other_audio) != first  # other uploads: another talk
    assert [r["status"] for r in requests_to(emulator, "POST", "/talks")] == [201, 201]


async def test_a_post_that_timed_out_but_landed_is_adopted_not_repeated(emulator: EmulatorHandle) -> None:
    # D-ID creates the talk after the client's timeout fired: the client gives the request landing_wait_s,
    # finds the talk by its uploads and does not POST again (a second talk would be billed).
    rec = Recorder()
    async with make_client(emulator, timeout_s=0.4, landing_wait_s=1.0, on_retry=rec.on_retry) as client:
        image_url, audio_url = await upload_both(client)
        inject(emulator, path="/talks", method="POST", delay_s=0.6, times=1)
        talk_id = await client.create_talk(image_url, audio_url)
        talk = await client.get_talk(talk_id)
    assert talk.id == talk_id
    assert len(requests_to(emulator, "POST", "/talks")) == 1  # only the one that timed out
    assert [(a, e.kind) for a, e, _ in rec.retries] == [(1, "Timeout")]


async def test_a_post_that_failed_for_sure_is_posted_again(emulator: EmulatorHandle) -> None:
    # A 503 that created nothing: the lookup finds no talk, the POST is repeated and succeeds.
    rec = Recorder()
    async with make_client(emulator, rec) as client:
        image_url, audio_url = await upload_both(client)
        inject(emulator, path="/talks", method="POST", status=503, times=1)
        talk_id = await client.create_talk(image_url, audio_url)
    assert [r["status"] for r in requests_to(emulator, "POST", "/talks")] == [503, 201]
    assert talk_id and rec.sleeps[-1] == 5.0  # landing_wait_s defaults to the timeout


@pytest.mark.parametrize("outcome,error_class", [("rejected", "permanent"), ("error", "external")])
async def test_a_failed_talk_raises_with_its_kind(emulator: EmulatorHandle, outcome: str, error_class: str) -> None:
    inject(emulator, talk_outcome=outcome, kind="FaceError", description="no face found in the source image")
    async with make_client(emulator) as client:
        talk_id = await client.create_talk(*await upload_both(client))
        with pytest.raises(DIDError) as info:
            await client.wait_for_talk(talk_id, poll_interval_s=0.02, timeout_s=20)
        talk = await client.get_talk(talk_id)
    error = info.value
    assert (error.kind, error.error_class, error.retryable) == ("FaceError", error_class, False)
    assert "no face found" in str(error) and talk_id in str(error)
    assert (talk.status, talk.error_kind, talk.result_url) == (outcome, "FaceError", None)


@pytest.mark.parametrize("outcome", ["error", "rejected"])
async def test_a_talk_that_ended_in_failure_is_never_adopted(emulator: EmulatorHandle, outcome: str) -> None:
    # A retry after D-ID's `error` asks for a talk with the same uploads: the failed talk is listed
    # for them, but polling it again can only fail again; a new talk is created (and adopted after).
    inject(emulator, talk_outcome=outcome, kind="RenderError", description="rendering failed")
    async with make_client(emulator) as client:
        image_url, audio_url = await upload_both(client)
        failed = await client.create_talk(image_url, audio_url)
        with pytest.raises(DIDError):
            await client.wait_for_talk(failed, poll_interval_s=0.02, timeout_s=20)
        retried = await client.create_talk(image_url, audio_url)
        assert retried != failed
        assert (await client.wait_for_talk(retried, poll_interval_s=0.02, timeout_s=20)).status == "done"
        assert await client.create_talk(image_url, audio_url) == retried  # a live (here done) talk is adopted
    assert [r["status"] for r in requests_to(emulator, "POST", "/talks")] == [201, 201]


async def test_a_talk_outcome_can_target_one_talk_by_source_or_by_number(emulator: EmulatorHandle) -> None:
    # The emulator's fault injection for a video per person: one talk of several fails, whatever
    # the order they are created in; the untargeted "next talk" outcome keeps its meaning.
    inject(emulator, talk_outcome="rejected", source_url="*/second.jpg", kind="FaceError", description="no face")
    inject(emulator, talk_outcome="error", talk_index=3, kind="RenderError", description="third talk")
    inject(emulator, talk_outcome="done", stage_delay_s=0.01)
    statuses = {}
    async with make_client(emulator) as client:
        audio_url = await client.upload_audio(tone_wav(0.5), "voice.wav", "audio/wav")
        for name in ("first.jpg", "second.jpg", "third.jpg", "fourth.jpg"):
            image_url = await client.upload_image(IMAGE.read_bytes(), name, "image/jpeg")
            talk_id = await client.create_talk(image_url, audio_url)
            try:
                await client.wait_for_talk(talk_id, poll_interval_s=0.02, timeout_s=20)
                statuses[name] = "done"
            except DIDError as error:
                statuses[name] = error.kind
    assert statuses == {"first.jpg": "done", "second.jpg": "FaceError", "third.jpg": "RenderError", "fourth.jpg": "done"}
    pending = httpx.get(f"{emulator.url}/_emulator/requests", timeout=5).json()
    assert [o["fired"] for o in pending["targeted_talk_outcomes"]] == [1, 1]  # each used once (times=1)
    assert pending["pending_talk_outcomes"] == []  # the untargeted one went to the first talk


async def test_wait_gives_up_after_its_timeout(emulator: EmulatorHandle) -> None:
    inject(emulator, talk_outcome="done", stage_delay_s=30)
    async with make_client(emulator) as client:
        talk_id = await client.create_talk(*await upload_both(client))
        with pytest.raises(DIDError) as info:
            await client.wait_for_talk(talk_id, poll_interval_s=0.05, timeout_s=0.2)
    assert (info.value.kind, info.value.error_class) == ("TalkTimeout", "recoverable")


async def test_cancelling_wait_for_talk_stops_polling(emulator: EmulatorHandle) -> None:
    inject(emulator, talk_outcome="done", stage_delay_s=30)
    async with make_client(emulator) as client:
        talk_id = await client.create_talk(*await upload_both(client))
        task = asyncio.create_task(client.wait_for_talk(talk_id, poll_interval_s=0.03, timeout_s=60))
        await asyncio.sleep(0.3)
        assert len(requests_to(emulator, "GET", f"/talks/{talk_id}")) >= 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        polls = len(requests_to(emulator, "GET", f"/talks/{talk_id}"))
        await asyncio.sleep(0.3)
        assert len(requests_to(emulator, "GET", f"/talks/{talk_id}")) == polls


async def test_uploads_of_the_wrong_bytes_are_rejected(emulator: EmulatorHandle) -> None:
    rec = Recorder()
    async with make_client(emulator, rec) as client:
        with pytest.raises(DIDError) as bad_image:
            await client.upload_image(tone_wav(), "face.jpg", "image/jpeg")
        with pytest.raises(DIDError) as bad_audio:
            await client.upload_audio(IMAGE.read_bytes(), "voice.wav", "audio/wav")
        with pytest.raises(DIDError) as noise:
            await client.upload_audio(os.urandom(4096), "voice.mp3", "audio/mpeg")
    for info in (bad_image, bad_audio, noise):
        assert (info.value.status, info.value.kind, info.value.error_class) == (400, "ValidationError", "permanent")
    assert "not a decodable image" in bad_image.value.description
    assert "not audio" in bad_audio.value.description
    assert rec.retries == []
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5) as raw:
        missing = await raw.post(
            "/images",
            headers={"Authorization": f"Basic {API_KEY}"},
            files={"photo": ("a.jpg", IMAGE.read_bytes(), "image/jpeg")},
        )
        unauthenticated = await raw.get("/talks/tlk_x")
    assert missing.status_code == 400 and missing.json() == {
        "kind": "ValidationError",
        "description": "missing multipart file field 'image'",
    }
    assert unauthenticated.status_code == 401 and unauthenticated.json()["kind"] == "AuthorizationError"


def test_multipart_parser_round_trips_binary_content() -> None:
    payload = bytes(range(256)) * 8 + b"\r\n--not-the-boundary\r\n\r\n\n\r"
    request = httpx.Request(
        "POST", "http://x/images", files={"image": ("a b.bin", payload, "image/png")}, data={"note": "hi"}
    )
    body = request.read()
    parts = parse_multipart(request.headers["Content-Type"], body)
    assert parts["image"].data == payload and parts["image"].filename == "a b.bin"
    assert parts["image"].content_type == "image/png" and parts["note"].data == b"hi"
