"""docker-compose.yml and the orchestrator's Dockerfile, read as data (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engines.tensorrt_build import TRITON_IMAGE
from server.cluster.haproxy import compose_config

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


@pytest.fixture(scope="module")
def orchestrators(services) -> dict[str, dict]:
    """The replicas: orchestrator-1..N, by service name."""
    found = {name: svc for name, svc in services.items() if re.fullmatch(r"orchestrator-\d+", name)}
    assert found, "no orchestrator-N services"
    return dict(sorted(found.items(), key=lambda item: int(item[0].rpartition("-")[2])))


def _interpolated(value: str) -> str:
    """A value as compose fills it in with nothing set in the environment but the required ones
    (``${X:-default}`` -> default, ``${X:?message}`` -> a stand-in for the value one must set)."""
    value = re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{([A-Z0-9_]+):?\?[^}]*\}", lambda m: f"<{m.group(1)}>", value)


def _healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_services_and_pinned_triton_image(services, orchestrators):
    assert set(services) == {"triton", "postgres", "lb", *orchestrators}
    assert len(orchestrators) >= 2, "the cluster topology has several replicas"
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


def test_orchestrators_point_at_triton_and_postgres_and_wait_for_them(services, orchestrators):
    for name, orch in orchestrators.items():
        assert orch["depends_on"]["triton"]["condition"] == "service_healthy", name
        assert orch["depends_on"]["postgres"]["condition"] == "service_healthy", name
        env = _environment(orch)
        host, _, port = env["FRAMEWISE_TRITON_URL"].rpartition(":")
        assert host == "triton" and host in services  # the one Triton service, by its compose name
        assert (int(port), int(port)) in _ports(services["triton"]) and int(port) == 8001  # Triton's gRPC port
        # Clients reach the replicas through the load balancer only.
        assert not _ports(orch), f"{name} publishes ports; only the load balancer should"
        assert {"50051", "9091"} <= {str(e) for e in orch.get("expose", [])}
        assert (REPO_ROOT / orch["build"]["dockerfile"]).is_file()
        assert Path(orch["build"].get("context", ".")).resolve() == Path.cwd()


def test_replicas_share_one_job_store_and_one_storage_volume(compose, services, orchestrators):
    stores, storage_sources = set(), set()
    for name, orch in orchestrators.items():
        env = _environment(orch)
        url = _interpolated(env["FRAMEWISE_JOB_STORE"])
        assert re.fullmatch(r"postgresql://framewise:<FRAMEWISE_PG_PASSWORD>@postgres:5432/framewise", url), url
        stores.add(url)
        mounts = {m["target"]: m for m in _mounts(orch)}
        storage = env["FRAMEWISE_STORAGE_ROOT"]
        assert storage in mounts, f"{name}: the storage tiers must live on a volume"
        assert mounts[storage]["source"] in compose.get("volumes", {}) and not mounts[storage].get("read_only")
        storage_sources.add((mounts[storage]["source"], storage))
    assert len(stores) == 1 and len(storage_sources) == 1, "every replica uses the same store and storage volume"


def test_postgres_service_keeps_its_data_and_its_password_secret(compose, services):
    pg = services["postgres"]
    assert re.fullmatch(r"postgres:1[5-9](\.\d+)?", pg["image"]), pg["image"]
    env = _environment(pg)
    assert env["POSTGRES_USER"] == "framewise" and env["POSTGRES_DB"] == "framewise"
    assert re.fullmatch(r"\$\{FRAMEWISE_PG_PASSWORD:\?[^}]+\}", env["POSTGRES_PASSWORD"]), "required, from the environment"
    (data,) = [m for m in _mounts(pg) if m["target"] == "/var/lib/postgresql/data"]
    assert data["source"] in compose.get("volumes", {})
    assert "pg_isready" in _healthcheck_text(pg)
    assert not _ports(pg), "the job store is reached on the compose network only"


def test_replicas_have_their_own_ids(orchestrators):
    ids = [_environment(o)["FRAMEWISE_REPLICA_ID"] for o in orchestrators.values()]
    assert ids == [f"replica-{i}" for i in range(1, len(orchestrators) + 1)]


def test_load_balancer_is_haproxy_with_the_generated_configuration(services, orchestrators):
    lb = services["lb"]
    assert re.fullmatch(r"haproxy:2\.6(\.\d+)?", lb["image"]), lb["image"]
    assert (50051, 50051) in _ports(lb)
    (cfg,) = [m for m in _mounts(lb) if m["target"] == "/usr/local/etc/haproxy/haproxy.cfg"]
    assert cfg.get("read_only") is True
    path = REPO_ROOT / cfg["source"]
    # Generated, never edited by hand: the file is what server/cluster/haproxy.py renders.
    assert path.read_text() == compose_config(len(orchestrators)).render()
    text = path.read_text()
    for i, name in enumerate(orchestrators, start=1):
        assert f"server replica-{i} {name}:50051 proto h2 check port 9091 check-proto h1" in text
    assert "balance hdr(x-framewise-session)" in text and "hash-type consistent" in text
    assert "bind 0.0.0.0:50051 proto h2" in text and "http-check send meth GET uri /healthz" in text
    assert set(lb["depends_on"]) == set(orchestrators)


def test_did_key_comes_from_the_environment(orchestrators):
    for orch in orchestrators.values():
        env = _environment(orch)
        assert "FRAMEWISE_DID_API_KEY" in env
        assert re.fullmatch(r"\$\{FRAMEWISE_DID_API_KEY(:?-[^}]*)?\}", env["FRAMEWISE_DID_API_KEY"]), \
            "the key is interpolated from the host environment, never written in the file"


def test_orchestrator_healthcheck_uses_grpc_health(orchestrators):
    for orch in orchestrators.values():
        text = _healthcheck_text(orch)
        assert "grpc_health.v1" in text and "Check" in text and "localhost:50051" in text
        # The one-liner is valid Python.
        compile(orch["healthcheck"]["test"][-1], "<healthcheck>", "exec")


def test_environment_names_are_real_flags(orchestrators, monkeypatch):
    """Every FRAMEWISE_* variable in compose is one the orchestrator reads, and the whole set parses."""
    # The server's flags and the authentication flags (server/auth/config.py adds its own group).
    source = "".join((REPO_ROOT / "server" / path).read_text() for path in ("config.py", "auth/config.py"))
    known = {f"FRAMEWISE_{name}" for name in re.findall(r'_env\("([A-Z0-9_]+)"', source)}
    from server.config import parse_args

    for name, orch in orchestrators.items():
        env = _environment(orch)
        unknown = {k for k in env if k.startswith("FRAMEWISE_")} - known
        assert not unknown, f"compose sets variables the server does not read: {sorted(unknown)}"
        for key in list(known):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, _interpolated(value).replace("<FRAMEWISE_PG_PASSWORD>", "secret"))
        config = parse_args([])
        assert config.triton_url == "triton:8001"
        assert config.triton_shm == "on"
        assert config.listen == "0.0.0.0:50051" and config.metrics_listen == "0.0.0.0:9091"
        # Replicas listen beyond loopback, so they require authentication (or refuse to start).
        assert config.auth.mode == "required" and not config.transport.allow_unauthenticated_public
        assert config.jobs.store == "postgresql://framewise:secret@postgres:5432/framewise"
        assert config.jobs.store_path is None  # PostgreSQL, not a SQLite file
        assert config.jobs.storage_root == Path("/var/lib/framewise/storage")
        assert config.jobs.did_api_key is None  # empty key: talking videos refused, not sent with no key
        assert env["FRAMEWISE_REPLICA_ID"] == f"replica-{name.rpartition('-')[2]}"


def test_shared_memory_needs_the_shared_ipc_namespace(services, orchestrators):
    triton = services["triton"]
    for orch in orchestrators.values():
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
