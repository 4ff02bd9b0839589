"""The mTLS tenant map (server/auth/mtls.py): which certificate identity becomes which tenant.
(Through a real TLS handshake: tests/unit/test_auth_interceptor.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.auth.mtls import DEFAULT_SCOPES, load_tenant_map
from server.transport.identity import ClientIdentity


def _map(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(data))
    return path


def _identity(cn: str = "", sans: tuple[str, ...] = (), uris: tuple[str, ...] = (), subject: str = "") -> ClientIdentity:
    return ClientIdentity(common_name=cn, subject=subject or (f"CN={cn}" if cn else ""), sans=sans, uris=uris, dns_names=())


def test_a_uri_san_wins_over_the_common_name(tmp_path: Path) -> None:
    tenants = load_tenant_map(_map(tmp_path, {"render": "by-cn", "spiffe://x/acme": {"tenant": "acme", "scopes": ["vision"]}}))
    p = tenants.principal(_identity(cn="render", sans=("spiffe://x/acme",), uris=("spiffe://x/acme",)))
    assert p is not None and (p.tenant, p.subject, p.via, p.scopes) == ("acme", "spiffe://x/acme", "mtls", {"vision"})
    p = tenants.principal(_identity(cn="render"))
    assert p is not None and p.tenant == "by-cn" and p.scopes == frozenset(DEFAULT_SCOPES)
    assert "admin" not in DEFAULT_SCOPES


def test_the_whole_subject_matches_too(tmp_path: Path) -> None:
    tenants = load_tenant_map(_map(tmp_path, {"CN=svc,O=Acme": "acme"}))
    p = tenants.principal(_identity(cn="svc", subject="CN=svc,O=Acme"))
    assert p is not None and p.tenant == "acme"


def test_an_unknown_identity_is_nobody(tmp_path: Path) -> None:
    tenants = load_tenant_map(_map(tmp_path, {"someone": "acme"}))
    assert tenants.principal(_identity(cn="intruder", sans=("intruder.example",))) is None
    # An empty CN never matches an empty-string key.
    assert load_tenant_map(_map(tmp_path, {"x": "acme"})).principal(_identity()) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["not", "an", "object"], "JSON object"),
        ({"id": 7}, "give a tenant name"),
        ({"id": "../etc"}, "tenant name"),
        ({"id": {"tenant": "acme", "scopes": ["root"]}}, "scopes must be"),
    ],
)
def test_a_bad_map_is_refused_naming_the_entry(tmp_path: Path, data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_tenant_map(_map(tmp_path, data))


def test_an_unreadable_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_tenant_map(tmp_path / "missing.json")


def test_a_key_matches_only_the_field_its_form_names(tmp_path: Path) -> None:
    """A client choosing its common name cannot spell another client's URI SAN or subject."""
    tenants = load_tenant_map(_map(tmp_path, {
        "spiffe://x/acme": "acme", "CN=svc,O=Acme": "acme", "cn:reader": "initech", "dns:batch.globex.example": "globex",
    }))  # fmt: skip
    assert tenants.principal(_identity(cn="spiffe://x/acme")) is None
    assert tenants.principal(_identity(cn="CN=svc,O=Acme")) is None
    assert tenants.principal(_identity(cn="batch.globex.example")) is None  # dns: names a SAN only
    assert tenants.principal(_identity(cn="x", sans=("reader",))) is None  # cn: names the CN only
    uri = tenants.principal(_identity(cn="x", sans=("spiffe://x/acme",), uris=("spiffe://x/acme",)))
    assert uri is not None and uri.tenant == "acme"
    dns = tenants.principal(_identity(cn="x", sans=("batch.globex.example",)))
    assert dns is not None and dns.tenant == "globex"
    cn = tenants.principal(_identity(cn="reader"))
    assert cn is not None and cn.tenant == "initech"
    assert len(tenants) == 4
