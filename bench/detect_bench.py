#!/usr/bin/env python3
"""Detection benchmark: the orchestrator against direct Triton calls, in one run.

Starts one tritonserver (CPU model repository) and one orchestrator in front of it, and measures three
ways to get the person boxes of one JPEG, at each concurrency (bench/README.md explains the results):

  triton_raw          tritonclient infer of the tensor letterboxed once beforehand: Triton alone
  triton_client_side  what a user writes without us: decode + letterbox + infer + decode/NMS in the
                      client process, with the server's own functions
  orchestrator        framewise.v1.VisionService/Detect with the JPEG bytes
  in_process          no server at all, what a user writes: decode + letterbox + float32 NCHW in numpy + an
                      ONNX Runtime session with its default options (every core) on the model file the
                      repository was built from (its MANIFEST.json's source, sha256 checked) + decode/NMS, in
                      the bench process; at the lowest concurrency only (the issue's "fast alone" regime:
                      Framewise's p50 there within 1.1x of it)
  in_process_served   the same with the repository's own graph (uint8 input, the preprocessing and the graph
                      rewrites inside it): what the served model costs without a server, for the overhead
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.processes import no_grpc_fork_handlers  # no gRPC in it

no_grpc_fork_handlers()  # before gRPC loads: the Stack starts its servers with a preexec_fn

import cv2
import grpc
import numpy as np
import tritonclient.grpc as triton_sync
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import model_config_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc
from engines.cpu_repository import read_manifest
from engines.hashing import sha256_file
from server.triton.launcher import ManagedTriton, TritonPorts
from server.vision.letterbox import letterbox
from server.vision.yolo import decode_yolov8

REPO = Path(__file__).resolve().parents[1]
MODEL = "yolov8"
PATHS = ("triton_raw", "triton_client_side", "orchestrator", "in_process", "in_process_served")
IN_PROCESS = "in_process"  # the target's baseline
IN_PROCESS_PATHS = (IN_PROCESS, "in_process_served")  # measured at the lowest concurrency only
TARGET_IN_PROCESS_RATIO = 1.1  # orchestrator p50 / in-process p50 at the lowest concurrency
EXPECTED_PERSONS = 4  # in bus.jpg; checked on every response
TARGET_ADDED_P50_MS, TARGET_THROUGHPUT_RATIO = 2.0, 0.9
AGGREGATION = ("per concurrency the three paths run back to back, in reverse order every other round; latency "
               "samples pooled across rounds; throughput = successful requests / summed wall time")
STAGES = ("decode", "preprocess", "triton", "postprocess", "total")
VISION_SERVICE = vision_service_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
GRPC_LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--repository", type=Path, default=REPO / ".cache" / "model_repository_cpu")
    p.add_argument("--image", type=Path, default=REPO.parent / "shared" / "assets" / "images" / "bus.jpg")
    p.add_argument("--requests", type=int, default=80, help="requests per (path, concurrency) cell per round")
    p.add_argument("--rounds", type=int, default=4, help="sweeps over every cell; samples are pooled")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated closed-loop worker counts")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per path before the sweep")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 requests per cell, 1 round")
    p.add_argument("--name", default="detect", help="results file name in --output (default detect)")
    p.add_argument("--triton-shm", choices=("on", "off"), default="on",
                   help="orchestrator -> Triton tensors through shared memory (on, as the managed default) or gRPC")
    p.add_argument("--orchestrator-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the orchestrator process only (diagnostics)")
    a = p.parse_args(argv)
    a.concurrency = sorted({int(c) for c in a.concurrency.split(",")})
    if a.quick:
        a.requests, a.rounds, a.warmup = 6, 1, 2
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Even if the bench is SIGKILLed, the kernel sends its servers SIGTERM: no orphan keeps a port.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Stack:
    """One tritonserver and one orchestrator (`python -m server --triton-url`), as real processes; a `with`
    block starts them and stops them. Ready when Triton has every model of `models` ready and the
    orchestrator's health says `service` is SERVING: only what the benchmark uses, so a model it does not
    need (the SAM 2 parts for detection) cannot hold the start. `orchestrator_args` are appended to the
    orchestrator's command line."""

    def __init__(self, repository: Path, work_dir: Path, extra_env: dict[str, str], transport: str = "on", *,
                 models: tuple[str, ...] = (MODEL,), service: str = VISION_SERVICE,
                 orchestrator_args: tuple[str, ...] = ()) -> None:
        self.repository, self.work_dir, self.extra_env = repository.absolute(), work_dir, extra_env
        self.transport = transport  # --triton-shm of the orchestrator: "on" (shared memory) or "off" (gRPC)
        self.models, self.service, self.orchestrator_args = models, service, orchestrator_args
        self.procs: dict[str, subprocess.Popen] = {}
        self.triton_url = self.address = self.metrics_url = ""

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()  # whatever did start (Triton, when the orchestrator did not)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, name: str, command: list[str], env: dict, ready, timeout_s: float,
               attempts: int = 3) -> None:
        """Start a server and wait until ready() says so; a start killed by a signal before that (a crash,
        as ManagedTriton.start also retries) is tried again, up to `attempts` in all."""
        for attempt in range(1, attempts + 1):
            with open(self.work_dir / f"{name}.log", "wb" if attempt == 1 else "ab") as log:
                self.procs[name] = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.procs[name].poll() is None:
                try:
                    if ready():
                        return
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                time.sleep(0.25)
            code = self.procs[name].poll()
            if code is None or code >= 0 or attempt == attempts:
                break
            print(f"{name} crashed during startup (exit code {code}); starting it again", flush=True)
        tail = (self.work_dir / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} did not become ready (exit code {self.procs[name].poll()}):\n{tail}")

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
        launcher = ManagedTriton(self.repository, self.work_dir / "triton", ports, restart_on_exit=False)
        self.triton_url = launcher.url
        with triton_sync.InferenceServerClient(self.triton_url) as client:
            def ready() -> bool:
                return client.is_server_ready() and all(client.is_model_ready(m) for m in self.models)

            self._start("tritonserver", launcher.command(), launcher.environment(),
                        ready, 180)
        self.address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://{metrics}/metrics"
        # Triton runs on this host, as with the managed default: tensors go through shared memory.
        command = [sys.executable, "-m", "server", "--triton-url", self.triton_url, "--listen", self.address,
                   "--metrics-listen", metrics, "--log-level", "WARNING", "--triton-shm", self.transport,
                   *self.orchestrator_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        with grpc.insecure_channel(self.address) as channel:
            check, serving = health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckResponse.SERVING
            request = health_pb2.HealthCheckRequest(service=self.service)
            ready = lambda: check(request, timeout=2).status == serving  # noqa: E731
            self._start("orchestrator", command, env, ready, 90)

    def stop(self) -> None:
        for name in ("orchestrator", "tritonserver"):  # the front first
            if (proc := self.procs.get(name)) is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user+system CPU seconds of each process with its descendants (Triton's python stubs are children)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in (e for e in os.scandir("/proc") if e.name.isdigit()):
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
        children.setdefault(int(fields[1]), []).append(int(entry.name))

    def tree(pid: int) -> int:
        return ticks.get(pid, 0) + sum(tree(child) for child in children.get(pid, []))

    result = {name: tree(pid) / os.sysconf("SC_CLK_TCK") for name, pid in pids.items()}
    result["bench_client"] = os.times().user + os.times().system  # this process, every thread
    return result


class Paths:
    """One coroutine per path; each returns (persons found or None, stage timings in ms)."""

    def __init__(self, triton: triton_aio.InferenceServerClient, channel: grpc.aio.Channel, jpeg: bytes, config,
                 source_session, served_session) -> None:  # noqa: ANN001 - onnxruntime.InferenceSession x2
        self.triton, self.jpeg = triton, jpeg
        self.source_session, self.served_session = source_session, served_session
        self.source_input_name = source_session.get_inputs()[0].name
        self.detect = vision_service_pb2_grpc.VisionServiceStub(channel).Detect
        self.request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=jpeg))
        self.input_name, self.output_name = config.input[0].name, config.output[0].name
        self.size = tuple(config.input[0].dims[:2])  # (H, W) of the NHWC uint8 input
        self.pad = int(config.parameters["letterbox_pad_value"].string_value)
        self.person_mask = np.zeros(config.output[0].dims[0] - 4, dtype=bool)
        self.person_mask[0] = True  # a plain DetectRequest's defaults: person only, conf 0.25, IoU 0.45, max 100
        self.canvas = self._prepare()[1]  # triton_raw's input, prepared outside any timing

    async def infer(self, canvas: np.ndarray) -> np.ndarray:
        # The same calls as server/triton/client.py TritonClient.infer.
        tensor = triton_sync.InferInput(self.input_name, [1, *canvas.shape], "UINT8")
        tensor.set_data_from_numpy(canvas[None])
        outputs = [triton_sync.InferRequestedOutput(self.output_name)]
        result = await self.triton.infer(MODEL, [tensor], outputs=outputs, client_timeout=60)
        return result.as_numpy(self.output_name)[0]

    def _prepare(self):  # noqa: ANN202
        # For bus.jpg (810x1080) server/vision/image_decode.py makes exactly these two cv2 calls.
        t0 = time.perf_counter()
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        t1 = time.perf_counter()
        canvas, mapping = letterbox(rgb, self.size, self.pad)
        return rgb, canvas, mapping, {"decode": (t1 - t0) * 1e3, "preprocess": (time.perf_counter() - t1) * 1e3}

    def count_persons(self, output: np.ndarray, rgb: np.ndarray | None = None, mapping=None) -> int:  # noqa: ANN001
        raw = decode_yolov8(output, confidence=0.25, iou=0.45, max_detections=100, class_mask=self.person_mask)
        if mapping is not None:  # a user needs the boxes in image pixels, as the server returns them
            mapping.to_source(raw.boxes, (rgb.shape[1], rgb.shape[0]))
        return len(raw.boxes)

    async def triton_raw(self) -> tuple[int | None, dict[str, float]]:
        await self.infer(self.canvas)  # its answer is checked once, before the sweep
        return None, {}

    async def triton_client_side(self) -> tuple[int | None, dict[str, float]]:
        # CPU work in worker threads, as the server does, so the event loop keeps other calls moving.
        t0 = time.perf_counter()
        rgb, canvas, mapping, timings = await asyncio.to_thread(self._prepare)
        t1 = time.perf_counter()
        output = await self.infer(canvas)
        t2 = time.perf_counter()
        persons = await asyncio.to_thread(self.count_persons, output, rgb, mapping)
        t3 = time.perf_counter()
        return persons, {**timings, "triton": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}

    async def in_process(self) -> tuple[int | None, dict[str, float]]:
        return await asyncio.to_thread(self._in_process)

    def _in_process(self) -> tuple[int | None, dict[str, float]]:
        # The published file takes float32 [1, 3, H, W] in 0..1: a user's numpy preprocessing.
        return self._run_in_process(self.source_session, lambda canvas: {self.source_input_name: np.ascontiguousarray(
            (canvas.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)[None])})

    async def in_process_served(self) -> tuple[int | None, dict[str, float]]:
        return await asyncio.to_thread(self._in_process_served)

    def _in_process_served(self) -> tuple[int | None, dict[str, float]]:
        return self._run_in_process(self.served_session, lambda canvas: {self.input_name: canvas[None]})

    def _run_in_process(self, session, feeds) -> tuple[int | None, dict[str, float]]:  # noqa: ANN001
        """Decode, letterbox, ``feeds(canvas)`` (counted as preprocessing), ``session``, NMS."""
        t0 = time.perf_counter()
        rgb, canvas, mapping, timings = self._prepare()
        inputs = feeds(canvas)
        t1 = time.perf_counter()
        timings["preprocess"] = (t1 - t0) * 1e3 - timings["decode"]
        (output,) = session.run([self.output_name], inputs)
        t2 = time.perf_counter()
        persons = self.count_persons(output[0], rgb, mapping)
        t3 = time.perf_counter()
        return persons, {**timings, "triton": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}

    async def orchestrator(self) -> tuple[int | None, dict[str, float]]:
        response = await self.detect(self.request, timeout=60)
        timings = {k: getattr(response.timings, f"{k}_ms") for k in STAGES}  # measured by the server
        return sum(d.label == "person" for d in response.detections), timings


