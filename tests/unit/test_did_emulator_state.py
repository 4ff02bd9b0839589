"""The D-ID emulator keeps its uploads and talks across its own restarts when given a state
folder (``--state-dir`` / DID_EMULATOR_STATE_DIR / ``start_emulator(state_dir=...)``), as D-ID
does: a job resumed after both sides restarted finds its talk. Real HTTP, real restarts (a
thread-served emulator stopped and started again, and the ``python -m did_emulator`` process
killed and run again)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from did_emulator import start_emulator
from did_emulator.__main__ import STATE_DIR_ENV
from did_emulator.state import STATE_FILE
from server.did import DIDClient, DIDError
from tests.unit.test_did import API_KEY, IMAGE, tone_wav, upload_both

ROOT = Path(__file__).resolve().parents[2]
# tgkill(2), a signal to one thread of a process: its syscall number per Linux architecture.
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]


def client(url: str) -> DIDClient:
    return DIDClient(url, API_KEY, timeout_s=5.0, max_attempts=1)


def post_talk(url: str, image_url: str, audio_url: str) -> httpx.Response:
    """POST /talks straight, without the client's adoption of a listed talk."""
    body = {"source_url": image_url, "script": {"type": "audio", "audio_url": audio_url}}
    return httpx.post(f"{url}/talks", json=body, headers={"Authorization": f"Basic {API_KEY}"}, timeout=5)


async def test_talks_and_uploads_survive_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "did-state"
    first = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.05, state_dir=state_dir)
    try:
        async with client(first.url) as did:
            image_url, audio_url = await upload_both(did)
            talk_id = await did.create_talk(image_url, audio_url)
            talk = await did.wait_for_talk(talk_id, poll_interval_s=0.02, timeout_s=30)
            video = await did.download(talk.result_url)
    finally:
        first.stop()
    # The state folder stays (it is not a temporary folder), written whole: no temp file left.
    document = json.loads((state_dir / STATE_FILE).read_text())
    assert [t["id"] for t in document["talks"]] == [talk_id]
    assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]

    second = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.05, state_dir=state_dir)
    try:
        async with client(second.url) as did:
            again = await did.get_talk(talk_id)
            assert again.status == "done" and again.result_url
            assert await did.download(again.result_url) == video
            # The listing knows it too, so a resumed client adopts it instead of paying again.
            assert await did.create_talk(image_url, audio_url) == talk_id
        # The upload URLs are still accepted: a new talk from them is created (201, not 400).
        response = post_talk(second.url, image_url, audio_url)
        assert response.status_code == 201, response.text
        assert response.json()["id"] != talk_id
    finally:
        second.stop()


async def test_a_talk_rendering_at_the_stop_finishes_after_the_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "did-state"
    first = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=1.0, state_dir=state_dir)
    try:
        async with client(first.url) as did:
            image_url, audio_url = await upload_both(did)
            talk_id = await did.create_talk(image_url, audio_url)
            assert (await did.get_talk(talk_id)).status == "created"
    finally:
        first.stop()
    second = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=1.0, state_dir=state_dir)
    try:
        async with client(second.url) as did:
            talk = await did.wait_for_talk(talk_id, poll_interval_s=0.05, timeout_s=30)
            assert talk.status == "done"
            assert len(await did.download(talk.result_url)) > 1000
    finally:
        second.stop()


async def test_stop_lets_the_renders_under_way_finish(tmp_path: Path) -> None:
    handle = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.02, storage_dir=tmp_path / "files")
    try:
        async with client(handle.url) as did:
            image_url = await did.upload_image(IMAGE.read_bytes(), "girl-1.jpg", "image/jpeg")
            # 20 s of audio: a render of ~1.5 s, longer than the server's shutdown takes
            audio_url = await did.upload_audio(tone_wav(20.0), "voice.wav", "audio/wav")
            talk_id = await did.create_talk(image_url, audio_url)
        record = handle.state.talk(talk_id)
        assert record is not None
    finally:
        handle.stop()
    assert record.rendered.is_set() and record.render_error is None
    assert record.video_path.stat().st_size > 1000


