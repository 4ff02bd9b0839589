#!/usr/bin/env python3
"""Detection benchmark: the orchestrator against direct Triton calls, in one run.

Starts one tritonserver (the CPU model repository) and one orchestrator in front of it, then
measures three ways of getting the person boxes of one JPEG, at each concurrency:

  triton_raw          tritonclient infer with the tensor letterboxed once beforehand: Triton alone
  triton_client_side  what a user writes without us: decode + letterbox + infer + decode/NMS in
                      the client process, with the server's own functions
  orchestrator        framewise.v1.VisionService/Detect with the JPEG bytes

Writes detect.json and detect.md to --output. How to read them: bench/README.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/detect_bench.py` must import server.* and framewise.*

import cv2  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as triton_sync  # noqa: E402
import tritonclient.grpc.aio as triton_aio  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc  # noqa: E402
from server.triton.launcher import ManagedTriton, TritonDistribution, TritonPorts, child_environment  # noqa: E402
from server.vision.letterbox import letterbox  # noqa: E402
from server.vision.yolo import decode_yolov8  # noqa: E402

MODEL = "yolov8"
PATHS = ("triton_raw", "triton_client_side", "orchestrator")
EXPECTED_PERSONS = 4  # bus.jpg; every response is checked, so a fast wrong answer cannot win
# The server's defaults for a plain DetectRequest (server/pipelines/detection.py DetectOptions).
CONFIDENCE, IOU, MAX_DETECTIONS = 0.25, 0.45, 100
TARGET_ADDED_P50_MS, TARGET_THROUGHPUT_RATIO = 2.0, 0.9
STAGES = ("decode", "preprocess", "triton", "postprocess", "total")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GRPC_LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--repository", type=Path, default=REPO / ".cache" / "model_repository_cpu")
    p.add_argument("--image", type=Path, default=REPO.parent / "shared" / "assets" / "images" / "bus.jpg")
    p.add_argument("--requests", type=int, default=120, help="requests per (path, concurrency) cell per round")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated closed-loop worker counts")
    p.add_argument("--rounds", type=int, default=2, help="sweeps over every cell; samples are pooled")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per path before the sweep")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 requests per cell, 1 round")
    a = p.parse_args(argv)
    a.concurrency = sorted({int(c) for c in a.concurrency.split(",")})
    if a.quick:
        a.requests, a.rounds, a.warmup = 6, 1, 2
    return a


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Even if the bench is SIGKILLed, the kernel sends its servers SIGTERM: no orphan keeps a port.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Stack:
    """One tritonserver and one orchestrator (`python -m server --triton-url`), as real processes."""

    def __init__(self, repository: Path, work_dir: Path) -> None:
        self.repository, self.work_dir = repository.absolute(), work_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.triton_url = self.address = ""

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.work_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, ready, timeout_s: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                break
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.25)
        tail = (self.work_dir / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} did not become ready (exit code {self.procs[name].poll()}):\n{tail}")

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
        launcher = ManagedTriton(self.repository, self.work_dir / "triton", ports, restart_on_exit=False)
        self.triton_url = launcher.url
        self._spawn("tritonserver", launcher.command(), child_environment(TritonDistribution.from_pytriton()))
        with triton_sync.InferenceServerClient(self.triton_url) as client:
            self._wait("tritonserver", lambda: client.is_server_ready() and client.is_model_ready(MODEL), 180)

        self.address = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "server", "--triton-url", self.triton_url, "--listen", self.address,
                   "--metrics-listen", f"127.0.0.1:{free_port()}", "--log-level", "WARNING"]
        self._spawn("orchestrator", command, dict(os.environ, PYTHONUNBUFFERED="1"))
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            self._wait("orchestrator", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving, 60)

    def stop(self) -> None:
        # Orchestrator first: it sits in front of Triton.
        for name in ("orchestrator", "tritonserver"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user+system CPU seconds of each process and its descendants (Triton's python stubs are children)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    result = {}
    for name, pid in pids.items():
        total, stack = 0.0, [pid]
        while stack:
            p = stack.pop()
            if p in stats:
                total += (int(stats[p][11]) + int(stats[p][12])) / CLK_TCK
            stack.extend(children.get(p, []))
        result[name] = total
    times = os.times()
    result["bench_client"] = times.user + times.system  # this process, every thread
    return result


# --- the three paths ---------------------------------------------------------------------------


class Paths:
    """One awaitable per path; each returns (persons found or None, stage timings in ms)."""

    def __init__(self, triton: triton_aio.InferenceServerClient, channel: grpc.aio.Channel, jpeg: bytes, config) -> None:  # noqa: ANN001
        self.triton, self.jpeg = triton, jpeg
        self.detect = vision_service_pb2_grpc.VisionServiceStub(channel)
        self.request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=jpeg))
        self.input_name, self.output_name = config.input[0].name, config.output[0].name
        self.size = tuple(config.input[0].dims[:2])  # (H, W) of the NHWC uint8 input
        self.pad = int(config.parameters["letterbox_pad_value"].string_value)
        self.person_mask = np.zeros(config.output[0].dims[0] - 4, dtype=bool)
        self.person_mask[0] = True  # the server's default class filter: "person" only
        _rgb, self.canvas, _map, _t = self._prepare()  # triton_raw's input, outside any timing

    async def _infer(self, canvas: np.ndarray) -> np.ndarray:
        # The same calls as server/triton/client.py TritonClient.infer.
        tensor = triton_sync.InferInput(self.input_name, [1, *canvas.shape], "UINT8")
        tensor.set_data_from_numpy(canvas[None])
        outputs = [triton_sync.InferRequestedOutput(self.output_name)]
        result = await self.triton.infer(MODEL, [tensor], outputs=outputs, client_timeout=60)
        return result.as_numpy(self.output_name)[0]

    def _prepare(self):  # noqa: ANN202
        t0 = time.perf_counter()
        bgr = cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        t1 = time.perf_counter()
        canvas, mapping = letterbox(rgb, self.size, self.pad)
        return rgb, canvas, mapping, {"decode": (t1 - t0) * 1e3, "preprocess": (time.perf_counter() - t1) * 1e3}

    def _decode(self, output: np.ndarray):  # noqa: ANN202
        return decode_yolov8(output, confidence=CONFIDENCE, iou=IOU, max_detections=MAX_DETECTIONS, class_mask=self.person_mask)

    def _postprocess(self, output: np.ndarray, rgb: np.ndarray, mapping) -> int:  # noqa: ANN001
        raw = self._decode(output)
        mapping.to_source(raw.boxes, (rgb.shape[1], rgb.shape[0]))  # a user needs boxes in image pixels
        return len(raw.boxes)

    async def triton_raw(self) -> tuple[int | None, dict[str, float]]:
        t0 = time.perf_counter()
        output = await self._infer(self.canvas)
        if output.shape != (len(self.person_mask) + 4, output.shape[1]):
            raise ValueError(f"unexpected output shape {output.shape}")
        return None, {"triton": (time.perf_counter() - t0) * 1e3}

    async def triton_client_side(self) -> tuple[int | None, dict[str, float]]:
        # CPU work in worker threads, as the server does, so the event loop keeps other calls moving.
        t0 = time.perf_counter()
        rgb, canvas, mapping, timings = await asyncio.to_thread(self._prepare)
        t1 = time.perf_counter()
        output = await self._infer(canvas)
        t2 = time.perf_counter()
        persons = await asyncio.to_thread(self._postprocess, output, rgb, mapping)
        t3 = time.perf_counter()
        return persons, {**timings, "triton": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}

    async def orchestrator(self) -> tuple[int | None, dict[str, float]]:
        response = await self.detect.Detect(self.request, timeout=60)
        t = response.timings
        timings = {"decode": t.decode_ms, "preprocess": t.preprocess_ms, "triton": t.triton_ms,
                   "postprocess": t.postprocess_ms, "total": t.total_ms}
        return sum(d.label == "person" for d in response.detections), timings


# --- measuring -------------------------------------------------------------------------------


async def closed_loop(call, requests: int, concurrency: int) -> dict:  # noqa: ANN001
    """`requests` calls by `concurrency` workers, each sending its next request when the last returns."""
    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    errors: list[str] = []
    wrong_persons = 0
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, wrong_persons
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                persons, timings = await call()
            except Exception as exc:  # noqa: BLE001 - counted and reported per cell, not fatal
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            latencies.append((time.perf_counter() - started) * 1e3)
            stages.append(timings)
            wrong_persons += persons is not None and persons != EXPECTED_PERSONS

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"wall_s": time.perf_counter() - started, "latencies_ms": latencies, "stages_ms": stages,
            "errors": errors, "wrong_person_count": wrong_persons}


async def triton_counters(client: triton_aio.InferenceServerClient) -> dict[str, float]:
    stats = (await client.get_inference_statistics(MODEL)).model_stats[0]
    s = stats.inference_stats
    return {"inferences": stats.inference_count, "executions": stats.execution_count,
            "queue_ns": s.queue.ns, "queue_count": s.queue.count,
            "compute_ns": s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns, "compute_count": s.compute_infer.count}


async def measure_cell(call, requests: int, concurrency: int, client, pids: dict[str, int]) -> dict:  # noqa: ANN001
    before, cpu_before = await triton_counters(client), cpu_seconds(pids)
    cell = await closed_loop(call, requests, concurrency)
    after, cpu_after = await triton_counters(client), cpu_seconds(pids)
    cell["triton_delta"] = {k: after[k] - before[k] for k in after}
    cell["cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    return cell


def summarize(cells: list[dict]) -> dict:
    """Pools the samples of every round of one (path, concurrency) cell."""
    lat = np.array([x for c in cells for x in c["latencies_ms"]])
    ok, wall = len(lat), sum(c["wall_s"] for c in cells)
    delta = {k: sum(c["triton_delta"][k] for c in cells) for k in cells[0]["triton_delta"]}
    cpu = {k: sum(c["cpu_s"][k] for c in cells) for k in cells[0]["cpu_s"]}
    stages = [s for c in cells for s in c["stages_ms"]]
    # Per request: client-observed latency minus the stages' own total = time outside the pipeline
    # (for the orchestrator: the extra gRPC hop, protobuf work, interceptor, event-loop waits).
    outside = [x - s["total"] for c in cells for x, s in zip(c["latencies_ms"], c["stages_ms"]) if "total" in s]
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if ok else (lambda q: None)
    return {
        "ok": ok, "errors": sum(len(c["errors"]) for c in cells),
        "first_error": next((c["errors"][0] for c in cells if c["errors"]), None),
        "wrong_person_count": sum(c["wrong_person_count"] for c in cells),
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "mean_ms": round(float(lat.mean()), 2) if ok else None,
        "throughput_rps": round(ok / wall, 2),
        "per_round": [{"p50_ms": round(float(np.median(c["latencies_ms"])), 2) if c["latencies_ms"] else None,
                       "throughput_rps": round(len(c["latencies_ms"]) / c["wall_s"], 2)} for c in cells],
        "triton_avg_batch": round(delta["inferences"] / delta["executions"], 2) if delta["executions"] else None,
        "triton_queue_ms": round(delta["queue_ns"] / delta["queue_count"] / 1e6, 2) if delta["queue_count"] else None,
        "triton_compute_ms": round(delta["compute_ns"] / delta["compute_count"] / 1e6, 2) if delta["compute_count"] else None,
        "cpu_ms_per_request": {k: round(v / max(ok, 1) * 1e3, 1) for k, v in cpu.items()},
        "cpu_utilisation_cores": {k: round(v / wall, 2) for k, v in cpu.items()},
        "stages_median_ms": {k: round(float(np.median([s[k] for s in stages if k in s])), 2)
                             for k in STAGES if any(k in s for s in stages)},
        "outside_stages_median_ms": round(float(np.median(outside)), 2) if outside else None,
    }


def derive(summary: dict, low: int, high: int) -> dict:
    """The issue's two targets, against both baselines."""
    orch_low, orch_high = summary["orchestrator"][low], summary["orchestrator"][high]
    result = {}
    for base in ("triton_client_side", "triton_raw"):
        b_low, b_high = summary[base][low], summary[base][high]
        added = round(orch_low["p50_ms"] - b_low["p50_ms"], 2)
        rounds = [round(o["p50_ms"] - b["p50_ms"], 2) for o, b in zip(orch_low["per_round"], b_low["per_round"])]
        ratio = round(orch_high["throughput_rps"] / b_high["throughput_rps"], 3)
        result[base] = {
            f"orchestrator_added_p50_ms_c{low}": added, f"added_p50_ms_c{low}_per_round": rounds,
            f"throughput_ratio_c{high}": ratio,
            "added_p50_target_met": added <= TARGET_ADDED_P50_MS, "throughput_target_met": ratio >= TARGET_THROUGHPUT_RATIO,
        }
    return result


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    jpeg = args.image.read_bytes()
    load_at_start = os.getloadavg()
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    triton = triton_aio.InferenceServerClient(stack.triton_url, channel_args=GRPC_LIMITS)
    channel = grpc.aio.insecure_channel(stack.address, options=GRPC_LIMITS)
    try:
        config = (await triton.get_model_config(MODEL)).config
        paths = Paths(triton, channel, jpeg, config)
        persons = len(paths._decode(await paths._infer(paths.canvas)).boxes)  # triton_raw's answer, checked once
        if persons != EXPECTED_PERSONS:
            raise RuntimeError(f"Triton found {persons} persons in {args.image}, expected {EXPECTED_PERSONS}")
        for name in PATHS:
            await closed_loop(getattr(paths, name), args.warmup, min(4, max(args.concurrency)))
        cells: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            # Paths back to back per concurrency, order reversed each round: drift hits all alike.
            order = PATHS if rnd % 2 == 0 else PATHS[::-1]
            for conc in args.concurrency:
                for name in order:
                    cell = await measure_cell(getattr(paths, name), args.requests, conc, triton, pids)
                    cells.setdefault((name, conc), []).append(cell)
                    print(f"round {rnd + 1}/{args.rounds} c={conc:<3} {name:<19} p50 {np.median(cell['latencies_ms']):7.1f} ms"
                          f"  {len(cell['latencies_ms']) / cell['wall_s']:6.1f} req/s  errors {len(cell['errors'])}", flush=True)
        metadata = await triton.get_server_metadata()
    finally:
        await channel.close()
        await triton.close()

    summary = {name: {conc: summarize(cells[(name, conc)]) for conc in args.concurrency} for name in PATHS}
    low, high = args.concurrency[0], args.concurrency[-1]
    return {
        "environment": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(), "platform": platform.platform(),
            "triton_version": metadata.version, "model": MODEL, "image": str(args.image), "image_bytes": len(jpeg),
            "instance_count": sum(g.count for g in config.instance_group), "max_batch_size": config.max_batch_size,
            "max_queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
            "intra_op_threads": config.parameters["intra_op_threads"].string_value,
        },
        "method": {"requests_per_cell_per_round": args.requests, "rounds": args.rounds, "warmup": args.warmup,
                   "concurrency": args.concurrency, "aggregation": "samples pooled across rounds; throughput = "
                   "successful requests / summed cell wall time", "order": "per concurrency, the three paths back "
                   "to back; path order reversed every other round"},
        "targets": {"added_p50_ms_max": TARGET_ADDED_P50_MS, "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
                    "low_concurrency": low, "high_concurrency": high},
        "derived": derive(summary, low, high),
        "summary": {name: {str(c): s for c, s in per.items()} for name, per in summary.items()},
        "raw_cells": {f"{name}@c{conc}": [{k: v for k, v in c.items() if k != "stages_ms"} for c in cl]
                      for (name, conc), cl in cells.items()},
    }