async def closed_loop(call, requests: int, concurrency: int) -> dict:  # noqa: ANN001
    """`requests` calls by `concurrency` workers, each sending its next request when its last one returns."""
    cell: dict = {"latencies_ms": [], "stages_ms": [], "errors": []}
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                persons, timings = await call()
            except Exception as exc:  # noqa: BLE001 - counted and reported per cell, not fatal
                cell["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            if persons is not None and persons != EXPECTED_PERSONS:  # a fast wrong answer must not count
                cell["errors"].append(f"found {persons} persons, expected {EXPECTED_PERSONS}")
                continue
            cell["latencies_ms"].append((time.perf_counter() - started) * 1e3)
            cell["stages_ms"].append(timings)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cell["wall_s"] = time.perf_counter() - started
    return cell


async def triton_counters(client: triton_aio.InferenceServerClient) -> dict[str, int]:
    stats = (await client.get_inference_statistics(MODEL)).model_stats[0]
    s = stats.inference_stats
    return {"inferences": stats.inference_count, "executions": stats.execution_count,
            "queue_ns": s.queue.ns, "queue_count": s.queue.count, "compute_count": s.compute_infer.count,
            "compute_ns": s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns}


def _ratio(a: float, b: float, scale: float = 1.0) -> float | None:
    return round(a / b * scale, 2) if b else None


def summarize(cells: list[dict]) -> dict:
    """Pools the samples of every round of one (path, concurrency) cell."""
    lat = np.array([x for c in cells for x in c["latencies_ms"]])
    ok, wall = len(lat), sum(c["wall_s"] for c in cells)
    delta = {k: sum(c["triton_delta"][k] for c in cells) for k in cells[0]["triton_delta"]}
    cpu = {k: sum(c["cpu_s"][k] for c in cells) for k in cells[0]["cpu_s"]}
    stages = [s for c in cells for s in c["stages_ms"]]
    # Per request: latency seen by the client minus the stages' own total = time outside the
    # pipeline (for the orchestrator: the extra gRPC hop, protobuf work, interceptor, loop waits).
    outside = [x - s["total"] for c in cells for x, s in zip(c["latencies_ms"], c["stages_ms"]) if "total" in s]
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if ok else (lambda q: None)
    return {
        "ok": ok, "errors": sum(len(c["errors"]) for c in cells), "throughput_rps": round(ok / wall, 2),
        "first_error": next((c["errors"][0] for c in cells if c["errors"]), None),
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "mean_ms": round(float(lat.mean()), 2) if ok else None,
        "per_round": [{"p50_ms": round(float(np.median(c["latencies_ms"])), 2) if c["latencies_ms"] else None,
                       "throughput_rps": round(len(c["latencies_ms"]) / c["wall_s"], 2)} for c in cells],
        "triton_avg_batch": _ratio(delta["inferences"], delta["executions"]),
        "triton_queue_ms": _ratio(delta["queue_ns"], delta["queue_count"], 1e-6),
        "triton_compute_ms": _ratio(delta["compute_ns"], delta["compute_count"], 1e-6),
        "cpu_ms_per_request": {k: round(v / max(ok, 1) * 1e3, 1) for k, v in cpu.items()},
        "stages_median_ms": {k: round(float(np.median([s[k] for s in stages if k in s])), 2)
                             for k in STAGES if any(k in s for s in stages)},
        "outside_stages_median_ms": round(float(np.median(outside)), 2) if outside else None,
    }


def derive(summary: dict, low: int, high: int) -> dict:
    """The issue's two targets, against both baselines (pooled figures, and per round to show the noise)."""

    def added(o: dict, b: dict) -> float | None:  # None: a cell without one successful request
        return None if None in (o["p50_ms"], b["p50_ms"]) else round(o["p50_ms"] - b["p50_ms"], 2)

    def ratio(o: dict, b: dict) -> float | None:
        return round(o["throughput_rps"] / b["throughput_rps"], 3) if b["throughput_rps"] else None

    result = {}
    for base in ("triton_client_side", "triton_raw"):
        (o_low, b_low), (o_high, b_high) = ((summary["orchestrator"][c], summary[base][c]) for c in (low, high))
        lat, tput = added(o_low, b_low), ratio(o_high, b_high)
        result[base] = {
            "added_p50_ms": lat, "throughput_ratio": tput,
            "added_p50_ms_per_round": [added(o, b) for o, b in zip(o_low["per_round"], b_low["per_round"])],
            "throughput_ratio_per_round": [ratio(o, b) for o, b in zip(o_high["per_round"], b_high["per_round"])],
            "added_p50_target_met": lat is not None and lat <= TARGET_ADDED_P50_MS,
            "throughput_target_met": tput is not None and tput >= TARGET_THROUGHPUT_RATIO,
        }
    ours = summary["orchestrator"][low]
    for name in IN_PROCESS_PATHS:
        alone = summary[name].get(low)
        if alone is None or not alone["p50_ms"] or not ours["p50_ms"]:
            continue
        ratio_alone = round(ours["p50_ms"] / alone["p50_ms"], 3)
        result[name] = {
            "p50_ratio": ratio_alone,
            "p50_ratio_per_round": [round(o["p50_ms"] / b["p50_ms"], 3) if o["p50_ms"] and b["p50_ms"] else None
                                    for o, b in zip(ours["per_round"], alone["per_round"])],
            "p50_ratio_target_met": ratio_alone <= TARGET_IN_PROCESS_RATIO,
        }
    return result


def source_model(repository: Path) -> Path:
    """The model file ``repository``'s yolov8 was built from, as its MANIFEST.json records it, after
    checking that the file still has the recorded sha256."""
    manifest = read_manifest(repository)
    if manifest is None:
        raise RuntimeError(f"{repository} has no readable MANIFEST.json: rebuild it with build_engines.py --target cpu")
    path = Path(manifest["source_paths"][MODEL])
    want = manifest["fingerprint"]["models"][MODEL]["source_sha256"]
    if not path.is_file() or sha256_file(path) != want:
        raise RuntimeError(f"{path}, the file {repository} was built from, is missing or changed since")
    return path


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def code_under_test() -> dict:
    """The server code measured: the commit, and whether the work tree differs from it there."""
    return {"git_commit": _git("rev-parse", "--short", "HEAD"),
            "git_uncommitted_server_changes": bool(_git("status", "--porcelain", "--", "server", "engines"))}


def write_report(output: Path, name: str, report: dict, text: str) -> None:
    """`name`.json (every figure) and `name`.md (`text`, the tables) in `output`; the tables printed too."""
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / f"{name}.md").write_text(text)
    print("\n" + text)


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    jpeg, load_at_start, code = args.image.read_bytes(), os.getloadavg(), code_under_test()
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    triton = triton_aio.InferenceServerClient(stack.triton_url, channel_args=GRPC_LIMITS)
    channel = grpc.aio.insecure_channel(stack.address, options=GRPC_LIMITS)
    try:
        config = (await triton.get_model_config(MODEL)).config
        import onnxruntime as ort  # the in-process baselines: ONNX Runtime's defaults, as a user would write it

        source_session, served_session = (
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for path in (source_model(args.repository), args.repository / MODEL / "1" / "model.onnx"))
        paths = Paths(triton, channel, jpeg, config, source_session, served_session)
        persons = paths.count_persons(await paths.infer(paths.canvas))  # triton_raw's answer, checked once
        if persons != EXPECTED_PERSONS:
            raise RuntimeError(f"Triton found {persons} persons in {args.image}, expected {EXPECTED_PERSONS}")
        for name in PATHS:
            await closed_loop(getattr(paths, name), args.warmup,
                              1 if name in IN_PROCESS_PATHS else min(4, max(args.concurrency)))
        cells: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            # Paths back to back, reversed every other round: drift on a noisy machine hits all alike.
            for conc in args.concurrency:
                for name in PATHS if rnd % 2 == 0 else PATHS[::-1]:
                    if name in IN_PROCESS_PATHS and conc != args.concurrency[0]:
                        continue
                    before, cpu_before = await triton_counters(triton), cpu_seconds(pids)
                    cell = await closed_loop(getattr(paths, name), args.requests, conc)
                    after, cpu_after = await triton_counters(triton), cpu_seconds(pids)
                    cell["triton_delta"] = {k: after[k] - before[k] for k in after}
                    cell["cpu_s"] = {k: round(cpu_after[k] - cpu_before[k], 3) for k in cpu_after}
                    cells.setdefault((name, conc), []).append(cell)
                    lat = cell["latencies_ms"]
                    print(f"round {rnd + 1}/{args.rounds} c={conc:<3} {name:<19} p50 {np.median(lat):7.1f} ms "
                          f"{len(lat) / cell['wall_s']:6.1f} req/s  errors {len(cell['errors'])}", flush=True)
        version = (await triton.get_server_metadata()).version
    finally:
        await channel.close()
        await triton.close()

    summary = {name: {c: summarize(cells[(name, c)]) for c in args.concurrency if (name, c) in cells} for name in PATHS}
    low, high = args.concurrency[0], args.concurrency[-1]
    return {
        "environment": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(), "platform": platform.platform(), "triton_version": version, **code,
            "model": MODEL, "image": str(args.image), "image_bytes": len(jpeg), "orchestrator_env": stack.extra_env, "triton_shm": stack.transport,
            "instance_count": sum(g.count for g in config.instance_group), "max_batch_size": config.max_batch_size,
            "max_queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
            "intra_op_threads": config.parameters["intra_op_threads"].string_value,
            "allow_spinning": _parameter(config, "allow_spinning"),
            "contended_intra_op_threads": _parameter(config, "contended_intra_op_threads"),
            "graph_rewrite": _parameter(config, "graph_rewrite")},
        "method": {"requests_per_cell_per_round": args.requests, "rounds": args.rounds, "warmup": args.warmup,
                   "concurrency": args.concurrency, "aggregation": AGGREGATION},
        "targets": {"added_p50_ms_max": TARGET_ADDED_P50_MS, "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
                    "in_process_p50_ratio_max": TARGET_IN_PROCESS_RATIO,
                    "low_concurrency": low, "high_concurrency": high},
        "derived": derive(summary, low, high),
        "summary": {name: {str(c): s for c, s in per.items()} for name, per in summary.items()},
        "raw_cells": {f"{name}@c{c}": [{k: v for k, v in cell.items() if k != "stages_ms"} for cell in cell_list]
                      for (name, c), cell_list in cells.items()}}


