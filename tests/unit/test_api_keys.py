"""API keys (server/auth/keys.py) and their verification against the job store
(server/auth/key_verifier.py). The store methods themselves run on both backends in
tests/unit/test_job_store_contract.py; here a real SQLite store, opened twice where a second replica
or the admin CLI matters."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.auth.key_verifier import ApiKeyVerifier
from server.auth.keys import KEY_PREFIX, generate_key, hash_key, key_state, parse_key, verify_secret
from server.jobs.store.protocol import ApiKeyRecord
from server.jobs.store.sqlite import SqliteJobStore


def test_a_key_is_random_prefixed_and_carries_its_id() -> None:
    keys = [generate_key() for _ in range(50)]
    assert len({k.key for k in keys}) == 50 and len({k.key_id for k in keys}) == 50
    for k in keys:
        assert k.key.startswith(f"{KEY_PREFIX}{k.key_id}_")
        secret = k.key.split("_", 2)[2]
        assert len(secret) == 43  # 32 random bytes, base64url
        parsed = parse_key(k.key)
        assert parsed is not None and parsed.key_id == k.key_id


def test_the_store_gets_a_sha256_never_the_key() -> None:
    k = generate_key()
    assert k.secret_hash == hashlib.sha256(k.key.encode()).hexdigest() == hash_key(k.key)
    assert k.key not in k.secret_hash and k.key.split("_", 2)[2] not in k.secret_hash


@pytest.mark.parametrize(
    "token",
    ["", "fwk_", "fwk_0123456789ab", "fwk_0123456789ab_short", "FWK_0123456789ab_" + "a" * 43,
     "fwk_0123456789aB_" + "a" * 43, "fwk_0123456789ab_" + "a" * 44, "eyJhbGciOi.x.y", "fwk_0123456789ab_" + "a" * 42 + "!"],
)
def test_anything_not_shaped_like_a_key_is_not_parsed(token: str) -> None:
    assert parse_key(token) is None


def _record(key: str, key_id: str, **kw: object) -> ApiKeyRecord:
    base = {"key_id": key_id, "tenant": "acme", "scopes": ("vision",), "secret_hash": hash_key(key),
            "create_time": datetime.now(UTC), "expire_time": None}
    base.update(kw)
    return ApiKeyRecord(**base)  # type: ignore[arg-type]


def test_verify_secret_accepts_only_the_same_key() -> None:
    k = generate_key()
    record = _record(k.key, k.key_id)
    assert verify_secret(k.key, record)
    # One character changed anywhere in the secret is a different key.
    flipped = k.key[:-1] + ("A" if k.key[-1] != "A" else "B")
    assert not verify_secret(flipped, record)
    other = generate_key()
    assert not verify_secret(other.key, record)


def test_key_state_expiry_and_revocation() -> None:
    now = datetime.now(UTC)
    k = generate_key()
    assert key_state(_record(k.key, k.key_id), now) == "ok"
    assert key_state(_record(k.key, k.key_id, expire_time=now + timedelta(seconds=1)), now) == "ok"
    assert key_state(_record(k.key, k.key_id, expire_time=now), now) == "expired"
    assert key_state(_record(k.key, k.key_id, expire_time=now - timedelta(days=1)), now) == "expired"
    # Revoked wins over everything.
    assert key_state(_record(k.key, k.key_id, revoke_time=now, expire_time=now - timedelta(days=1)), now) == "revoked"


async def _new_key(store: SqliteJobStore, *, tenant: str = "acme", scopes=("vision", "jobs:read"), expire_time=None):
    k = generate_key()
    await store.create_api_key(key_id=k.key_id, tenant=tenant, scopes=scopes, secret_hash=k.secret_hash, expire_time=expire_time)
    return k


async def test_the_verifier_admits_a_stored_key_as_its_tenant(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        k = await _new_key(store)
        verifier = ApiKeyVerifier(store)
        check = await verifier.verify(k.key)
        assert check.reason == "ok" and check.principal is not None
        assert (check.principal.tenant, check.principal.subject, check.principal.via) == ("acme", k.key_id, "api_key")
        assert check.principal.scopes == {"vision", "jobs:read"}
        await verifier.close()


async def test_the_verifier_refuses_unknown_wrong_expired_and_revoked_keys(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        verifier = ApiKeyVerifier(store, cache_ttl_s=0)
        good = await _new_key(store)
        assert (await verifier.verify(generate_key().key)).reason == "unknown_key"
        wrong = good.key[: -len("x")] + ("x" if good.key[-1] != "x" else "y")
        check = await verifier.verify(wrong)
        assert check.principal is None and check.reason == "wrong_secret" and check.key_id == good.key_id
        assert (await verifier.verify("not a key")).reason == "malformed"
        old = await _new_key(store, expire_time=datetime.now(UTC) - timedelta(seconds=1))
        assert (await verifier.verify(old.key)).reason == "expired"
        await store.revoke_api_key(good.key_id)
        check = await verifier.verify(good.key)
        assert check.principal is None and check.reason == "revoked"
        await verifier.close()


async def test_a_key_expiring_while_cached_is_refused_at_once(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        verifier = ApiKeyVerifier(store, cache_ttl_s=60)
        k = await _new_key(store, expire_time=datetime.now(UTC) + timedelta(seconds=0.5))
        assert (await verifier.verify(k.key)).reason == "ok"
        await asyncio.sleep(0.6)
        # The record is still cached; expiry is checked on every call against the clock.
        assert (await verifier.verify(k.key)).reason == "expired"
        await verifier.close()


async def test_a_revocation_by_another_process_holds_within_the_cache_ttl(tmp_path: Path) -> None:
    """The admin CLI (another store object on the same file) revokes; this verifier, whose cache
    holds the key as valid, refuses it once the cache TTL has passed, and no later."""
    now = [0.0]
    async with SqliteJobStore(tmp_path / "jobs.db") as store, SqliteJobStore(tmp_path / "jobs.db") as admin:
        verifier = ApiKeyVerifier(store, cache_ttl_s=2.0, clock=lambda: now[0])
        k = await _new_key(store)
        assert (await verifier.verify(k.key)).reason == "ok"
        await admin.revoke_api_key(k.key_id)
        now[0] = 1.9
        assert (await verifier.verify(k.key)).reason == "ok"  # within the documented 2 s
        now[0] = 2.0
        assert (await verifier.verify(k.key)).reason == "revoked"
        await verifier.close()


async def test_without_a_cache_every_call_reads_the_store(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store, SqliteJobStore(tmp_path / "jobs.db") as admin:
        verifier = ApiKeyVerifier(store, cache_ttl_s=0)
        k = await _new_key(store)
        assert (await verifier.verify(k.key)).reason == "ok"
        await admin.revoke_api_key(k.key_id)
        assert (await verifier.verify(k.key)).reason == "revoked"
        await verifier.close()


async def test_invalidate_forgets_a_cached_key_at_once(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        verifier = ApiKeyVerifier(store, cache_ttl_s=60)
        k = await _new_key(store)
        assert (await verifier.verify(k.key)).reason == "ok"
        await store.revoke_api_key(k.key_id)
        verifier.invalidate(k.key_id)
        assert (await verifier.verify(k.key)).reason == "revoked"
        await verifier.close()


class _CountingStore:
    """A real SQLite store that counts get_api_key calls."""

    def __init__(self, store: SqliteJobStore) -> None:
        self.store = store
        self.reads = 0

    async def get_api_key(self, key_id: str):
        self.reads += 1
        await asyncio.sleep(0.01)  # a slower store: concurrent callers overlap
        return await self.store.get_api_key(key_id)

    async def touch_api_key(self, key_id: str) -> None:
        await self.store.touch_api_key(key_id)


async def test_concurrent_calls_with_one_key_read_the_store_once(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        counting = _CountingStore(store)
        verifier = ApiKeyVerifier(counting, cache_ttl_s=2.0)  # type: ignore[arg-type]
        k = await _new_key(store)
        checks = await asyncio.gather(*(verifier.verify(k.key) for _ in range(20)))
        assert all(c.reason == "ok" for c in checks)
        assert counting.reads == 1
        await verifier.close()


async def test_last_use_is_recorded_in_the_background(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        verifier = ApiKeyVerifier(store)
        k = await _new_key(store)
        assert (await store.get_api_key(k.key_id)).last_used_time is None
        await verifier.verify(k.key)
        for _ in range(100):
            if (await store.get_api_key(k.key_id)).last_used_time is not None:
                break
            await asyncio.sleep(0.02)
        assert (await store.get_api_key(k.key_id)).last_used_time is not None
        await verifier.close()


async def test_scopes_the_server_does_not_know_are_dropped(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        k = await _new_key(store, scopes=("vision", "superuser"))
        verifier = ApiKeyVerifier(store)
        check = await verifier.verify(k.key)
        assert check.principal is not None and check.principal.scopes == {"vision"}
        await verifier.close()
