"""The embedded default: the orchestrator starts its own Triton child, serves, drains in-flight
calls on SIGTERM and stops the child. And a clear refusal to start without a repository."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from framewise.v1 import (
    common_pb2,
    info_service_pb2,
    info_service_pb2_grpc,
    jobs_service_pb2,
    jobs_service_pb2_grpc,
    vision_service_pb2,
    vision_service_pb2_grpc,
)
from server.triton.launcher import BACKEND_REGION_PREFIX, ManagedTriton, TritonDistribution, TritonPorts, TritonStartError
from tests.conftest import REPO, child_pids, free_port, health_status, start_orchestrator, stop_process, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _assert_stubs_use_huge_pages(triton_pid: int) -> None:
    """Triton's python-backend stubs run with malloc's huge pages (server/triton/launcher.py
    with_huge_pages): the tunable reaches them, and, where the kernel offers transparent huge
    pages, some of their memory is eligible for them."""
    stubs = child_pids(triton_pid, "triton_python_backend_stub")
    assert stubs, "Triton runs python-backend stubs"
    for pid in stubs:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert any(e.startswith(b"GLIBC_TUNABLES=") and b"glibc.malloc.hugetlb=1" in e for e in environ)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        eligible = [pid for pid in stubs if re.search(r"^THPeligible:\s+1", Path(f"/proc/{pid}/smaps").read_text(), re.MULTILINE)]
        assert eligible, "no stub has memory eligible for huge pages"


def test_managed_triton_serves_drains_and_stops(tmp_path: Path, cpu_repository: Path, assets: Path) -> None:
    triton_ports = [free_port(), free_port(), free_port()]
    orch = start_orchestrator(
        tmp_path,
        [
            "--model-repository", str(cpu_repository),
            "--triton-work-dir", str(tmp_path / "triton"),
            "--triton-grpc-port", str(triton_ports[0]),
            "--triton-http-port", str(triton_ports[1]),
            "--triton-metrics-port", str(triton_ports[2]),
        ],
        name="managed",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(orch.address) as channel:
            wait_until(lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING, 120, "managed mode to serve")
            info = info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=5)
            assert info.triton.managed and info.triton.ready and info.triton.url.endswith(f":{triton_ports[0]}")
            match = re.search(r'"msg": "triton ready".*?"pid": (\d+)', orch.log_text())
            assert match, "the launcher logs Triton's pid"
            triton_pid = int(match.group(1))
            assert _alive(triton_pid)
            # The python backend's regions carry our prefix, so a start after a crash can reclaim
            # what a dead Triton left (server/triton/launcher.py reclaim_backend_regions).
            maps = Path(f"/proc/{triton_pid}/maps").read_text()
            regions = set(re.findall(rf"/dev/shm/({BACKEND_REGION_PREFIX}\S+)", maps))
            assert regions, "Triton maps python-backend regions with the launcher's prefix"

            vision = vision_service_pb2_grpc.VisionServiceStub(channel)
            request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes()))
            assert len(vision.Detect(request, timeout=60).detections) == 4
            _assert_stubs_use_huge_pages(triton_pid)

            # Graceful shutdown: calls in flight when SIGTERM arrives still complete.
            calls = 6
            received_before = _detects_received(orch.metrics_url)
            with ThreadPoolExecutor(calls) as pool:
                futures = [pool.submit(vision.Detect, request, timeout=60) for _ in range(calls)]
                # Every call inside the server (in flight or done), at least 3 of them in flight: a
                # call still on its way when SIGTERM lands is refused, rightly (checked below).
                wait_until(lambda: _detects_received(orch.metrics_url) - received_before >= calls
                           and _in_flight(orch.metrics_url) >= 3, 30, "calls to be in flight", interval_s=0.005)
                orch.process.send_signal(15)
                results = [f.result() for f in futures]
            assert all(len(r.detections) == 4 for r in results)
            assert orch.process.wait(timeout=60) == 0
            # No new calls once stopped.
            with pytest.raises(grpc.RpcError) as refused:
                vision.Detect(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: not _alive(triton_pid), 10, "the Triton child to exit")
        log = orch.log_text()
        assert '"msg": "triton stopped"' in log and '"msg": "stopped"' in log
        assert not [name for name in regions if (Path("/dev/shm") / name).exists()], "a stopped Triton leaves no region"
    finally:
        stop_process(orch.process)


def test_health_answers_not_serving_through_a_sigterm_drain(tmp_path: Path, triton, assets: Path) -> None:  # noqa: ANN001
    """SIGTERM with a call still in flight (an upload whose client has not sent its bytes yet):
    until that call ends, health answers NOT_SERVING (a load balancer or probe sees the drain; it
    used to get CANCELLED and then a refused connection), new work is refused UNAVAILABLE, and
    the server then exits 0. (An open Track stream no longer holds the drain: its session is
    handed off and the stream ends at once, tests/e2e/test_session_handoff.py.)"""
    orch = start_orchestrator(tmp_path, ["--triton-url", triton.url], name="draining")
    requests: queue.Queue = queue.Queue()

    def upload_requests() -> Iterator[jobs_service_pb2.UploadFileRequest]:
        header = jobs_service_pb2.UploadHeader(kind=jobs_service_pb2.FILE_KIND_IMAGE, size_bytes=10, sha256="0" * 64)
        yield jobs_service_pb2.UploadFileRequest(header=header)
        yield from iter(requests.get, None)

    try:
        with grpc.insecure_channel(orch.address) as channel:
            wait_until(lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING, 60, "the orchestrator to serve")
            upload = jobs_service_pb2_grpc.JobServiceStub(channel).UploadFile.future(upload_requests(), timeout=120)
            metrics_url = orch.metrics_url
            wait_until(lambda: _uploads_in_flight(metrics_url) == 1, 10, "the upload to be in flight")
            orch.process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "health to say NOT_SERVING"
            )
            for _ in range(5):
                assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert health_status(channel, "framewise.v1.VisionService") == health_pb2.HealthCheckResponse.NOT_SERVING
                time.sleep(0.2)
            vision = vision_service_pb2_grpc.VisionServiceStub(channel)
            request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes()))
            with pytest.raises(grpc.RpcError) as refused:
                vision.Detect(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
            assert orch.process.poll() is None, "the drain waits for the upload"

            requests.put(None)  # the client ends its stream (short of its bytes): nothing is left to drain
            with pytest.raises(grpc.RpcError):
                upload.result(timeout=30)
            assert orch.process.wait(timeout=60) == 0
    finally:
        requests.put(None)
        stop_process(orch.process)


def _uploads_in_flight(metrics_url: str) -> float:
    try:
        text = httpx.get(metrics_url, timeout=1).text
    except httpx.HTTPError:
        return 0
    match = re.search(r'framewise_rpc_in_flight\{method="/framewise.v1.JobService/UploadFile"\} (\S+)', text)
    return float(match.group(1)) if match else 0


def _in_flight(metrics_url: str) -> float:
    try:
        text = httpx.get(metrics_url, timeout=1).text
    except httpx.HTTPError:
        return 0
    match = re.search(r'framewise_rpc_in_flight\{method="/framewise.v1.VisionService/Detect"\} (\S+)', text)
    return float(match.group(1)) if match else 0


def _detects_received(metrics_url: str) -> float:
    """Detect calls the server has taken in: those in flight and those it has answered."""
    try:
        text = httpx.get(metrics_url, timeout=1).text
    except httpx.HTTPError:
        return 0
    answered = re.findall(r'framewise_rpc_latency_seconds_count\{[^}]*method="/framewise.v1.VisionService/Detect"[^}]*\} (\S+)',
                          text)
    return _in_flight(metrics_url) + sum(float(count) for count in answered)


def test_missing_repository_is_a_clear_startup_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(missing), "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", "", "--log-format", "text"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert str(missing) in result.stderr and "build_engines.py --target cpu" in result.stderr


def test_triton_startup_failure_reports_the_log(tmp_path: Path, cpu_repository: Path) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(cpu_repository, broken)
    # No model.py: the python backend cannot start the model and Triton 2.51 never becomes ready.
    (broken / "yolov8" / "1" / "model.py").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(broken), "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", "", "--triton-work-dir", str(tmp_path / "work"), "--triton-grpc-port", str(free_port()),
         "--triton-http-port", str(free_port()), "--triton-metrics-port", str(free_port()), "--log-format", "text",
         "--triton-startup-timeout", "15"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    # The error says what happened and quotes Triton's own log, which names the missing file.
    assert "was not ready within 15 s" in result.stderr
    assert "model.py" in result.stderr


def _triton_wrapper(tmp_path: Path, behaviour: str) -> tuple[ManagedTriton, Path]:
    """A ManagedTriton (empty repository: ready in a second or two) whose binary is a shell script that
    counts its starts in a file, does ``behaviour`` (shell), then runs the real tritonserver."""
    real = TritonDistribution.from_pytriton()
    starts = tmp_path / "starts"
    wrapper = tmp_path / "tritonserver"
    wrapper.write_text(f'#!/bin/sh\necho x >> {starts}\n{behaviour}\nexec {real.binary} "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "empty-repository").mkdir()
    triton = ManagedTriton(
        tmp_path / "empty-repository", tmp_path / "work", TritonPorts(free_port(), free_port(), free_port()),
        restart_on_exit=False, startup_timeout_s=60, distribution=dataclasses.replace(real, binary=wrapper),
    )  # fmt: skip
    return triton, starts


def _count(starts: Path) -> int:
    return len(starts.read_text().split()) if starts.exists() else 0


async def test_triton_crashing_on_its_first_start_is_started_again(tmp_path: Path) -> None:
    # The first start aborts (SIGABRT, as a forked child killed by gRPC's fork handlers before exec did); the next one serves.
    triton, starts = _triton_wrapper(tmp_path, f'[ "$(wc -l < {tmp_path / "starts"})" -gt 1 ] || kill -ABRT $$')
    await triton.start()
    try:
        assert _count(starts) == 2
        assert triton.pid is not None
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{triton.ports.http}/v2/health/ready", timeout=5)
        assert ready.status_code == 200
    finally:
        await triton.stop()


@pytest.mark.parametrize(
    ("behaviour", "attempts", "says"),
    [("kill -ABRT $$", 3, "was killed by SIGABRT"), ("echo 'bad flag' >&2; exit 3", 1, "exited with code 3")],
    ids=["crashes-every-time", "error-exit"],
)
async def test_triton_startup_gives_up(tmp_path: Path, behaviour: str, attempts: int, says: str) -> None:
    # A crash is tried startup_attempts (3) times; an error exit (a bad repository, a bad flag) is not tried again.
    triton, starts = _triton_wrapper(tmp_path, behaviour)
    with pytest.raises(TritonStartError) as failure:
        await triton.start()
    assert _count(starts) == attempts
    assert says in str(failure.value) and failure.value.crashed == (attempts > 1)
    if attempts == 1:
        assert "bad flag" in str(failure.value)  # the log's last lines are quoted
