#!/usr/bin/env python3
"""What authentication costs a call: p50 of Detect, of a tracked frame, and of the cheapest
authenticated RPC (GetServerInfo), with authentication off and on (an API key; a JWT), in one
run, on one Triton, the same server build.

Two orchestrators (`python -m server --triton-url`) in front of one tritonserver, both plaintext
on loopback (TLS is a separate cost; this isolates authentication):

  off      --auth off: every call runs as the anonymous principal, no interceptor work;
  on       --auth required with a JWT issuer (a JWKS file made here): an API key made by
           `framewise admin keys create` in its job store, or an RS256 JWT signed here.

Three sides: ``off`` (server off, no credential), ``api_key`` and ``jwt`` (server on). They take
turns call by call (off, API key, JWT, off, ...; Track frames likewise over three open streams),
the order rotated each round, so drift on a shared host hits them alike. Per round and side:
GetServerInfo calls, Detect calls (bus.jpg, checked for 4 persons), and one Track stream (a new
session on the Crossing sequence; its first 16 frames fill the memory bank and are not
measured). Every call waits for the one before (concurrency 1).

A Track stream is authenticated once, when it opens: its frames pass no credential check, so
the tracked-frame figure shows what authentication adds to a frame of an open stream (nothing
by design; noise otherwise). The stream open itself is measured too.

    .venv/bin/python bench/auth_bench.py --output bench/results          # about 3 minutes on 2 cores
    .venv/bin/python bench/auth_bench.py --quick --output /tmp/auth       # smoke run
    .venv/bin/python bench/auth_bench.py --render --output bench/results  # auth.md again from auth.json

The SAM 2 parts are the CPU repository's STAND-IN contract models at a 256 image size (their
compute means nothing; a frame's Triton time is small, which makes the added time easier to see).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from server.processes import no_grpc_fork_handlers  # no gRPC in it

no_grpc_fork_handlers()  # before gRPC loads: the servers are started with a preexec_fn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from joserfc import jwt
from joserfc.jwk import RSAKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect_bench import _die_with_parent, _table, code_under_test, free_port, write_report

from engines.cpu_repository import build_cpu_repository
from framewise.v1 import common_pb2, info_service_pb2, info_service_pb2_grpc, tracking_service_pb2_grpc
from framewise.v1 import tracking_service_pb2 as track_pb2
from framewise.v1 import vision_service_pb2, vision_service_pb2_grpc
from server.triton.launcher import ManagedTriton, TritonPorts

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
SEQUENCE = ASSETS / "sequences" / "Crossing"
SIDES = ("off", "api_key", "jwt")
WARM_FRAMES = 16
TARGET_ADDED_MS = 0.5
ISSUER, AUDIENCE, KID = "https://issuer.bench.local", "framewise-bench", "bench-rsa-1"
SAM2_IMAGE_SIZE = 256
EXPECTED_PERSONS = 4  # bus.jpg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results", help="writes auth.json and auth.md")
    p.add_argument("--repository", type=Path, default=None,
                   help="Triton model repository (default: a CPU repository with SAM 2 stand-ins at 256, built once "
                        "into .cache/bench/auth_repository)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; every side is measured once per round")
    p.add_argument("--info-calls", type=int, default=150, help="GetServerInfo calls per side per round")
    p.add_argument("--detect-calls", type=int, default=40, help="Detect calls per side per round")
    p.add_argument("--frames", type=int, default=56, help="frames per Track stream (the first 16 unmeasured)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 20 info calls, 5 Detects, 20 frames")
    p.add_argument("--render", action="store_true", help="only write auth.md again from the auth.json in --output")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.info_calls, a.detect_calls, a.frames = 2, 20, 5, 20
    if not WARM_FRAMES < a.frames <= 120:
        p.error(f"--frames must be within {WARM_FRAMES + 1}..120 (the Crossing sequence has 120)")
    return a


# -- the servers --------------------------------------------------------------------------------------


class Servers:
    """One tritonserver, the `off` and `on` orchestrators; a `with` block starts and stops them."""

    def __init__(self, repository: Path, work: Path) -> None:
        self.repository, self.work = repository.absolute(), work
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.api_key = ""
        self.key = RSAKey.generate_key(2048, parameters={"kid": KID})

    def __enter__(self) -> Servers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _popen(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with open(self.work / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _wait(self, name: str, ready, timeout_s: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.procs[name].poll() is None:
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.25)
        tail = (self.work / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} did not become ready (exit code {self.procs[name].poll()}):\n{tail}")

    def start(self) -> None:
        import httpx

        self.work.mkdir(parents=True, exist_ok=True)
        ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
        launcher = ManagedTriton(self.repository, self.work / "triton", ports, restart_on_exit=False)
        (self.work / "triton").mkdir(exist_ok=True)
        self._popen("tritonserver", launcher.command(), launcher.environment())
        self._wait("tritonserver", lambda: httpx.get(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=1).status_code == 200, 180)

        jwks = self.work / "jwks.json"
        jwks.write_text(json.dumps({"keys": [{**self.key.as_dict(private=False), "alg": "RS256"}]}))
        on_store = self.work / "on-jobs.sqlite3"
        made = subprocess.run(
            [sys.executable, "-m", "clients.cli", "admin", "keys", "create", "--tenant", "bench", "--json", "--job-store", str(on_store)],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        self.api_key = json.loads(made.stdout)["key"]
        auth = {
            "off": ["--auth", "off"],
            "on": ["--auth", "required", "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, "--jwks-file", str(jwks)],
        }
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name, flags in auth.items():
            self.addresses[name] = f"127.0.0.1:{free_port()}"
            self._popen(name, [
                sys.executable, "-m", "server", "--triton-url", launcher.url, "--listen", self.addresses[name],
                "--metrics-listen", "", "--log-level", "WARNING", "--triton-shm", "on", "--result-cache-bytes", "0",
                "--job-store", str(self.work / f"{name}-jobs.sqlite3"), "--storage-root", str(self.work / f"{name}-storage"),
                *flags,
            ], env)  # fmt: skip
        for name in auth:
            channel = grpc.insecure_channel(self.addresses[name])
            check = health_pb2_grpc.HealthStub(channel).Check
            serving = health_pb2.HealthCheckResponse.SERVING
            self._wait(name, lambda c=check: c(health_pb2.HealthCheckRequest(), timeout=2).status == serving, 120)
            channel.close()

    def token(self) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "tenant": "bench", "iat": now, "exp": now + 3600,
                  "scope": "vision tracking jobs:read jobs:write"}
        return jwt.encode({"alg": "RS256", "kid": KID}, claims, self.key)

    def stop(self) -> None:
        for name in ("off", "on", "tritonserver"):  # the fronts first
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# -- one side's measurements ------------------------------------------------------------------------------


def crossing() -> tuple[list[bytes], common_pb2.BoundingBox]:
    frames = [p.read_bytes() for p in sorted((SEQUENCE / "img").glob("*.jpg"))]
    x, y, w, h = (float(v) for v in (SEQUENCE / "groundtruth_rect.txt").read_text().split("\n")[0].replace("\t", ",").split(","))
    return frames, common_pb2.BoundingBox(x1=x, y1=y, x2=x + w, y2=y + h)


def info_call(channel: grpc.Channel, metadata: list[tuple[str, str]]):  # noqa: ANN201
    stub = info_service_pb2_grpc.InfoServiceStub(channel)
    request = info_service_pb2.GetServerInfoRequest()
    return lambda: stub.GetServerInfo(request, metadata=metadata, timeout=10)


def detect_call(channel: grpc.Channel, metadata: list[tuple[str, str]], jpeg: bytes):  # noqa: ANN201
    stub = vision_service_pb2_grpc.VisionServiceStub(channel)
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=jpeg))

    def call() -> None:
        response = stub.Detect(request, metadata=metadata, timeout=60)
        if len(response.detections) != EXPECTED_PERSONS:
            raise RuntimeError(f"Detect found {len(response.detections)} persons in bus.jpg, expected {EXPECTED_PERSONS}")

    return call


def timed(call) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


class TrackStream:
    """One Track stream driven lock-step: a frame is sent when the last one's result is back."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]]) -> None:
        self._requests: queue.Queue[track_pb2.TrackRequest | None] = queue.Queue()
        self._stream = tracking_service_pb2_grpc.TrackingServiceStub(channel).Track(self._feed(), metadata=metadata, timeout=600)

    def _feed(self) -> Iterator[track_pb2.TrackRequest]:
        while (item := self._requests.get()) is not None:
            yield item

    def open(self) -> float:
        t0 = time.perf_counter()
        self._requests.put(track_pb2.TrackRequest(open=track_pb2.OpenSession()))
        if next(self._stream).WhichOneof("message") != "session":
            raise RuntimeError("Track did not open a session")
        return (time.perf_counter() - t0) * 1e3

    def frame(self, index: int, data: bytes, box: common_pb2.BoundingBox | None) -> float:
        frame = track_pb2.TrackFrame(frame_index=index, image=common_pb2.Image(encoded=data))
        if box is not None:
            frame.prompts.add(object_id=1, box=box)
        t0 = time.perf_counter()
        self._requests.put(track_pb2.TrackRequest(frame=frame))
        reply = next(self._stream)
        elapsed = (time.perf_counter() - t0) * 1e3
        if reply.frame.frame_index != index:
            raise RuntimeError(f"Track answered frame {reply.frame.frame_index} for frame {index}")
        return elapsed

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._stream:
            pass


