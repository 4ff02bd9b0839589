"""The ghz load-test configs in clients/ghz/, checked the way ghz would use them.

ghz (a Go binary) is not installed here, so each config is replayed: its keys are checked against
what ghz reads (runner/config.go), then its call is resolved through server reflection only,
asking exactly what ghz asks (file_containing_symbol for "pkg.Service.Method"), and its data
file is parsed as proto3 JSON into the reflected request type and sent. No generated stub of
framewise is imported here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.tls_fixtures import mtls_orchestrator, pki, tls_address  # noqa: F401 - pytest fixtures

REPO = Path(__file__).resolve().parents[2]
GHZ_DIR = REPO / "clients" / "ghz"
CONFIGS = sorted(GHZ_DIR.glob("*.json"))

_spec = importlib.util.spec_from_file_location("ghz_make_data", GHZ_DIR / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

# JSON keys of ghz's runner.Config that these configs may use, by type. ghz silently ignores
# unknown keys, so a misspelt one ("data_file", "skip-first") would quietly fall back to a default.
STRING_KEYS = {"name", "call", "host", "data-file", "metadata-file", "cacert", "cert", "key", "format", "output", "duration-stop"}
BOOL_KEYS = {"insecure", "count-errors"}
UINT_KEYS = {"concurrency", "connections", "total", "rps", "skipFirst"}
DURATION_KEYS = {"timeout", "duration", "max-duration", "connect-timeout"}
FORMATS = {"summary", "csv", "json", "pretty", "html", "influx-summary", "influx-details", "prometheus"}
GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_s(text: str) -> float:
    """Seconds in a Go duration string ("10s", "1m30s"), as ghz parses durations in a config."""
    assert isinstance(text, str) and re.fullmatch(f"(?:{GO_DURATION.pattern})+", text), f"not a Go duration: {text!r}"
    return sum(float(value) * GO_UNIT_S[unit] for value, unit in GO_DURATION.findall(text))


def load_config(path: Path) -> dict:
    return json.loads(path.read_text())


def reflected_method(channel: grpc.Channel, call: str) -> descriptor.MethodDescriptor:
    """Resolves ghz's --call ("pkg.Service.Method" or "pkg.Service/Method") through server reflection.

    Like ghz (protodesc.GetMethodDescFromReflect), first asks the server for the file containing
    the method's full symbol, then finds the service and method in it. A fresh database per call,
    so nothing cached answers for the server.
    """
    symbol = call.replace("/", ".")
    service_name, _, method_name = symbol.rpartition(".")
    database = ProtoReflectionDescriptorDatabase(channel)
    try:
        database.FindFileContainingSymbol(symbol)
    except KeyError:
        raise KeyError(f"Symbol not found: {symbol} (what ghz reports for this call)") from None
    method = descriptor_pool.DescriptorPool(database).FindServiceByName(service_name).methods_by_name.get(method_name)
    if method is None:
        raise KeyError(f"Symbol not found: {symbol} (service {service_name} has no method {method_name})")
    return method


def test_detect_configs_exist() -> None:
    assert {"detect_c1.json", "detect_c16.json"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_keys_and_types(path: Path) -> None:
    config = load_config(path)
    unknown = set(config) - STRING_KEYS - BOOL_KEYS - UINT_KEYS - DURATION_KEYS
    assert not unknown, f"keys ghz does not know (or this check does not expect): {sorted(unknown)}"
    for key, value in config.items():
        if key in STRING_KEYS:
            assert isinstance(value, str) and value, f"{key} must be a non-empty string"
        elif key in BOOL_KEYS:
            assert isinstance(value, bool), f"{key} must be true or false"
        elif key in UINT_KEYS:
            assert type(value) is int and value >= 0, f"{key} must be an integer >= 0"  # not a bool, not 1.0
        else:
            go_duration_s(value)

    assert config["call"] == "framewise.v1.VisionService.Detect"
    assert config["host"] == "localhost:50051"
    # Plaintext (a local `make serve`) or TLS with the CA that signed the server's certificate.
    if "cacert" in config:
        assert "insecure" not in config and not config.get("skipTLS"), "a TLS config verifies the server"
        assert ("cert" in config) == ("key" in config), "a client certificate needs its key"
        for key in ("cacert", "cert", "key"):
            if key in config:
                assert config[key].startswith("clients/ghz/data/tls/"), "certificates and keys live in the git-ignored data folder"
    else:
        assert config["insecure"] is True
        assert not {"cert", "key"} & set(config), "a client certificate needs TLS"
    # The paths make_data.py writes by default, relative to the repository root (where ghz runs).
    assert REPO / config["data-file"] == make_data.default_output(make_data.DEFAULT_IMAGE)
    # Every call carries the API key (when FRAMEWISE_API_KEY was set for make_data.py).
    assert REPO / config["metadata-file"] == make_data.METADATA_FILE
    assert config["concurrency"] >= 1
    assert config.get("connections", 1) <= config["concurrency"], "ghz refuses more connections than concurrency"
    assert ("total" in config) != ("duration" in config), "exactly one of total or duration"
    assert config.get("skipFirst", 0) < config.get("total", float("inf")), "skipFirst must leave requests to report"
    go_duration_s(config["timeout"])
    assert config["format"] in FORMATS, f"format must be one of {sorted(FORMATS)}"
    if "output" in config:
        assert config["output"].startswith("clients/ghz/data/"), "reports belong in the git-ignored data folder"


def test_metadata_file_carries_the_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = make_data.write_metadata_file("fw_key_1", tmp_path / "metadata.json")
    assert json.loads(written.read_text()) == {"authorization": "Bearer fw_key_1"}
    assert written.stat().st_mode & 0o077 == 0, "the key file is readable by its owner only"
    assert json.loads(make_data.write_metadata_file(None, tmp_path / "none.json").read_text()) == {}


def _tls_channel(config: dict, request: pytest.FixtureRequest) -> grpc.Channel:
    """A channel as ghz opens it for a TLS config, to the orchestrator requiring client
    certificates; the files the config names (which a user puts in clients/ghz/data/tls/) are
    this run's generated ones, by role."""
    pki = request.getfixturevalue("pki")
    orch = request.getfixturevalue("mtls_orchestrator")
    files = {"ca.pem": pki.ca, "client.pem": pki.client.cert, "client.key": pki.client.key}
    chosen = {key: files[Path(config[key]).name].read_bytes() for key in ("cacert", "cert", "key") if key in config}
    credentials = grpc.ssl_channel_credentials(chosen["cacert"], chosen.get("key"), chosen.get("cert"))
    return grpc.secure_channel(tls_address(orch), credentials, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_replays_through_reflection(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = load_config(path)
    data_file = make_data.write_data_file(make_data.DEFAULT_IMAGE, tmp_path / "detect_bus.json")
    # The plaintext configs replay against the session orchestrator, which requires its key;
    # the mTLS one requires no key (any stands in for the one a user puts in the file).
    key = "fw_replay_key" if "cacert" in config else request.getfixturevalue("orchestrator").api_key
    metadata_file = make_data.write_metadata_file(key, tmp_path / "metadata.json")
    channel = _tls_channel(config, request) if "cacert" in config else request.getfixturevalue("channel")

    method = reflected_method(channel, config["call"])
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(data_file.read_text(), request_class())
    call = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    metadata = tuple(json.loads(metadata_file.read_text()).items())
    try:
        response = call(request, timeout=go_duration_s(config["timeout"]), metadata=metadata)
    finally:
        if "cacert" in config:
            channel.close()

    assert [detection.label for detection in response.detections] == ["person"] * 4
    assert response.image_width == 810 and response.image_height == 1080


@pytest.mark.parametrize("call", ["framewise.v1.VisionService.Detekt", "framewise.v2.VisionService.Detect"])
def test_unknown_call_fails_in_reflection(channel: grpc.Channel, call: str) -> None:
    with pytest.raises(KeyError, match=re.escape(call)):
        reflected_method(channel, call)
