"""`framewise admin quotas set|show` (clients/admin_quotas.py) against a real SQLite job store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from clients.cli import main
from server.jobs.store.sqlite import SqliteJobStore


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["admin", "quotas", *args])
    out, err = capsys.readouterr()
    return code, out, err


def stored(path: Path, tenant: str) -> dict[str, float]:
    async def read() -> dict[str, float]:
        async with SqliteJobStore(path) as store:
            return await store.tenant_quotas(tenant)

    return asyncio.run(read())


def test_set_stores_overrides_and_show_reports_them_with_their_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "jobs.sqlite3"
    code, out, _ = run(capsys, "set", "--tenant", "acme", "--sessions", "3", "--rate", "vision=2.5", "--burst",
                       "vision=5", "--job-store", str(db), "--json")  # fmt: skip
    assert code == 0
    assert json.loads(out) == {"tenant": "acme", "overrides": {"burst.vision": 5.0, "rate.vision": 2.5, "sessions": 3.0}}
    assert stored(db, "acme") == {"burst.vision": 5.0, "rate.vision": 2.5, "sessions": 3.0}
    # The defaults `show` reports are the server's for the same environment.
    monkeypatch.setenv("FRAMEWISE_QUOTA_JOBS", "9")
    code, out, _ = run(capsys, "show", "--tenant", "acme", "--job-store", str(db), "--json")
    report = json.loads(out)
    assert code == 0
    assert report["quotas"]["sessions"] == {"limit": 3.0, "source": "override"}
    assert report["quotas"]["jobs"] == {"limit": 9.0, "source": "default"}
    assert report["usage"] == {"sessions": 0, "jobs": 0, "artifact_bytes": 0}
    code, out, _ = run(capsys, "set", "--tenant", "acme", "--clear", "rate.vision", "--job-store", str(db))
    assert code == 0 and "burst.vision=5" in out and "rate.vision" not in out
    code, out, _ = run(capsys, "show", "--job-store", str(db), "--json")
    assert json.loads(out) == {"overrides": {"acme": {"burst.vision": 5.0, "sessions": 3.0}}}
    run(capsys, "set", "--tenant", "acme", "--clear", "all", "--job-store", str(db))
    assert stored(db, "acme") == {}


@pytest.mark.parametrize(
    "args",
    [
        ("--rate", "video=5"),  # no such family
        ("--rate", "vision=fast"),
        ("--jobs", "-1"),
        ("--clear", "nope"),
        (),  # nothing to set
    ],
)
def test_bad_input_exits_2_and_stores_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]) -> None:
    db = tmp_path / "jobs.sqlite3"
    code, out, err = run(capsys, "set", "--tenant", "acme", *args, "--job-store", str(db))
    assert code == 2 and err.startswith("error: ") and out == ""
    assert not db.exists() or stored(db, "acme") == {}