def p50(values: list[float]) -> float:
    return statistics.median(values)


# -- the run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, servers: Servers) -> dict:
    jpeg = (ASSETS / "images" / "bus.jpg").read_bytes()
    frames, box = crossing()
    frames = frames[: args.frames]
    limits = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = {name: grpc.insecure_channel(address, options=limits) for name, address in servers.addresses.items()}
    token = servers.token()
    sides = {
        "off": (channels["off"], []),
        "api_key": (channels["on"], [("authorization", f"Bearer {servers.api_key}")]),
        "jwt": (channels["on"], [("authorization", f"Bearer {token}")]),
    }
    samples: dict[str, dict[str, list[float]]] = {s: {"info": [], "detect": [], "frame": [], "open": []} for s in SIDES}
    per_round: dict[str, dict[str, list[float]]] = {s: {"info": [], "detect": [], "frame": []} for s in SIDES}
    infos = {side: info_call(*sides[side]) for side in SIDES}
    detects = {side: detect_call(*sides[side], jpeg) for side in SIDES}
    load_at_start = os.getloadavg()
    try:
        for side in SIDES:  # warm-up, unmeasured: connections, the JWT cache, Triton
            for _ in range(20):
                infos[side]()
            for _ in range(3):
                detects[side]()
        for r in range(args.rounds):
            # Call by call, the sides take turns (off, API key, JWT, off, ...), the order rotated
            # each round and reversed every third: drift on the host hits the three alike.
            order = SIDES[r % 3 :] + SIDES[: r % 3]
            if (r // 3) % 2:
                order = order[::-1]
            got: dict[str, dict[str, list[float]]] = {s: {"info": [], "detect": [], "frame": []} for s in SIDES}
            for _ in range(args.info_calls):
                for side in order:
                    got[side]["info"].append(timed(infos[side]))
            for _ in range(args.detect_calls):
                for side in order:
                    got[side]["detect"].append(timed(detects[side]))
            streams = {side: TrackStream(*sides[side]) for side in order}
            for side in order:
                samples[side]["open"].append(streams[side].open())
            for i, data in enumerate(frames):
                for side in order:
                    elapsed = streams[side].frame(i, data, box if i == 0 else None)
                    if i >= WARM_FRAMES:  # the memory bank is full from here on
                        got[side]["frame"].append(elapsed)
            for stream in streams.values():
                stream.close()
            for side in SIDES:
                for kind, values in got[side].items():
                    samples[side][kind] += values
                    per_round[side][kind].append(p50(values))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{s} info {per_round[s]['info'][-1]:.3f} / detect {per_round[s]['detect'][-1]:.2f} / frame {per_round[s]['frame'][-1]:.2f} ms"
                for s in SIDES), flush=True)
    finally:
        for channel in channels.values():
            channel.close()
    summary = {
        side: {kind: {"p50_ms": round(p50(v), 4), "n": len(v)} for kind, v in samples[side].items()} for side in SIDES
    }
    added = {
        side: {kind: round(summary[side][kind]["p50_ms"] - summary["off"][kind]["p50_ms"], 4) for kind in ("info", "detect", "frame", "open")}
        for side in ("api_key", "jwt")
    }
    # The same figure from the pairs: call i of a side minus call i of off, made back to back.
    paired = {
        side: {kind: round(p50([a - b for a, b in zip(samples[side][kind], samples["off"][kind], strict=True)]), 4)
               for kind in ("info", "detect", "frame")}
        for side in ("api_key", "jwt")
    }
    return {
        "environment": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **code_under_test(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "load_at_start": load_at_start,
            "load_at_end": os.getloadavg(), "repository": str(args.repository),
        },
        "method": {
            "rounds": args.rounds, "info_calls": args.info_calls, "detect_calls": args.detect_calls,
            "frames_per_stream": args.frames, "unmeasured_frames": WARM_FRAMES, "concurrency": 1,
            "order": "the sides take turns call by call (and frame by frame over three open streams), the order rotated "
                     "each round and reversed every third; p50 of the pooled samples",
            "transport": "plaintext loopback for both servers (TLS not measured here)",
            "sam2": f"STAND-IN contract models at {SAM2_IMAGE_SIZE}",
        },
        "target_added_p50_ms": TARGET_ADDED_MS,
        "summary": summary,
        "added_p50_ms": added,
        "paired_median_difference_ms": paired,
        "per_round_p50_ms": per_round,
    }


