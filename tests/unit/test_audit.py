"""The audit lines (server/auth/audit.py): what each names, and that a client-chosen string
cannot make one grow without bound."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from server.auth import audit
from server.auth.principal import check_tenant
from server.jobs.store.protocol import ApiKeyRecord


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "server.audit"]


def test_cross_tenant_takes_the_call_from_the_interceptor(caplog: pytest.LogCaptureFixture) -> None:
    call = audit.CallInfo(method="/framewise.v1.JobService/WatchOperation", peer="ipv4:10.1.2.3:555", tenant="acme",
                          subject="0123456789ab", via="api_key")
    token = audit.bind_call(call)
    try:
        with caplog.at_level(logging.INFO, logger="server.audit"):
            audit.cross_tenant(resource="operations/" + "x" * 5000)
    finally:
        audit.unbind_call(token)
    (line,) = _records(caplog)
    assert (line.event, line.method, line.peer, line.tenant, line.key_id) == (  # type: ignore[attr-defined]
        "cross_tenant", call.method, call.peer, "acme", "0123456789ab"
    )
    assert len(line.resource) < 300 and "5011 chars" in line.resource  # type: ignore[attr-defined]
    assert call.cross_tenant_attempts == 1


def test_cross_tenant_outside_a_call_logs_what_it_was_given(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.audit"):
        audit.cross_tenant(tenant="acme", resource="sessions/s1", method="/m", peer="p")
    (line,) = _records(caplog)
    assert (line.tenant, line.resource, line.method, line.peer) == ("acme", "sessions/s1", "/m", "p")  # type: ignore[attr-defined]


def test_key_lines_name_the_key_id_and_tenant(caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.now(UTC)
    record = ApiKeyRecord(key_id="0123456789ab", tenant="acme", scopes=("vision",), secret_hash="ab" * 32,
                          create_time=now, expire_time=None, revoke_time=now)
    with caplog.at_level(logging.INFO, logger="server.audit"):
        audit.key_created(record, actor="admin-cli:test")
        audit.key_revoked(record, actor="admin-cli:test")
    created, revoked = _records(caplog)
    assert (created.event, created.key_id, created.tenant, created.scopes) == ("key_created", "0123456789ab", "acme", ["vision"])  # type: ignore[attr-defined]
    assert (revoked.event, revoked.revoked) == ("key_revoked", now.isoformat())  # type: ignore[attr-defined]
    assert all("ab" * 32 not in str(vars(r)) for r in (created, revoked))  # not even the hash


@pytest.mark.parametrize("name", ["acme", "tenant-a", "A.b_c-9", "x" * 64])
def test_valid_tenant_names(name: str) -> None:
    assert check_tenant(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a..b", "x" * 65, "é", "a b", "a\x00"])
def test_invalid_tenant_names(name: str) -> None:
    with pytest.raises(ValueError, match="tenant name"):
        check_tenant(name)