async def test_a_failed_talk_stays_failed_after_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "did-state"
    first = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.02, state_dir=state_dir)
    try:
        httpx.post(
            f"{first.url}/_emulator/faults", json={"talk_outcome": "error", "kind": "RenderError"}, timeout=5
        ).raise_for_status()
        async with client(first.url) as did:
            talk_id = await did.create_talk(*await upload_both(did))
    finally:
        first.stop()
    second = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.02, state_dir=state_dir)
    try:
        async with client(second.url) as did:
            with pytest.raises(DIDError) as err:
                await did.wait_for_talk(talk_id, poll_interval_s=0.02, timeout_s=30)
        assert err.value.kind == "RenderError" and err.value.talk_ended
    finally:
        second.stop()


async def test_without_a_state_folder_nothing_outlives_the_process(tmp_path: Path) -> None:
    # The default (tests that want a clean D-ID): a restart forgets every talk and upload.
    first = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.02, storage_dir=tmp_path / "files")
    try:
        async with client(first.url) as did:
            image_url, audio_url = await upload_both(did)
            talk_id = await did.create_talk(image_url, audio_url)
    finally:
        first.stop()
    assert not (tmp_path / "files" / STATE_FILE).exists()
    second = start_emulator("127.0.0.1", 0, API_KEY, stage_delay_s=0.02, storage_dir=tmp_path / "files")
    try:
        async with client(second.url) as did:
            with pytest.raises(DIDError) as err:
                await did.get_talk(talk_id)
        assert err.value.status == 404
        assert post_talk(second.url, image_url, audio_url).status_code == 400
    finally:
        second.stop()


def test_state_dir_and_a_different_storage_dir_contradict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one of state_dir and storage_dir"):
        start_emulator("127.0.0.1", 0, API_KEY, state_dir=tmp_path / "a", storage_dir=tmp_path / "b")


def _run_emulator(extra: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "did_emulator", "--port", "0", "--api-key", API_KEY, "--stage-delay-s", "0.02", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "D-ID emulator listening on http://... (storage ...)"
    assert "listening on " in line, line
    return process, line.split("listening on ", 1)[1].split()[0]


def _stop(process: subprocess.Popen[str], sig: int) -> None:
    process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
        raise AssertionError(f"the emulator did not exit within 30 s of signal {sig}; its output:\n{output[-3000:]}") from None


async def test_the_command_keeps_state_across_a_kill_9_by_flag_or_environment(tmp_path: Path) -> None:
    state_dir = tmp_path / "did-state"
    env = {k: v for k, v in os.environ.items() if k != STATE_DIR_ENV}
    process, url = _run_emulator(["--state-dir", str(state_dir)], env)
    try:
        async with client(url) as did:
            image_url = await did.upload_image(IMAGE.read_bytes(), "girl-1.jpg", "image/jpeg")
            audio_url = await did.upload_audio(tone_wav(0.5), "voice.wav", "audio/wav")
            talk_id = await did.create_talk(image_url, audio_url)
            await did.wait_for_talk(talk_id, poll_interval_s=0.02, timeout_s=30)
    finally:
        _stop(process, signal.SIGKILL)  # as a crash: only what was written atomically survives
    process, url = _run_emulator([], {**env, STATE_DIR_ENV: str(state_dir)})
    try:
        async with client(url) as did:
            talk = await did.get_talk(talk_id)
            assert talk.status == "done"
            assert len(await did.download(talk.result_url)) > 1000
        assert post_talk(url, image_url, audio_url).status_code == 201
    finally:
        _stop(process, signal.SIGTERM)


def test_the_command_stops_on_a_sigterm_delivered_to_another_thread(tmp_path: Path) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads; the emulator must stop
    whichever gets it. Sent here with tgkill to a thread that is not the main one (the HTTP
    server's), which is what left an emulator running for hours when its main thread waited on an
    untimed lock."""
    process, url = _run_emulator([], {k: v for k, v in os.environ.items() if k != STATE_DIR_ENV})
    try:
        assert httpx.get(f"{url}/talks", headers={"Authorization": f"Basic {API_KEY}"}, timeout=5).status_code == 200
        others = [int(tid) for tid in os.listdir(f"/proc/{process.pid}/task") if int(tid) != process.pid]
        assert others, "the emulator runs its HTTP server in a thread of its own"
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(SYS_TGKILL, process.pid, others[0], signal.SIGTERM) == 0, ctypes.get_errno()
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