def verdicts(report: dict) -> dict[str, dict[str, str]]:
    """Per side and call (Detect, Track frame): PASS when the added p50 is under the target;
    WITHIN NOISE when it is over it by less than twice the standard error of the per-round
    differences (a 200 ms Detect on a shared 2-core host varies by more than the 0.5 ms asked
    about: the data cannot tell); FAIL otherwise."""
    out: dict[str, dict[str, str]] = {}
    rounds = report["per_round_p50_ms"]
    for side in ("api_key", "jwt"):
        out[side] = {}
        for kind in ("detect", "frame"):
            added = report["added_p50_ms"][side][kind]
            diffs = [a - b for a, b in zip(rounds[side][kind], rounds["off"][kind], strict=True)]
            noise = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
            if added < report["target_added_p50_ms"]:
                out[side][kind] = "PASS"
            elif added - noise < report["target_added_p50_ms"]:
                out[side][kind] = f"WITHIN NOISE (+/-{noise:.2f} ms)"
            else:
                out[side][kind] = "FAIL"
    return out


def markdown(report: dict) -> str:
    env, m, s, added = report["environment"], report["method"], report["summary"], report["added_p50_ms"]
    verdict = verdicts(report)
    names = {"info": "GetServerInfo", "detect": "Detect (bus.jpg)", "frame": "Track frame (1 object)", "open": "Track stream open"}
    paired = report["paired_median_difference_ms"]
    rows = []
    for kind in ("detect", "frame", "info", "open"):
        pair = {side: f" ({paired[side][kind]:+.3f})" if kind in paired[side] else "" for side in ("api_key", "jwt")}
        rows.append([names[kind], f"{s['off'][kind]['p50_ms']:.3f}", f"{s['api_key'][kind]['p50_ms']:.3f}",
                     f"{added['api_key'][kind]:+.3f}{pair['api_key']}", f"{s['jwt'][kind]['p50_ms']:.3f}",
                     f"{added['jwt'][kind]:+.3f}{pair['jwt']}", s["off"][kind]["n"]])
    round_rows = [
        [names[kind], *(" ".join(f"{v:.3f}" for v in report["per_round_p50_ms"][side][kind]) for side in SIDES)]
        for kind in ("detect", "frame", "info")
    ]
    lines = [
        "# Authentication cost", "",
        f"{env['date']}; commit {env['git_commit']}{' + changes' * env['git_uncommitted_server_changes']}; "
        f"{env['cpus']} CPUs, load {env['load_at_start'][0]:.2f} at start, {env['load_at_end'][0]:.2f} at end; "
        f"{m['rounds']} rounds, concurrency 1, {m['transport']}; SAM 2 {m['sam2']}.", "",
        "p50 in ms of the pooled samples (n per side); added = p50(side) - p50(off), in brackets the median of the "
        "paired differences (call i of the side minus call i of off, made back to back). Target: under "
        f"{report['target_added_p50_ms']} ms added p50 per Detect and per Track frame.", "",
        *_table(["call", "off", "API key", "added", "JWT", "added", "n per side"], rows),
        "Verdict (target under 0.5 ms added): "
        + "; ".join(f"{label} Detect {verdict[side]['detect']}, Track frame {verdict[side]['frame']}"
                    for side, label in (("api_key", "API key"), ("jwt", "JWT"))) + ".", "",
        "Per-round p50 (ms), in round order:", "",
        *_table(["call", "off", "API key", "JWT"], round_rows),
        "A Track stream is authenticated once, at open; its frames carry no credential check. GetServerInfo "
        "(no Triton work) shows the interceptor's cost with the least noise around it.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads((args.output / "auth.json").read_text())
        report["verdict"] = verdicts(report)
        write_report(args.output, "auth", report, markdown(report))
        return 0
    if args.repository is None:
        args.repository = build_cpu_repository(
            REPO / ".cache" / "bench" / "auth_repository", ASSETS / "models" / "yolov8n_int8.onnx", sam2_image_size=SAM2_IMAGE_SIZE
        )
    with tempfile.TemporaryDirectory(prefix="auth-bench-") as tmp, Servers(args.repository, Path(tmp)) as servers:
        report = run(args, servers)
    report["verdict"] = verdicts(report)
    write_report(args.output, "auth", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
