"""server/quotas/: token bucket maths, the per-replica rate limiter, limits and their flags, and
the enforcer over a real store (SQLite and PostgreSQL): overrides, session slots, job counts,
storage, and the errors a refusal carries."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from server.errors import QuotaExceeded
from server.jobs.store import JobState, JobStore
from server.jobs.store.postgres import PostgresJobStore
from server.jobs.store.sqlite import SqliteJobStore
from server.quotas.bucket import TokenBucket
from server.quotas.enforcer import QuotaEnforcer
from server.quotas.families import family_of
from server.quotas.limits import FAMILIES, QUOTA_NAMES, QuotaConfig, add_quota_flags, check_quota_value, quota_config_from_args
from server.quotas.rates import RateLimiter
from server.services import OPERATIONS_SERVICE, SERVICES
from tests.conftest import drop_postgres_schema, fresh_postgres_schema, quota_failure


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- token bucket ---------------------------------------------------------------------------------


def test_a_new_bucket_admits_its_burst_then_one_call_per_refill() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token takes 1/rate seconds
    assert bucket.take(0.25) == pytest.approx(0.25)  # half of it has come back
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)


def test_a_bucket_never_holds_more_than_its_capacity() -> None:
    bucket = TokenBucket(rate=10.0, capacity=2, now=0.0)
    assert bucket.full(3600.0)
    assert [bucket.take(3600.0) for _ in range(3)][-1] == pytest.approx(0.1)


def test_a_clock_going_back_adds_no_tokens() -> None:
    bucket = TokenBucket(rate=1.0, capacity=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) > 0  # earlier than the last refill: nothing accrued


def test_retuning_keeps_what_accrued_and_cuts_to_the_new_capacity() -> None:
    bucket = TokenBucket(rate=1.0, capacity=10, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    bucket.retune(rate=4.0, capacity=2, now=1.0)  # 1 token accrued at the old rate
    assert bucket.take(1.0) == 0.0
    assert bucket.take(1.0) == pytest.approx(0.25)  # refilled at the new rate from here


@pytest.mark.parametrize(("rate", "capacity"), [(0.0, 1), (-1.0, 1), (1.0, 0.5)])
def test_a_bucket_that_could_never_admit_is_refused(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity, now=0.0)


# -- rate limiter: a replica's share of the tenant's rate -------------------------------------------


def test_each_tenant_and_family_has_its_own_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    assert [limiter.take("acme", "vision", 1.0, 2) for _ in range(3)][-1] > 0
    assert limiter.take("globex", "vision", 1.0, 2) == 0.0  # acme's use is not globex's
    assert limiter.take("acme", "tracking", 1.0, 2) == 0.0


def test_a_replica_refills_at_its_share_of_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limiter.set_replicas(4)
    # 8 per second with a burst of 8 over 4 replicas: 2 per second and a burst of 2 here.
    assert [limiter.take("acme", "vision", 8.0, 8) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    clock.now += 0.5
    assert limiter.take("acme", "vision", 8.0, 8) == 0.0
    # One replica left: the whole rate and burst become this one's. The bucket takes the new
    # share at its next check and fills up to the larger burst at the larger rate from then on.
    limiter.set_replicas(1)
    clock.now += 10
    assert sum(limiter.take("acme", "vision", 8.0, 8) == 0.0 for _ in range(10)) == 2
    clock.now += 1.0
    assert sum(limiter.take("acme", "vision", 8.0, 8) == 0.0 for _ in range(10)) == 8


def test_a_share_below_one_token_still_admits_one_call() -> None:
    limiter = RateLimiter(FakeClock())
    limiter.set_replicas(10)
    assert limiter.take("acme", "admin", 1.0, 2) == 0.0  # burst 2/10 -> at least 1 token
    assert limiter.take("acme", "admin", 1.0, 2) == pytest.approx(10.0)  # 0.1 token per second here


def test_rate_zero_is_unlimited_and_keeps_no_bucket() -> None:
    limiter = RateLimiter(FakeClock())
    assert all(limiter.take("acme", "vision", 0.0, 0) == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_sweep_forgets_buckets_that_refilled() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limiter.take("acme", "vision", 1.0, 5)
    limiter.take("globex", "vision", 100.0, 5)
    clock.now += 0.5  # globex refilled (100/s); acme has 4.5 of 5
    assert limiter.sweep() == 1
    clock.now += 1
    assert limiter.sweep() == 0


# -- limits and flags ----------------------------------------------------------------------------------


def test_every_rpc_the_server_offers_has_a_family_or_is_deliberately_open() -> None:
    methods = [f"/{s.full_name}/{m.name}" for s in SERVICES.values() for m in s.methods]
    methods += [f"/{OPERATIONS_SERVICE}/{m}" for m in ("GetOperation", "ListOperations", "WaitOperation", "CancelOperation", "DeleteOperation")]
    families = {m: family_of(m) for m in methods}
    assert all(f in FAMILIES for m, f in families.items() if m != "/framewise.v1.InfoService/GetServerInfo"), families
    assert families["/framewise.v1.VisionService/Detect"] == "vision"
    assert families["/framewise.v1.JobService/SegmentVideo"] == "jobs:write"
    assert families["/google.longrunning.Operations/GetOperation"] == "jobs:read"
    # Health checks are never rate-limited: a load balancer's probe must not be refused.
    assert family_of("/grpc.health.v1.Health/Check") is None


def test_overrides_replace_only_the_quotas_they_name() -> None:
    config = QuotaConfig(sessions=8, jobs=16, storage_bytes=100)
    limits = config.limits({"sessions": 2, "rate.vision": 3.5})
    assert (limits.sessions, limits.jobs, limits.storage_bytes) == (2, 16, 100)
    assert limits.rates["vision"] == (3.5, config.rates["vision"][1])
    assert config.limits().sessions == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [("sessions", -1), ("sessions", 1.5), ("burst.vision", 2.5), ("rate.vision", float("nan")), ("nope", 1), ("rate.video", 1)],
)
def test_a_value_no_quota_takes_is_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError):
        check_quota_value(name, value)


def test_flags_and_environment_set_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMEWISE_QUOTA_RATE_JOBS_WRITE", "2.5")
    monkeypatch.setenv("FRAMEWISE_QUOTA_SESSIONS", "3")
    p = argparse.ArgumentParser()
    add_quota_flags(p)
    config = quota_config_from_args(p, p.parse_args(["--quota-jobs", "5", "--quota-burst-vision", "7"]))
    assert (config.sessions, config.jobs) == (3, 5)
    assert config.rates["jobs:write"][0] == 2.5
    assert config.rates["vision"][1] == 7
    assert set(config.defaults()) == set(QUOTA_NAMES)


def test_a_negative_flag_is_a_usage_error() -> None:
    p = argparse.ArgumentParser()
    add_quota_flags(p)
    with pytest.raises(SystemExit):
        quota_config_from_args(p, p.parse_args(["--quota-sessions", "-1"]))


def test_the_default_quotas_bite_before_the_servers_global_bounds() -> None:
    from server.config import JobsConfig, ServerConfig

    config = QuotaConfig()
    assert config.sessions < ServerConfig().max_tracking_sessions
    assert config.jobs < JobsConfig().max_queued


# -- the enforcer over a real store -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, postgres_server) -> AsyncIterator[JobStore]:  # noqa: ANN001
    if request.param == "sqlite":
        s = await SqliteJobStore(tmp_path / "jobs.db").open()
        yield s
        await s.close()
        return
    url, schema = await fresh_postgres_schema(postgres_server)
    s = await PostgresJobStore(url).open()
    yield s
    await s.close()
    await drop_postgres_schema(postgres_server, schema)



async def test_a_stored_override_applies_after_a_refresh(store: JobStore) -> None:
    clock = FakeClock()
    quotas = QuotaEnforcer(store, QuotaConfig(rates={f: (1.0, 1) for f in FAMILIES}), holder="r1", rates=RateLimiter(clock))
    quotas.check_rate("acme", "vision")
    with pytest.raises(QuotaExceeded) as refused:
        quotas.check_rate("acme", "vision")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate.vision" in refused.value.message and "1 vision calls per second" in refused.value.message
    assert quota_failure(refused.value.to_status()) == (["rate.vision"], pytest.approx(1.0))
    await store.set_tenant_quotas("acme", {"rate.vision": 100, "burst.vision": 50})
    await quotas.refresh()
    assert quotas.limits("acme").rates["vision"] == (100.0, 50.0)
    assert quotas.limits("globex").rates["vision"] == (1.0, 1.0)  # the default for everyone else
    clock.now += 1
    quotas.check_rate("acme", "vision")  # the bucket takes the new quota at its next check
    clock.now += 1  # and fills to the new burst at the new rate
    for _ in range(50):
        quotas.check_rate("acme", "vision")
    with pytest.raises(QuotaExceeded):
        quotas.check_rate("acme", "vision")


async def test_session_slots_are_counted_per_tenant_and_freed(store: JobStore) -> None:
    config = QuotaConfig(sessions=2)
    held: set[tuple[str, str]] = set()
    one = QuotaEnforcer(store, config, holder="r1", session_alive=lambda t, k: (t, k) in held)
    two = QuotaEnforcer(store, config, holder="r2")
    for key in ("a", "b"):
        await one.acquire_session("acme", key)
        held.add(("acme", key))
    await one.acquire_session("acme", "a")  # the same session again: not a second slot
    with pytest.raises(QuotaExceeded) as refused:
        await two.acquire_session("acme", "c")  # the limit holds on the other replica too
    assert "holds 2 of its 2 tracking sessions" in refused.value.message
    assert quota_failure(refused.value.to_status())[0] == ["sessions"]
    await two.acquire_session("globex", "c")  # another tenant is not blocked
    # Session "b" ended without a release (expired in the registry): the renewal frees its slot.
    held.discard(("acme", "b"))
    await one.renew_sessions()
    await two.acquire_session("acme", "c")
    await one.release_session("acme", "a")
    await two.acquire_session("acme", "d")
    # r1 still holds nothing for acme; r2 holds c and d. A stopping replica frees all it holds.
    await one.acquire_session("globex", "e")
    await one.stop()
    assert await store.count_quota_leases("sessions", "globex") == 1  # r2's "c" only
    assert await store.count_quota_leases("sessions", "acme") == 2


async def test_jobs_are_counted_queued_and_running_per_tenant(store: JobStore) -> None:
    quotas = QuotaEnforcer(store, QuotaConfig(jobs=2), holder="r1")
    names = []
    for i in range(2):
        async with quotas.job_admission("acme"):
            op, _ = await store.create_operation(kind=1, request=b"r%d" % i, tenant="acme")
            names.append(op.name)
    with pytest.raises(QuotaExceeded) as refused:
        async with quotas.job_admission("acme"):
            pytest.fail("admitted past the quota")
    assert "has 2 jobs queued or running, its quota is 2" in refused.value.message
    async with quotas.job_admission("globex"):
        pass
    await store.update_operation(names[0], state=JobState.SUCCEEDED)
    async with quotas.job_admission("acme"):
        pass


async def test_concurrent_submits_of_one_tenant_do_not_pass_the_quota_together(store: JobStore) -> None:
    quotas = QuotaEnforcer(store, QuotaConfig(jobs=3), holder="r1")

    async def submit(i: int) -> bool:
        try:
            async with quotas.job_admission("acme"):
                await asyncio.sleep(0.01)  # the queue's own checks take time
                await store.create_operation(kind=1, request=b"%d" % i, tenant="acme")
        except QuotaExceeded:
            return False
        return True

    assert sum(await asyncio.gather(*(submit(i) for i in range(10)))) == 3


async def test_storage_is_refused_past_the_quota_with_the_incoming_bytes(store: JobStore) -> None:
    used = {"acme": 900}

    async def storage_used(tenant: str) -> int:
        return used.get(tenant, 0)

    def charged(tenant: str, size: int) -> None:  # what TenantStorage does with an admitted upload
        used[tenant] += size

    quotas = QuotaEnforcer(
        store, QuotaConfig(storage_bytes=1000), holder="r1", storage_used=storage_used, storage_charged=charged
    )
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.check_storage("acme", 101)
    assert "keeps 900 bytes and this upload adds 101 bytes, its quota is 1000" in refused.value.message
    await quotas.check_storage("acme", 60)
    # The admitted upload is charged at once: the next one sees it before any new measurement.
    with pytest.raises(QuotaExceeded):
        await quotas.check_storage("acme", 60)
    await quotas.check_storage("acme", 40)
    await store.set_tenant_quotas("acme", {"storage_bytes": 0})  # 0: unlimited
    await quotas.refresh()
    await quotas.check_storage("acme", 10**12)


async def test_every_refusal_is_reported_by_its_quota_name(store: JobStore) -> None:
    refused: list[str] = []

    async def full(tenant: str) -> int:
        return 10

    config = QuotaConfig(sessions=1, jobs=1, storage_bytes=5, rates={f: (1.0, 1) for f in FAMILIES})
    quotas = QuotaEnforcer(store, config, holder="r1", storage_used=full, refused=refused.append)
    quotas.check_rate("acme", "jobs:write")
    await quotas.acquire_session("acme", "s1")
    await store.create_operation(kind=1, request=b"x", tenant="acme")
    for attempt in (
        lambda: quotas.check_rate("acme", "jobs:write"),
        lambda: quotas.acquire_session("acme", "s2"),
        lambda: quotas.check_storage("acme"),
    ):
        with pytest.raises(QuotaExceeded):
            result = attempt()
            if asyncio.iscoroutine(result):
                await result
    with pytest.raises(QuotaExceeded):  # a submit: storage is checked first
        async with quotas.job_admission("acme"):
            pass
    roomy = QuotaEnforcer(store, config, holder="r1", refused=refused.append)  # no storage limit
    with pytest.raises(QuotaExceeded):
        async with roomy.job_admission("acme"):
            pass
    assert refused == ["rate.jobs:write", "sessions", "storage_bytes", "storage_bytes", "jobs"]


async def test_the_rate_share_follows_the_live_replicas_of_a_shared_store(store: JobStore) -> None:
    from server.quotas.build import build_quota_enforcer

    for replica in ("r1", "r2", "r3"):
        await store.register_replica(replica, f"{replica}:50051")
    quotas = build_quota_enforcer(QuotaConfig(), store, replica_id="r1", session_alive=None, storage=None)
    await quotas.refresh()
    # PostgreSQL is shared by replicas: each takes a third of a tenant's rate. A SQLite store has
    # one replica, whatever it lists.
    assert quotas.rates.replicas == (3 if store.shared_by_replicas else 1)


def test_quotas_apply_to_tenants_not_to_the_anonymous_caller_of_a_server_without_authentication() -> None:
    from server.auth.principal import ANONYMOUS, Principal

    assert not ANONYMOUS.has_quotas  # one team behind loopback: the server's own bounds apply
    for via in ("api_key", "jwt", "mtls"):
        assert Principal(tenant="default", subject="k", scopes=frozenset(), via=via).has_quotas
