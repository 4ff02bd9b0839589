"""SAMURAI's motion-aware memory bank for one object: which past frames the next frame attends to.

Reference: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py,
SAM2Base._prepare_memory_conditioned_features (samurai_mode branch) with the SAM 2.1 configs
(max_cond_frames_in_attn = -1, use_signed_tpos_enc_to_obj_ptrs and
only_obj_ptrs_in_the_past_for_eval true). For frame t:

Memories (spatial, [64, H, W] each; opaque arrays here):
- every conditioning (prompt) frame, t_pos 0;
- walk back over past non-conditioning frames; a frame is usable if predicted IoU >
  ``memory_bank_iou_threshold``, object score logit > ``memory_bank_obj_score_threshold`` and its kf
  score is None (warm-up, single-mask) or > ``memory_bank_kf_score_threshold``. The previous frame
  t - 1 is appended when it is not usable itself. The last ``num_maskmem - 1`` of that ascending
  list are used, t_pos by ORDER in the list (not by distance): the newest gets num_maskmem - 1, the
  one before num_maskmem - 2, ... (fewer frames leave the low t_pos unused). The attention graph adds
  maskmem_tpos_enc[num_maskmem - 1 - t_pos] (``MemorySelection.tpos_enc_index``).
  Quirk kept: the reference walks range(t - 1, 1, -1) with the prompt on frame 0, so the first tracked
  frame is never found usable (it is still used as "the previous frame" by frame 2).

Object pointers (NOT filtered):
- conditioning frames at or before t, temporal difference t - t_cond;
- the non-conditioning frames among t - 1 ... t - (max_ptrs - 1), difference 1 ... max_ptrs - 1, with
  max_ptrs = min(num_frames, max_obj_ptrs). A prompt frame inside that window is not repeated, so
  there are at most (#prompts + max_obj_ptrs - 1) pointers: 16 with one prompt. The graph divides
  the differences by ``obj_ptr_tdiff_max`` = max_ptrs - 1 before the sine encoding.

Storage stays bounded: only what a later frame can still select is kept, i.e. the last
num_maskmem - 1 entries of (usable frames + the newest frame when it is not usable) and the pointers
of the newest max_obj_ptrs - 1 frames, plus the prompts. Frames must arrive in increasing order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server.sam2.samurai.selection import SamuraiConfig


@dataclass(frozen=True)
class MemorySelection:
    """The memory attention inputs for one frame of one object, in the reference's order."""

    memories: list[np.ndarray]  # conditioning frames first, then oldest -> newest
    tpos: list[int]  # 0 for conditioning frames, 1..num_maskmem-1 by order (newest highest)
    memory_frames: list[int]
    obj_ptrs: list[np.ndarray]  # conditioning frames first, then t - 1, t - 2, ...
    obj_ptr_tdiff: list[int]  # frame_idx - pointer frame (signed; positive for the past)
    obj_ptr_frames: list[int]
    obj_ptr_tdiff_max: int  # normaliser of obj_ptr_tdiff for the sine encoding
    num_maskmem: int = field(default=7, repr=False)

    @property
    def tpos_enc_index(self) -> list[int]:
        """Row of maskmem_tpos_enc each memory gets: num_maskmem - 1 - t_pos (0 for the newest)."""
        return [self.num_maskmem - 1 - t for t in self.tpos]


@dataclass(frozen=True)
class _FrameMemory:
    memory: np.ndarray
    usable: bool


@dataclass(frozen=True)
class BankState:
    """Everything a MemoryBank holds, in its own order: what a session handoff carries from one
    replica to another (server/sam2/samurai/snapshot.py encodes it). The scores a tracked frame came
    with are reduced to the ``usable`` verdict when it is added: that verdict is all that later
    frames read, so it is what is kept."""

    conditioning: list[tuple[int, np.ndarray, np.ndarray]]  # (prompt frame, memory, pointer)
    memories: list[tuple[int, np.ndarray, bool]]  # (tracked frame, memory, usable), ascending
    pointers: list[tuple[int, np.ndarray]]  # (tracked frame, pointer): the pointer ring, ascending
    first_conditioning: int | None
    last_frame: int | None


