"""The Triton launcher's housekeeping (server/triton/launcher.py), without a Triton: which python-
backend shared-memory regions a start reclaims, and the environment and run directory Triton gets. A real Triton's
regions and stubs: tests/e2e/test_lifecycle.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from server.triton.launcher import (
    BACKEND_REGION_PREFIX,
    RUN_DIR_ENV,
    ManagedTriton,
    TritonDistribution,
    reclaim_backend_regions,
    with_huge_pages,
)


def region(shm: Path, name: str, age_s: float) -> Path:
    path = shm / name
    path.write_bytes(b"\0" * 64)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def fake_proc(root: Path, maps: dict[int, list[Path]]) -> Path:
    for pid, files in maps.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "maps").write_text("".join(
            f"7f00000{i}000-7f00001{i}000 rw-s 00000000 00:1a 1234 {path}\n" for i, path in enumerate(files)))
    (root / "self").mkdir(exist_ok=True)  # not a pid: ignored
    return root


def test_only_old_unmapped_regions_of_our_prefix_are_reclaimed(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    live = region(shm, f"{BACKEND_REGION_PREFIX}live", 600)
    dead = region(shm, f"{BACKEND_REGION_PREFIX}dead", 600)
    young = region(shm, f"{BACKEND_REGION_PREFIX}young", 1)  # its Triton may not have mapped it yet
    deleted = region(shm, f"{BACKEND_REGION_PREFIX}deleted-but-mapped", 600)
    others = region(shm, "triton_python_backend_shm_region_x", 600)  # another Triton's: not ours
    proc = fake_proc(tmp_path / "proc", {41: [live], 42: [Path(f"{deleted} (deleted)")]})
    (proc / "43" / "maps").mkdir(parents=True)  # maps we cannot read (e.g. a sandbox's PID 1) block nothing

    assert reclaim_backend_regions(shm, proc) == [dead.name]
    assert not dead.exists()
    assert live.exists() and young.exists() and deleted.exists() and others.exists()
    assert reclaim_backend_regions(shm, proc) == []


def test_nothing_is_touched_without_a_readable_proc(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    dead = region(shm, f"{BACKEND_REGION_PREFIX}dead", 600)
    assert reclaim_backend_regions(shm, tmp_path / "no-proc") == []
    assert dead.exists()


def test_another_users_region_is_left_alone(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a file of another user needs root")
    shm = tmp_path / "shm"
    shm.mkdir()
    theirs = region(shm, f"{BACKEND_REGION_PREFIX}theirs", 600)
    os.chown(theirs, 12345, 12345)
    os.utime(theirs, (time.time() - 600, time.time() - 600))
    assert reclaim_backend_regions(shm, fake_proc(tmp_path / "proc", {41: []})) == []
    assert theirs.exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        # The caller's own choice wins, either way.
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),
        ("glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2", "glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2"),
    ],
)
def test_triton_gets_malloc_huge_pages_unless_the_caller_chose(given: str, expected: str) -> None:
    assert with_huge_pages(given) == expected


def test_each_start_gets_an_empty_run_directory_named_in_the_environment(tmp_path: Path) -> None:
    """The model instances of one server share files there (which of them are executing); a
    previous server's files must not outlive it."""
    dist = TritonDistribution(tmp_path / "tritonserver", tmp_path / "python", tmp_path / "stub", tmp_path / "libs")
    launcher = ManagedTriton(tmp_path / "repo", tmp_path / "work", distribution=dist)
    env = launcher.environment()
    run_dir = Path(env[RUN_DIR_ENV])
    assert run_dir == launcher.run_dir and run_dir.is_dir() and not any(run_dir.iterdir())
    (run_dir / "framewise-yolov8-1234.instances").write_bytes(b"")
    assert Path(launcher.environment()[RUN_DIR_ENV]) == run_dir and not any(run_dir.iterdir())