# --- reporting -------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env, t, m = report["environment"], report["targets"], report["method"]
    low, high = t["low_concurrency"], t["high_concurrency"]
    lines = [
        "# Detection benchmark", "",
        f"{env['date']}, {env['cpu_count']} CPUs, Python {env['python']}, Triton {env['triton_version']}, "
        f"{MODEL} x{env['instance_count']} instances ({env['intra_op_threads']} thread each), max batch "
        f"{env['max_batch_size']}, queue delay {env['max_queue_delay_us']} us. {m['requests_per_cell_per_round']} "
        f"requests per cell x {m['rounds']} round(s), {m['aggregation']}.", "",
        "| path | c | ok | err | p50 ms | p90 ms | p99 ms | mean ms | req/s | Triton avg batch | Triton queue ms "
        "| Triton compute ms | CPU ms/req client / orch / triton |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for conc in m["concurrency"]:
        for name in PATHS:
            s = report["summary"][name][str(conc)]
            cpu = s["cpu_ms_per_request"]
            lines.append(f"| {name} | {conc} | {s['ok']} | {s['errors']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} "
                         f"| {s['mean_ms']} | {s['throughput_rps']} | {s['triton_avg_batch']} | {s['triton_queue_ms']} "
                         f"| {s['triton_compute_ms']} | {cpu['bench_client']} / {cpu['orchestrator']} / {cpu['tritonserver']} |")
    lines += ["", "Stage medians (ms): orchestrator = server-side DetectResponse.timings; "
              "triton_client_side = the same stages timed in the client.", "",
              "| path | c | decode | preprocess | triton call | postprocess | total | latency outside the stages |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for conc in m["concurrency"]:
        for name in ("triton_client_side", "orchestrator"):
            s = report["summary"][name][str(conc)]
            st = s["stages_median_ms"]
            lines.append(f"| {name} | {conc} | " + " | ".join(str(st.get(k, "")) for k in STAGES)
                         + f" | {s['outside_stages_median_ms']} |")
    lines += ["", f"Targets: orchestrator adds <= {t['added_p50_ms_max']} ms p50 at c={low}; reaches >= "
              f"{t['throughput_ratio_min']}x the baseline throughput at c={high}.", "",
              f"| baseline | added p50 at c={low} (ms) | per round | target | throughput ratio at c={high} | target |",
              "|---|---:|---|---|---:|---|"]
    for base, d in report["derived"].items():
        lines.append(f"| {base} | {d[f'orchestrator_added_p50_ms_c{low}']} | {d[f'added_p50_ms_c{low}_per_round']} "
                     f"| {'PASS' if d['added_p50_target_met'] else 'FAIL'} | {d[f'throughput_ratio_c{high}']} "
                     f"| {'PASS' if d['throughput_target_met'] else 'FAIL'} |")
    bad = [(n, c) for n in PATHS for c, s in report["summary"][n].items() if s["errors"] or s["wrong_person_count"]]
    lines += ["", f"Sanity: every checked response found {EXPECTED_PERSONS} persons." if not bad
              else f"Sanity FAILED (errors or wrong person counts) in cells: {bad}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.repository / MODEL / "config.pbtxt").exists():
        print(f"no model repository at {args.repository}: run `python build_engines.py --target cpu`", file=sys.stderr)
        return 1
    stack = Stack(args.repository, REPO / ".cache" / "bench")
    try:
        stack.start()
        report = asyncio.run(run(args, stack))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stack.stop()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "detect.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.output / "detect.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