def _parameter(config: model_config_pb2.ModelConfig, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def _threads(env: dict) -> str:
    """How the instances' ONNX Runtime threads are set up, in words."""
    text = f"{env['intra_op_threads']} thread{'s' * (env['intra_op_threads'] != '1')}"
    if env.get("allow_spinning") == "true":
        text += " (spinning)"
    if env.get("contended_intra_op_threads") not in (None, "0"):
        text += f", {env['contended_intra_op_threads']} while another instance executes"
    return text


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join("" if c is None else str(c) for c in cells) + " |" for cells in [header, *rows]]
    return [lines[0], "|---" * len(header) + "|", *lines[1:], ""]


def _verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def markdown(report: dict) -> str:
    env, t, m, summary = report["environment"], report["targets"], report["method"], report["summary"]
    low, high, conc = t["low_concurrency"], t["high_concurrency"], m["concurrency"]
    cells = [(name, c, summary[name][str(c)]) for c in conc for name in PATHS if str(c) in summary[name]]
    lines = [
        "# Detection benchmark", "",
        f"{env['date']}; commit {env['git_commit']}{' + changes' * env['git_uncommitted_server_changes']}; "
        f"{env['cpu_count']} CPUs; Python {env['python']}; Triton {env['triton_version']}; {MODEL} "
        f"x{env['instance_count']} instances x {_threads(env)}, max batch {env['max_batch_size']}, "
        f"graph rewrite: {env.get('graph_rewrite') or '-'}, "
        f"queue delay {env['max_queue_delay_us']} us. {m['requests_per_cell_per_round']} requests per cell x "
        f"{m['rounds']} rounds; {m['aggregation']}. Orchestrator -> Triton tensors: {'shared memory' if env.get('triton_shm', 'on') == 'on' else 'gRPC'}; extra orchestrator environment: {env['orchestrator_env'] or '-'}.",
        "", "CPU ms/req: user+system CPU time per request of the bench client, the orchestrator, and tritonserver "
        "with its python-backend stubs.", "",
        *_table(["path", "c", "ok", "err", "p50 ms", "p90 ms", "p99 ms", "mean ms", "req/s", "Triton avg batch",
                 "Triton queue ms", "Triton compute ms", "CPU ms/req client / orch / triton"],
                [[n, c, s["ok"], s["errors"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["mean_ms"], s["throughput_rps"],
                  s["triton_avg_batch"], s["triton_queue_ms"], s["triton_compute_ms"],
                  " / ".join(str(s["cpu_ms_per_request"][k]) for k in ("bench_client", "orchestrator", "tritonserver"))]
                 for n, c, s in cells]),
        "Stage medians (ms): orchestrator from DetectResponse.timings (server side), triton_client_side timed the same "
        "way in the client; outside = median of (client latency - stage total) per request.", "",
        *_table(["path", "c", *STAGES, "outside"],
                [[n, c, *(s["stages_median_ms"].get(k) for k in STAGES), s["outside_stages_median_ms"]]
                 for n, c, s in cells if n != "triton_raw"]),
        f"Targets: the orchestrator adds <= {t['added_p50_ms_max']} ms p50 at c={low}, and reaches >= "
        f"{t['throughput_ratio_min']}x the baseline's throughput at c={high}.", "",
        *_table(["baseline", f"added p50 at c={low} (ms)", "per round", "target", f"throughput ratio at c={high}",
                 "per round", "target"],
                [[base, d["added_p50_ms"], d["added_p50_ms_per_round"], _verdict(d["added_p50_target_met"]),
                  d["throughput_ratio"], d["throughput_ratio_per_round"], _verdict(d["throughput_target_met"])]
                 for base, d in report["derived"].items() if base not in IN_PROCESS_PATHS]),
    ]
    alone = report["derived"].get(IN_PROCESS)
    if alone is not None:
        lines += [f"Against in-process ONNX Runtime (default options, every core; decode, letterbox, numpy "
                  f"preprocessing and NMS included) on the model file the repository was built from, at c={low}: "
                  f"orchestrator p50 / in-process p50 = {alone['p50_ratio']} (per round "
                  f"{alone['p50_ratio_per_round']}; target <= {t['in_process_p50_ratio_max']}: "
                  f"{_verdict(alone['p50_ratio_target_met'])}).", ""]
    served = report["derived"].get("in_process_served")
    if served is not None:
        lines += [f"Against the repository's own graph in-process (what the served model costs without a server): "
                  f"{served['p50_ratio']} (per round {served['p50_ratio_per_round']}).", ""]
    bad = [f"{n}@c{c}: {s['first_error']}" for n, c, s in cells if s["errors"]]
    lines.append(f"Sanity FAILED (errors, including wrong person counts): {'; '.join(bad)}" if bad
                 else f"Sanity: no errors; every checked response found {EXPECTED_PERSONS} persons.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.repository / MODEL / "config.pbtxt").exists():
        sys.exit(f"no model repository at {args.repository}: run `python build_engines.py --target cpu`")
    env = dict(kv.split("=", 1) for kv in args.orchestrator_env)
    # Every request sends the same image: without the cache off they would be cache hits.
    stack = Stack(args.repository, REPO / ".cache" / "bench", env, args.triton_shm,
                  orchestrator_args=("--result-cache-bytes", "0"))
    try:
        with stack:
            report = asyncio.run(run(args, stack))
    except KeyboardInterrupt:
        return 130
    write_report(args.output, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
