"""`python -m server.cluster` (what `make serve-cluster` runs), as a user runs it: the session's
Triton and PostgreSQL are passed in (their own launchers are tested in test_lifecycle.py and
test_pg_local.py); it starts the D-ID emulator, two replicas and HAProxy, starts a replica
killed with -9 again, and SIGTERM stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from tests.cluster import create_schema, replica_answering
from tests.conftest import REPO, free_port, pid_alive, stop_process, wait_until


def test_the_launcher_serves_restarts_a_killed_replica_and_stops_everything(tmp_path: Path, triton, postgres_server) -> None:  # noqa: ANN001
    state_file = tmp_path / "cluster.json"
    port, stats_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "server.cluster", "--replicas", "2", "--port", str(port), "--grpc-base", "0",
        "--metrics-base", "0", "--stats-port", str(stats_port), "--emulator-port", "0", "--work-dir", str(tmp_path),
        "--triton-url", triton.url, "--job-store", create_schema(postgres_server.url), "--state-file", str(state_file),
        "--", "--health-interval", "0.2", "--shutdown-grace", "5",
    ]  # fmt: skip
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, FRAMEWISE_DID_API_KEY=""))
    try:
        wait_until(lambda: state_file.exists() or launcher.poll() is not None, 120, "the cluster to start")
        assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
        state = json.loads(state_file.read_text())
        assert state["address"] == f"127.0.0.1:{port}" and state["did_url"].startswith("http://127.0.0.1:")
        replicas = state["replicas"]
        assert [r["replica_id"] for r in replicas] == ["replica-1", "replica-2"]
        with grpc.insecure_channel(state["address"]) as lb:
            assert {replica_answering(lb) for _ in range(6)} == {"replica-1", "replica-2"}
        # The emulator the replicas were pointed at, since no D-ID key was set.
        assert "LOCAL D-ID EMULATOR" in (tmp_path / "launcher.log").read_text()
        # kill -9 of a replica: the launcher starts it again, same id and address.
        victim = replicas[1]
        os.kill(victim["pid"], signal.SIGKILL)
        with grpc.insecure_channel(victim["address"]) as direct:
            wait_until(lambda: _answers(direct) == "replica-2", 60, "replica-2 to be started again")
        children = _children(launcher.pid)
        assert victim["pid"] not in children and len(children) >= 4  # 2 replicas, the emulator, HAProxy
    finally:
        code = stop_process(launcher, 90)
    assert code == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    # Everything it started is gone: no child left, nothing listening on the cluster's port.
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as lb:
        assert _answers(lb) is None


def _answers(channel: grpc.Channel) -> str | None:
    try:
        return replica_answering(channel, timeout_s=2)
    except grpc.RpcError:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found
