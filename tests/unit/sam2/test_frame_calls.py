"""The tensors of a frame's Triton calls (server/sam2/frame_calls.py), in process: the stable row
order of the memories; the calls themselves against a real Triton are tests/e2e/test_tracking.py
and tests/e2e/test_runner.py."""

from __future__ import annotations

import numpy as np

from server.sam2.frame_calls import memory_rows


def test_memory_rows_keep_each_memory_where_it_was_sent() -> None:
    """The stable order the video predictor sends memories in: a memory keeps its row while it is
    selected, a new one takes the row freed by the one that left, and every memory is sent exactly
    once."""
    m = [np.full(1, k) for k in range(9)]
    assert memory_rows([], m[:3]) == [0, 1, 2]
    sent = [id(x) for x in (m[0], m[1], m[2], m[3])]
    # m[1] leaves, m[4] arrives (the bank's order: prompt, then oldest -> newest).
    current = [m[0], m[2], m[3], m[4]]
    rows = memory_rows(sent, current)
    assert [current[i] for i in rows] == [m[0], m[4], m[2], m[3]]
    # Fewer memories than rows sent: those beyond the end move into the free rows.
    rows = memory_rows(sent, [m[0], m[3]])
    assert sorted(rows) == [0, 1] and [m[0], m[3]][rows[0]] is m[0]
    # More memories than before: the new ones take the new rows.
    rows = memory_rows([id(m[0])], [m[0], m[5], m[6]])
    assert rows == [0, 1, 2]
