"""Children started with a preexec_fn (tritonserver and the job worker, by the serving process) reach
exec even while the parent is busy with gRPC. With gRPC's fork handlers on (its default), ~1 child in 4
died of SIGABRT or SIGSEGV before exec on this machine (grpc/grpc#43055); `python -m server` turns
them off before gRPC is imported."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

SPAWNS = 200

# Runs in a fresh interpreter set up as `python -m server` sets itself up (importing server.__main__
# runs its module-level set-up, not main()), then starts SPAWNS children the way the launcher does
# while four tasks keep gRPC calls in flight on the same process.
_SCRIPT = f"""
import server.__main__
import asyncio, collections, json, signal
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from server.processes import child_setup

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(f"127.0.0.1:{{port}}"))
    busy = True
    async def load():
        while busy:
            await stub.Check(health_pb2.HealthCheckRequest())
    tasks = [asyncio.create_task(load()) for _ in range(4)]
    codes = collections.Counter()
    for _ in range({SPAWNS}):
        child = await asyncio.create_subprocess_exec(
            "/bin/true", preexec_fn=child_setup(signal.SIGTERM, nice=1), stderr=asyncio.subprocess.DEVNULL
        )
        codes[await child.wait()] += 1
    busy = False
    await asyncio.gather(*tasks)
    print(json.dumps(codes))

asyncio.run(main())
"""


def test_children_started_under_grpc_load_reach_exec() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == {"0": SPAWNS}, f"exit codes of {SPAWNS} children: {codes} (negative: killed by that signal)"
