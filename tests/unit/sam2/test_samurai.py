"""The SAMURAI package as a whole (server/sam2/samurai): the candidate selector and the memory
bank together on a moving object, and that importing it pulls in no heavy dependency."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from server.sam2.samurai import CandidateSelector, MemoryBank
from tests.unit.sam2.test_samurai_boxes import EMPTY
from tests.unit.sam2.test_samurai_memory_bank import mem, ptr


def test_selector_and_bank_together_on_a_moving_object():
    """200 frames of a box moving right 2 px / frame; from frame 20 a same-sized distractor 300 px
    away gets the higher predicted IoU every 10th frame. The motion term keeps the tracked box
    (track ~ 0.25 * ~1 + 0.75 * 0.8 = 0.85 > distractor 0.25 * 0 + 0.75 * 0.85 = 0.64); nothing grows."""
    sel, bank = CandidateSelector(), MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    distractor_wins = 0
    for f in range(1, 201):
        x = 100.0 + 2.0 * f
        track = [x, 300.0, x + 80.0, 380.0]
        distractor = [x + 300.0, 300.0, x + 380.0, 380.0]
        ious = np.array([0.8, 0.85, 0.2]) if f % 10 == 0 and f >= 20 else np.array([0.9, 0.3, 0.2])
        s = sel.select_boxes(np.array([track, distractor, EMPTY]), ious, 4.0)
        if s.index == 1:
            distractor_wins += 1
        if f > 15:
            assert s.phase == "stable" and s.index == 0 and s.kf_score > 0.9
        m = bank.select_for(f)
        assert len(m.memories) <= 7 and len(m.obj_ptrs) <= 16
        bank.add_frame(f, mem(f), ptr(f), s.predicted_iou, s.object_score_logit, s.kf_score)
    assert distractor_wins == 0
    assert sel.mean[4] == pytest.approx(2.0, abs=1e-3)


def test_samurai_imports_no_heavy_dependencies():
    code = (
        "import sys, server.sam2.samurai, server.sam2.samurai.snapshot; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc', 'tritonclient', 'scipy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
