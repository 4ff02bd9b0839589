"""The authentication flags (server/auth/config.py) as `python -m server` parses them, and the
startup decision whether callers must authenticate (server/auth/layer.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.auth.config import AuthConfig
from server.auth.keys import generate_key
from server.auth.layer import auth_required_at_start
from server.config import parse_args
from server.jobs.store.sqlite import SqliteJobStore


def test_defaults() -> None:
    auth = parse_args([]).auth
    assert auth.mode == "auto" and not auth.jwt_enabled and auth.mtls_tenant_map is None
    assert auth.open_methods == ("/grpc.health.v1.Health/", "/grpc.reflection.")
    assert auth.key_cache_ttl_s == 2.0 and auth.jwt_leeway_s == 30 and auth.jwt_tenant_claim == "tenant"


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FRAMEWISE_AUTH", "required")
    monkeypatch.setenv("FRAMEWISE_JWKS_FILE", str(tmp_path / "jwks.json"))
    auth = parse_args(["--jwt-issuer", "https://iss", "--jwt-audience", "fw", "--auth-open-methods", "",
                       "--jwt-tenant-claim", "org", "--auth-key-cache-ttl", "0"]).auth
    assert auth.mode == "required" and auth.jwt_issuer == "https://iss" and auth.jwt_audience == "fw"
    assert auth.jwks_file == tmp_path / "jwks.json" and auth.jwt_tenant_claim == "org"
    assert auth.open_methods == () and auth.key_cache_ttl_s == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--auth", "maybe"], "invalid choice"),
        (["--jwt-issuer", "https://iss"], "--jwt-issuer needs --jwt-audience and --jwks-file"),
        (["--jwt-audience", "fw"], "need --jwt-issuer"),
        (["--auth-open-methods", "grpc.health"], "not a method-name prefix"),
        (["--auth-key-cache-ttl", "3600"], "--auth-key-cache-ttl"),
        (["--jwt-leeway", "-1"], "--jwt-leeway"),
    ],
)
def test_unworkable_flags_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "with_key", "required"),
    [
        (AuthConfig(mode="off"), True, False),
        (AuthConfig(mode="auto"), False, False),
        (AuthConfig(mode="auto"), True, True),
        (AuthConfig(mode="required"), False, True),
        (AuthConfig(mode="auto", mtls_tenant_map=Path("/nonexistent/map.json")), False, True),
        (AuthConfig(mode="auto", jwt_issuer="https://iss", jwt_audience="fw", jwks_file=Path("/x")), False, True),
    ],
)
async def test_whether_authentication_is_required_at_start(
    tmp_path: Path, config: AuthConfig, with_key: bool, required: bool
) -> None:
    store_path = tmp_path / "jobs.sqlite3"
    if with_key:
        async with SqliteJobStore(store_path) as store:
            k = generate_key()
            await store.create_api_key(key_id=k.key_id, tenant="acme", scopes=(), secret_hash=k.secret_hash, expire_time=None)
            await store.revoke_api_key(k.key_id)  # revoked keys count too
    assert await auth_required_at_start(config, str(store_path)) is required