class MemoryBank:
    """Per-object prompt memories, recent usable memories and the pointer ring."""

    def __init__(self, config: SamuraiConfig | None = None) -> None:
        self.config = config or SamuraiConfig()
        self.reset()

    def reset(self) -> None:
        self._cond: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # prompt frame -> (memory, pointer)
        self._memories: dict[int, _FrameMemory] = {}  # non-conditioning frame -> memory, ascending
        self._ptrs: dict[int, np.ndarray] = {}  # non-conditioning frame -> pointer, ascending
        self._first_cond: int | None = None
        self._last_frame: int | None = None

    # ---- what is stored -------------------------------------------------------------------------

    @property
    def conditioning_frames(self) -> list[int]:
        return list(self._cond)

    @property
    def stored_memory_frames(self) -> list[int]:
        """Non-conditioning frames whose memory is kept (at most num_maskmem - 1)."""
        return list(self._memories)

    @property
    def stored_pointer_frames(self) -> list[int]:
        """Non-conditioning frames whose pointer is kept (at most max_obj_ptrs - 1)."""
        return list(self._ptrs)

    def nbytes(self) -> int:
        """Bytes held: prompt memories and pointers, recent memories, the pointer ring."""
        cond = sum(m.nbytes + p.nbytes for m, p in self._cond.values())
        return cond + sum(m.memory.nbytes for m in self._memories.values()) + sum(p.nbytes for p in self._ptrs.values())

    def is_usable(
        self, frame_idx: int, predicted_iou: float, object_score_logit: float, kf_score: float | None
    ) -> bool:
        """Whether the walk-back accepts this frame as a memory."""
        cfg = self.config
        if self._first_cond is not None:
            first_walkable = self._first_cond + (2 if cfg.memory_walk_skips_first_tracked_frame else 1)
            if frame_idx < first_walkable:
                return False
        return (
            float(predicted_iou) > cfg.memory_bank_iou_threshold
            and float(object_score_logit) > cfg.memory_bank_obj_score_threshold
            and (kf_score is None or float(kf_score) > cfg.memory_bank_kf_score_threshold)
        )

    # ---- handing over -----------------------------------------------------------------------------

    def export(self) -> BankState:
        """The bank's contents (the arrays themselves, not copies: they are never modified)."""
        return BankState(
            conditioning=[(t, m, p) for t, (m, p) in self._cond.items()],
            memories=[(t, m.memory, m.usable) for t, m in self._memories.items()],
            pointers=list(self._ptrs.items()),
            first_conditioning=self._first_cond,
            last_frame=self._last_frame,
        )

    @classmethod
    def restore(cls, config: SamuraiConfig, state: BankState) -> MemoryBank:
        """A bank holding exactly ``state``: it selects for the next frame what the exported one
        would have selected."""
        bank = cls(config)
        bank._cond = {t: (m, p) for t, m, p in state.conditioning}
        bank._memories = {t: _FrameMemory(m, usable) for t, m, usable in state.memories}
        bank._ptrs = dict(state.pointers)
        bank._first_cond = state.first_conditioning
        bank._last_frame = state.last_frame
        return bank

    # ---- adding -----------------------------------------------------------------------------------

    def add_conditioning(self, frame_idx: int, memory: np.ndarray, obj_ptr: np.ndarray) -> None:
        """A prompt frame: always attended to (t_pos 0). Replaces any tracked output on that frame."""
        self._memories.pop(frame_idx, None)
        self._ptrs.pop(frame_idx, None)
        self._cond[frame_idx] = (memory, obj_ptr)
        if self._first_cond is None:
            self._first_cond = frame_idx
        cap = self.config.max_conditioning_frames
        while cap is not None and len(self._cond) > cap:
            # Drop the oldest correction; the first prompt stays (it anchors the object).
            del self._cond[next(t for t in self._cond if t != self._first_cond)]

    def add_frame(
        self,
        frame_idx: int,
        memory: np.ndarray,
        obj_ptr: np.ndarray,
        predicted_iou: float,
        object_score_logit: float,
        kf_score: float | None,
    ) -> None:
        """A tracked (non-conditioning) frame's outputs: its chosen candidate's predicted IoU, the
        object score logit and the kf score (None when the selector gave none)."""
        if not self._cond:
            raise ValueError("add a conditioning (prompt) frame before tracked frames")
        if frame_idx in self._cond:
            raise ValueError(f"frame {frame_idx} is a conditioning frame")
        if self._last_frame is not None and frame_idx <= self._last_frame:
            raise ValueError(f"frames must be added in increasing order: {frame_idx} after {self._last_frame}")
        self._last_frame = frame_idx
        cfg = self.config

        self._ptrs[frame_idx] = obj_ptr
        oldest_ptr = frame_idx - (cfg.max_obj_ptrs - 2)  # the next frame looks back max_obj_ptrs - 1 frames
        for t in [t for t in self._ptrs if t < oldest_ptr]:
            del self._ptrs[t]

        usable = self.is_usable(frame_idx, predicted_iou, object_score_logit, kf_score)
        self._memories[frame_idx] = _FrameMemory(memory, usable)
        # Keep exactly what select_for(frame_idx + 1) would take; later frames need no more (proof:
        # they take the newest usable frames, and at most as many as this keeps).
        keep = set(self._candidate_frames(frame_idx + 1))
        for t in [t for t in self._memories if t not in keep]:
            del self._memories[t]

    # ---- selecting --------------------------------------------------------------------------------

    def _candidate_frames(self, frame_idx: int) -> list[int]:
        """The reference's valid_indices[-(num_maskmem - 1):] (frames may be missing from storage)."""
        frames = [t for t, m in self._memories.items() if m.usable and t < frame_idx]
        if frame_idx - 1 not in frames:
            frames.append(frame_idx - 1)
        slots = self.config.num_maskmem - 1
        return frames[-slots:] if slots > 0 else []

    def select_for(self, frame_idx: int, num_frames: int | None = None) -> MemorySelection:
        """Memories and pointers for tracking ``frame_idx`` (after every frame added so far).

        ``num_frames``: the video length when known (it caps the pointer window, as in the reference);
        None for a stream."""
        if not self._cond:
            raise ValueError("no conditioning (prompt) frame: nothing to track from")
        if self._last_frame is not None and frame_idx <= self._last_frame:
            raise ValueError(f"frame {frame_idx} is not after the last tracked frame {self._last_frame}")
        cfg = self.config

        memories = [m for m, _ in self._cond.values()]
        tpos = [0] * len(self._cond)
        memory_frames = list(self._cond)
        candidates = self._candidate_frames(frame_idx)
        first_tpos = cfg.num_maskmem - len(candidates)
        for offset, t in enumerate(candidates):
            stored = self._memories.get(t)
            if stored is None:  # the previous frame was not tracked (or is a prompt frame): slot unused
                continue
            memories.append(stored.memory)
            tpos.append(first_tpos + offset)
            memory_frames.append(t)

        max_ptrs = min(num_frames, cfg.max_obj_ptrs) if num_frames is not None else cfg.max_obj_ptrs
        pointers = [(t, frame_idx - t, ptr) for t, (_, ptr) in self._cond.items() if t <= frame_idx]
        for t_diff in range(1, max_ptrs):
            t = frame_idx - t_diff
            if t < 0:
                break
            if t in self._ptrs:
                pointers.append((t, t_diff, self._ptrs[t]))
        return MemorySelection(
            memories=memories,
            tpos=tpos,
            memory_frames=memory_frames,
            obj_ptrs=[ptr for _, _, ptr in pointers],
            obj_ptr_tdiff=[t_diff for _, t_diff, _ in pointers],
            obj_ptr_frames=[t for t, _, _ in pointers],
            obj_ptr_tdiff_max=max_ptrs - 1,
            num_maskmem=cfg.num_maskmem,
        )
