"""docker-compose.yml and the orchestrator's Dockerfile, read as data (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engines.tensorrt_build import TRITON_IMAGE

COMPOSE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _ports(service: dict) -> set[tuple[int, int]]:
    out = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.add((int(entry["published"]), int(entry["target"])))
        else:
            host, _, container = str(entry).rpartition(":")
            out.add((int(host.rpartition(":")[-1]), int(container.split("/")[0])))
    return out


def _mounts(service: dict) -> list[dict]:
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts.append(entry)
        else:
            parts = str(entry).split(":")
            mounts.append({"source": parts[0], "target": parts[1], "read_only": len(parts) > 2 and "ro" in parts[2]})
    return mounts


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_services_and_pinned_triton_image(services):
    assert set(services) == {"triton", "orchestrator"}
    image = services["triton"]["image"]
    assert image == TRITON_IMAGE, "compose and engines/tensorrt_build.py must pin the same Triton release"
    name, _, tag = image.rpartition(":")
    assert name == "nvcr.io/nvidia/tritonserver" and re.fullmatch(r"\d\d\.\d\d-py3", tag), image


def test_triton_ports_repository_and_gpu(services):
    triton = services["triton"]
    assert {(8000, 8000), (8001, 8001), (8002, 8002)} <= _ports(triton)
    (models,) = [m for m in _mounts(triton) if m["target"] == "/models"]
    assert Path(models["source"]).as_posix().lstrip("./") == "model_repository"
    assert models.get("read_only") is True
    command = " ".join(triton["command"]) if isinstance(triton["command"], list) else triton["command"]
    assert "--model-repository=/models" in command and command.split()[0] == "tritonserver"

    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("count") or d.get("device_ids"))
               for d in devices)


def test_triton_healthcheck_is_readiness(services):
    text = _healthcheck_text(services["triton"])
    assert "localhost:8000/v2/health/ready" in text
    assert services["triton"]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")


def test_orchestrator_points_at_triton_and_waits_for_it(services):
    orch = services["orchestrator"]
    assert orch["depends_on"]["triton"]["condition"] == "service_healthy"
    env = _environment(orch)
    host, _, port = env["FRAMEWISE_TRITON_URL"].rpartition(":")
    assert host == "triton" and host in services  # the Triton service, by its compose name
    assert (int(port), int(port)) in _ports(services["triton"]) and int(port) == 8001  # Triton's gRPC port
    assert {(50051, 50051), (9091, 9091)} <= _ports(orch)
    assert (REPO_ROOT / orch["build"]["dockerfile"]).is_file()
    assert Path(orch["build"].get("context", ".")).resolve() == Path.cwd()


def test_orchestrator_volumes_hold_job_store_and_storage(compose, services):
    orch = services["orchestrator"]
    env = _environment(orch)
    mounts = {m["target"]: m for m in _mounts(orch)}
    job_store = Path(env["FRAMEWISE_JOB_STORE"])
    storage = Path(env["FRAMEWISE_STORAGE_ROOT"])
    assert str(job_store.parent) in mounts, "the SQLite job store must live on a volume"
    assert str(storage) in mounts, "the storage tiers must live on a volume"
    for target in (str(job_store.parent), str(storage)):
        source = mounts[target]["source"]
        assert source in compose.get("volumes", {}), f"{target} should be a named volume"
        assert not mounts[target].get("read_only")


def test_did_key_comes_from_the_environment(services):
    env = _environment(services["orchestrator"])
    assert "FRAMEWISE_DID_API_KEY" in env
    assert re.fullmatch(r"\$\{FRAMEWISE_DID_API_KEY(:?-[^}]*)?\}", env["FRAMEWISE_DID_API_KEY"]), \
        "the key is interpolated from the host environment, never written in the file"


def test_orchestrator_healthcheck_uses_grpc_health(services):
    text = _healthcheck_text(services["orchestrator"])
    assert "grpc_health.v1" in text and "Check" in text and "localhost:50051" in text
    # The one-liner is valid Python.
    code = services["orchestrator"]["healthcheck"]["test"][-1]
    compile(code, "<healthcheck>", "exec")


def test_environment_names_are_real_flags(services, monkeypatch):
    """Every FRAMEWISE_* variable in compose is one the orchestrator reads, and the whole set parses."""
    source = (REPO_ROOT / "server" / "config.py").read_text()
    known = {f"FRAMEWISE_{name}" for name in re.findall(r'_env\("([A-Z0-9_]+)"', source)}
    env = _environment(services["orchestrator"])
    unknown = {k for k in env if k.startswith("FRAMEWISE_")} - known
    assert not unknown, f"compose sets variables the server does not read: {sorted(unknown)}"

    from server.config import parse_args

    for key in list(known):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value))
    config = parse_args([])
    assert config.triton_url == "triton:8001"
    assert config.triton_shm == "on"
    assert config.listen == "0.0.0.0:50051" and config.metrics_listen == "0.0.0.0:9091"
    assert config.jobs.store_path == Path("/var/lib/framewise/jobs/jobs.sqlite3")
    assert config.jobs.storage_root == Path("/var/lib/framewise/storage")
    assert config.jobs.did_api_key is None  # empty key: talking videos refused, not sent with no key


def test_shared_memory_needs_the_shared_ipc_namespace(services):
    orch, triton = services["orchestrator"], services["triton"]
    if _environment(orch).get("FRAMEWISE_TRITON_SHM") == "on":
        assert orch.get("ipc") == "service:triton" and triton.get("ipc") == "shareable"
        assert triton.get("shm_size"), "Docker's 64 MB /dev/shm is too small for the slots"


# --- the Dockerfile ------------------------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "docker" / "orchestrator.Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def test_dockerfile_runs_the_server_against_an_external_triton():
    instructions = _dockerfile()
    (base,) = [v for k, v in instructions if k == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    entrypoint = [_exec_form(v) for k, v in instructions if k == "ENTRYPOINT"]
    cmd = [_exec_form(v) for k, v in instructions if k == "CMD"]
    argv = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
    assert argv[:3] == ["python", "-m", "server"], argv
    env = " ".join(v for k, v in instructions if k == "ENV")
    triton_from_env = re.search(r"FRAMEWISE_TRITON_URL=(\S+)", env)
    assert "--triton-url" in argv or triton_from_env, "the server must be pointed at an external Triton"
    if triton_from_env and "--triton-url" not in argv:
        assert triton_from_env.group(1) == "triton:8001"


def test_dockerfile_installs_runtime_only():
    instructions = _dockerfile()
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "installs the project itself"
    assert "[dev]" not in runs and "torch" not in runs and "tensorrt" not in runs
    assert "libglib2.0-0" in runs  # opencv-python-headless' runtime library
    assert any(k == "USER" and v not in ("root", "0") for k, v in instructions)
    health = [v for k, v in instructions if k == "HEALTHCHECK"]
    assert health and "grpc_health.v1" in health[0]
    copied = " ".join(v for k, v in instructions if k == "COPY")
    for package in ("server", "framewise", "clients", "engines", "pyproject.toml"):
        assert package in copied


def test_dockerignore_keeps_environments_and_weights_out():
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".git", ".venv", ".venv-export", ".cache", "model_repository", "*.plan", "*.onnx"):
        assert entry in ignored, entry
    for needed in ("server", "framewise", "clients", "engines", "pyproject.toml", "README.md"):
        assert needed not in ignored
