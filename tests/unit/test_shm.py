"""Shared-memory slot layout, without Triton: which models can use slots, and their shapes; and
the reclaiming of regions a killed process left behind."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from server.triton.model_spec import TensorSpec
from server.triton.shm import SHM_DIR, RegionOwner, ShmSlotPool, reclaim_orphaned_regions
from tests.conftest import REPO

IMAGE = TensorSpec("images", "UINT8", (-1, 640, 640, 3))
HEAD = TensorSpec("output0", "FP32", (-1, 84, 8400))
MEMORIES = TensorSpec("memory_feats", "FP16", (-1, 64, 64, 64))  # a non-batching model: -1 is N


def test_batching_models_get_slots_of_one() -> None:
    assert ShmSlotPool.supports((IMAGE, HEAD), batched=True)
    pool = ShmSlotPool("yolov8", (IMAGE,), (HEAD,), 2, batched=True)
    try:
        slot = pool.acquire()
        assert slot is not None and slot.inputs["images"].shape == (1, 640, 640, 3)
        assert slot.outputs["output0"].view().dtype == np.float32
        assert pool.fits({"images": np.zeros((1, 640, 640, 3), np.uint8)})
        assert not pool.fits({"images": np.zeros((2, 640, 640, 3), np.uint8)})  # a batch of 2 goes over gRPC
        assert pool.acquire() is not None and pool.acquire() is None  # 2 slots
    finally:
        pool.close()
    assert not Path(f"/dev/shm/{pool.region}").exists()


def test_a_dynamic_first_dimension_of_a_non_batching_model_is_not_a_batch() -> None:
    # memory attention takes N memories with max_batch_size 0: without a limit no slot holds them.
    assert not ShmSlotPool.supports((MEMORIES,), batched=False)
    assert ShmSlotPool.supports((TensorSpec("vision_feat", "FP32", (1, 256, 64, 64)),), batched=False)


def test_dynamic_dimensions_get_room_for_their_limit() -> None:
    limits = {"memory_feats": (7, 64, 8, 8)}
    small = TensorSpec("memory_feats", "FP16", (-1, 64, 8, 8))
    assert ShmSlotPool.supports((small,), batched=False, max_shapes=limits)
    pool = ShmSlotPool("sam2_memory_attention", (small,), (), 1, batched=False, max_shapes=limits)
    try:
        three = np.arange(3 * 64 * 8 * 8, dtype=np.float16).reshape(3, 64, 8, 8)
        assert pool.fits({"memory_feats": three})
        assert not pool.fits({"memory_feats": np.zeros((8, 64, 8, 8), np.float16)})  # over the limit: gRPC
        assert not pool.fits({"memory_feats": three.astype(np.float32)})  # wrong dtype
        slot = pool.acquire()
        tensor = slot.inputs["memory_feats"]
        tensor.view(three.shape)[...] = three
        np.testing.assert_array_equal(tensor.view(three.shape), three)
        assert tensor.nbytes_for(three.shape) == three.nbytes < tensor.capacity
    finally:
        pool.close()


# A process that makes a real region the way the orchestrator does, says its name and waits.
_REGION_OWNER = """
import signal, sys, time
from server.triton.model_spec import TensorSpec
from server.triton.shm import ShmSlotPool
pool = ShmSlotPool("yolov8", (TensorSpec("images", "UINT8", (-1, 64, 64, 3)),), (), 1, batched=True)
signal.signal(signal.SIGTERM, lambda *_: (pool.close(), sys.exit(0)))
print(pool.region, flush=True)
time.sleep(600)
"""


def _start_region_owner() -> tuple[subprocess.Popen, str]:
    # A session of its own, so that the kill below takes multiprocessing's resource tracker
    # with it, as a container or process-group kill does (the tracker would unlink the region).
    child = subprocess.Popen(
        [sys.executable, "-c", _REGION_OWNER], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def test_regions_of_killed_processes_are_reclaimed_and_live_ones_kept() -> None:
    killed, dead_region = _start_region_owner()
    alive, live_region = _start_region_owner()
    own = ShmSlotPool("yolov8", (IMAGE,), (HEAD,), 1, batched=True)
    try:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert (SHM_DIR / dead_region).exists(), "kill -9 leaves the region behind"

        reclaimed = reclaim_orphaned_regions()

        assert dead_region in reclaimed and not (SHM_DIR / dead_region).exists()
        assert (SHM_DIR / live_region).exists() and (SHM_DIR / own.region).exists()
        assert live_region not in reclaimed and own.region not in reclaimed
    finally:
        own.close()
        os.killpg(alive.pid, signal.SIGTERM)
        alive.wait(timeout=30)
        (SHM_DIR / dead_region).unlink(missing_ok=True)


def test_a_reused_pid_does_not_keep_a_dead_owners_region(tmp_path: Path) -> None:
    """The owner's start time is part of the name: a new process that got the dead owner's
    PID (here: this very process, with another start time) does not keep the region alive."""
    me = RegionOwner.current()
    assert me is not None
    ours = tmp_path / f"framewise-yolov8-{me.tag}-0123abcd"
    reused = tmp_path / f"framewise-yolov8-{me.pid_namespace}.{me.pid}.{me.start_ticks + 1}-0123abcd"
    other_namespace = tmp_path / f"framewise-yolov8-{me.pid_namespace + 1}.999999.1-0123abcd"
    not_ours = tmp_path / "triton_python_backend_shm_region_1"
    for path in (ours, reused, other_namespace, not_ours):
        path.write_bytes(b"x")

    assert reclaim_orphaned_regions(tmp_path) == [reused.name]
    assert ours.exists() and other_namespace.exists() and not_ours.exists() and not reused.exists()


def test_idle_slots_give_their_pages_back_and_forget_their_rows() -> None:
    # 1,000,000-byte slots: slot 1 starts inside a page of slot 0, so that page must stay.
    tensor = TensorSpec("rows", "UINT8", (-1, 1000, 1000))
    pool = ShmSlotPool("test_idle", (tensor,), (), 2, batched=True)
    try:
        first, second = pool.acquire(), pool.acquire()
        assert first is not None and second is not None
        first.inputs["rows"].view()[...] = 7
        second.inputs["rows"].view()[...] = 9
        first.written["rows"] = {0: lambda: None}  # as if it held a stacked row
        before = pool.allocated_bytes()
        assert before >= 2_000_000

        pool.release(first, now=100.0)
        assert pool.next_idle_release_s(30.0, now=120.0) == 10.0
        assert pool.release_idle_pages(30.0, now=120.0) == 0  # not idle long enough
        released = pool.release_idle_pages(30.0, now=130.0)
        assert 0 < released <= 1_000_000 and released % mmap.PAGESIZE == 0
        assert before - pool.allocated_bytes() == released
        assert first.written == {}, "a slot whose pages went back holds no rows"
        rows = first.inputs["rows"].view().reshape(-1)
        assert not rows[: released].any() and (rows[released:] == 7).all()  # only whole pages went
        assert (second.inputs["rows"].view() == 9).all(), "the slot in use next to it is untouched"
        assert pool.release_idle_pages(30.0, now=200.0) == 0 and pool.next_idle_release_s(30.0, now=200.0) is None

        # Used again, it is given back again once idle; the slot in use never is.
        again = pool.acquire(prefer=first.index)
        assert again is first and pool.next_idle_release_s(30.0, now=300.0) is None
        again.inputs["rows"].view()[...] = 1
        pool.release(again, now=300.0)
        assert pool.release_idle_pages(30.0, now=330.0) == released
        assert (second.inputs["rows"].view() == 9).all()
    finally:
        pool.close()
