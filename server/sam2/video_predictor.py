"""SAMURAI over the SAM 2 parts: the stateful driver that strings the model calls together
(SAM 2's ``sam2_video_predictor``, one frame at a time, several objects).

Per frame: encode the frame once -> per object: memory attention (not on its prompt frame) ->
mask decoder (all candidates) -> SAMURAI candidate selection (server.sam2.samurai) -> memory
encoder on the chosen mask -> memory bank update -> mask at the frame's resolution as COCO RLE.
The chains encoder -> attention -> decoder run inside Triton as ensembles
(engines/sam2_steps.py): a frame with one tracked object takes two round trips (sam2_frame_step,
memory encoder). With several objects the frame is encoded once, and the per-object parts take
the objects as the rows of batched calls (one object per row, up to
contract.MAX_OBJECTS_PER_CALL a call): the followed objects go through sam2_track_step in calls
whose rows share their memory and pointer counts, objects prompted on this frame through the
decoder alone in calls whose rows share their point count, then every object's memory through
one memory encoder call. So a frame of K objects costs a few calls, not 2K + 1. The tracking
maths lives in server.sam2.samurai (pure numpy), the calls themselves in frame_calls.py, the
state between frames in session.py; this module decides what goes where.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from framewise.v1 import common_pb2
from server.errors import InvalidInput, ServiceError, TooLarge
from server.sam2 import contract as sam2
from server.sam2.contract import Sam2Contract
from server.sam2.frame_calls import INLINE_FRAME_PIXELS, FrameCalls, Repeated, ResizedFrame, memory_rows, numpy_dtype
from server.sam2.masks import mask_at_resolution
from server.sam2.prompts import ObjectPrompt, check_inside, prompt_tensors
from server.sam2.samurai import CandidateSelector, MemoryBank, MemorySelection
from server.sam2.session import TrackedObject, TrackingSession
from server.triton.monitor import TritonMonitor
from server.triton.runner import Held, InferenceRunner, Input, Stacked, Tensor
from server.triton.shm import ShmRef
from server.vision.image_decode import DecodedImage, decode_image
from server.vision.image_header import read_header

# Scale of a prompt frame's mask logits on their way to the memory encoder (see _track): a
# pixel stays non-binary only where |upsampled logit| < ~17.5 / gain.
PROMPT_MEMORY_LOGIT_GAIN = np.float32(1e6)


@dataclass(frozen=True)
class ObjectOutcome:
    object_id: int
    mask: common_pb2.RleMask
    box: tuple[float, float, float, float]
    predicted_iou: float
    present: bool
    object_score: float
    kalman_selected: bool
    candidate_index: int


@dataclass(frozen=True)
class FrameOutcome:
    """What ``VideoPredictor.step`` returns for one frame (the session keeps none of it)."""

    frame_index: int
    objects: list[ObjectOutcome]
    timings_ms: dict[str, float]
    triton_bytes: int


class VideoPredictor:
    """Tracks the objects of a TrackingSession frame by frame (``step``)."""

    def __init__(self, runner: InferenceRunner, monitor: TritonMonitor, *, max_pixels: int, max_objects: int = 16) -> None:
        self.runner = runner
        self.monitor = monitor
        self.max_pixels = max_pixels
        self.max_objects = max_objects
        self._contract: tuple[tuple[int, ...], Sam2Contract] | None = None

    def contract(self) -> Sam2Contract:
        specs = {name: self.monitor.require_ready(name) for name in sam2.TRACKING_MODELS}
        # The monitor hands out new spec objects only when Triton (re)loads a model.
        key = tuple(id(spec) for spec in specs.values())
        if self._contract is None or self._contract[0] != key:
            self._contract = (key, Sam2Contract.from_specs(specs))
        return self._contract[1]

    async def step(
        self,
        session: TrackingSession,
        frame_index: int | None,
        image: common_pb2.Image,
        prompts: list[ObjectPrompt],
        removals: list[int],
        *,
        timeout_s: float | None = None,
    ) -> FrameOutcome:
        """Track one frame. Validates everything before touching the session, so a rejected
        frame leaves the session as it was; a frame that fails later (Triton crash, deadline,
        cancellation) is undone, so the session is again as it was before the frame: the
        client was told to retry, and resuming the session and sending the frame again gives
        what the frame would have given."""
        started = time.perf_counter()
        contract = self.contract()
        if _small_frame(image):
            decoded = decode_image(image, max_pixels=self.max_pixels, field="frame.image")
        else:
            decoded = await asyncio.to_thread(decode_image, image, max_pixels=self.max_pixels, field="frame.image")
        index = self._validate(session, frame_index, decoded, prompts, removals)
        # Resized into the encoder's request itself (shared memory), not into an array first.
        frame = ResizedFrame(decoded.rgb, contract.image_size)
        decode_s = time.perf_counter() - started

        restore = _checkpoint(session)
        try:
            outcome, calls = await self._apply(session, index, decoded, frame, prompts, removals, contract, started, timeout_s)
        except BaseException:
            restore()
            raise
        session.next_frame_index = index + 1
        session.last_active = time.monotonic()
        timings = {"decode": decode_s * 1e3, "triton": calls.triton_s * 1e3, "total": (time.perf_counter() - started) * 1e3}
        timings["postprocess"] = timings["total"] - timings["decode"] - timings["triton"]
        return FrameOutcome(index, outcome, timings, calls.bytes_moved)

    async def _apply(
        self,
        session: TrackingSession,
        index: int,
        decoded: DecodedImage,
        frame: ResizedFrame,
        prompts: list[ObjectPrompt],
        removals: list[int],
        contract: Sam2Contract,
        started: float,
        timeout_s: float | None,
    ) -> tuple[list[ObjectOutcome], FrameCalls]:
        for object_id in removals:
            del session.objects[object_id]
        prompted = {p.object_id: p for p in prompts}
        for prompt in prompts:
            if prompt.object_id not in session.objects:
                session.objects[prompt.object_id] = TrackedObject(
                    prompt.object_id,
                    CandidateSelector(session.config, box_space=(contract.image_size, contract.image_size)),
                    MemoryBank(session.config),
                )
        session.width, session.height = decoded.width, decoded.height

        calls = FrameCalls(self.runner, contract, started, timeout_s)
        return await self._track(session, index, decoded, frame, prompted, contract, calls), calls

    def _validate(
        self,
        session: TrackingSession,
        frame_index: int | None,
        decoded: DecodedImage,
        prompts: list[ObjectPrompt],
        removals: list[int],
    ) -> int:
        index = session.next_frame_index if not frame_index else frame_index
        if index != session.next_frame_index:
            raise InvalidInput(
                f"frame_index {frame_index} is out of order: this session expects {session.next_frame_index} "
                "(send frames in order, or leave frame_index 0 to let the server number them)",
                "frame.frame_index",
            )
        if session.width and (decoded.width, decoded.height) != (session.width, session.height):
            raise InvalidInput(
                f"frame size changed from {session.width}x{session.height} to {decoded.width}x{decoded.height}; "
                "a session tracks one video: open a new session for a different size",
                "frame.image",
            )
        seen: set[int] = set()
        for prompt in prompts:
            if prompt.object_id in seen:
                raise InvalidInput(f"object {prompt.object_id} is prompted twice in one frame", "frame.prompts")
            seen.add(prompt.object_id)
            check_inside(prompt, decoded.width, decoded.height, f"frame.prompts[object_id={prompt.object_id}]")
        if len(set(removals)) != len(removals):
            raise InvalidInput("remove_object_ids lists an object twice", "frame.remove_object_ids")
        for object_id in removals:
            if object_id not in session.objects:
                known = ", ".join(map(str, sorted(session.objects))) or "none"
                raise ServiceError(
                    f"cannot remove object {object_id}: the session tracks {known}",
                    code=grpc.StatusCode.NOT_FOUND,
                )
        remaining = (set(session.objects) - set(removals)) | seen
        if not remaining:
            raise ServiceError(
                "nothing to track: give a box or points for at least one object on this frame",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        if len(remaining) > self.max_objects:
            raise TooLarge(
                f"at most {self.max_objects} objects per session (this frame would have {len(remaining)}); "
                "remove objects or open another session",
                "frame.prompts",
            )
        return index

    async def _track(
        self,
        session: TrackingSession,
        index: int,
        decoded: DecodedImage,
        frame: ResizedFrame,  # the encoder's image input
        prompted: dict[int, ObjectPrompt],
        contract: Sam2Contract,
        calls: FrameCalls,
    ) -> list[ObjectOutcome]:
        size = contract.image_size
        ids = sorted(session.objects)
        prompt_inputs = {object_id: prompt_tensors([prompted.get(object_id)], decoded.width, decoded.height, size)
                         for object_id in ids}
        selections = {object_id: session.objects[object_id].bank.select_for(index)
                      for object_id in ids if object_id not in prompted}

        def prompts_of(group: list[int]) -> dict[str, Input]:
            return {"point_coords": np.concatenate([prompt_inputs[i][0] for i in group]),
                    "point_labels": np.concatenate([prompt_inputs[i][1] for i in group])}

        # Every model output stays where Triton wrote it (shared memory when co-located) until
        # the frame is done, and goes to the next model by reference: the feature maps never
        # pass through the orchestrator's hands.
        async with contextlib.AsyncExitStack() as frame_scope:
            def hold(model: str, inputs: dict[str, Input], outputs: list[str], obj: TrackedObject | None = None) -> Awaitable[Held]:
                return frame_scope.enter_async_context(calls.hold(model, inputs, outputs, obj))

            # object -> (the call that decoded it, its row in that call)
            candidates: dict[int, tuple[Held, int]] = {}
            if len(ids) == 1 and not prompted:
                # The common case, one object followed: encoder, attention and decoder in one call.
                (object_id,) = ids
                obj = session.objects[object_id]
                step = await hold(
                    sam2.FRAME_STEP,
                    {"image": frame, **self._memory_inputs([obj], selections, calls, "memory_obj_ptrs"),
                     **prompts_of(ids)},
                    ["vision_feat", *_CANDIDATE_OUTPUTS],
                    obj,
                )
                vision_feat = step.tensor("vision_feat")
                candidates[object_id] = (step, 0)
            else:
                encoded = await hold(sam2.IMAGE_ENCODER, {"image": frame}, ["vision_feat", "high_res_feat0", "high_res_feat1"])
                vision_feat = encoded.tensor("vision_feat")
                features = {name: encoded.tensor(name) for name in ("vision_feat", "high_res_feat0", "high_res_feat1")}

                def frame_features(rows: int, embed_name: str) -> dict[str, Input]:
                    return {embed_name if name == "vision_feat" else name: _once_per_row(tensor, rows)
                            for name, tensor in features.items()}

                # The frame's objects go to the parts as the rows of batched calls: a prompted
                # object to the decoder alone (a prompt frame is decoded without memory), rows
                # sharing their point count; the others through attention and decoder
                # (sam2_track_step), rows sharing their memory and pointer counts.
                fresh = _batches([i for i in ids if i in prompted], lambda i: prompt_inputs[i][0].shape[1],
                                 contract.rows_per_call(sam2.MASK_DECODER))
                followed = _batches([i for i in ids if i not in prompted],
                                    lambda i: (len(selections[i].memories), len(selections[i].obj_ptrs)),
                                    contract.rows_per_call(sam2.TRACK_STEP))

                async def decode(group: list[int]) -> None:
                    inputs = {**frame_features(len(group), "image_embed"), **prompts_of(group)}
                    held = await hold(sam2.MASK_DECODER, inputs, list(_CANDIDATE_OUTPUTS))
                    candidates.update({object_id: (held, row) for row, object_id in enumerate(group)})

                async def track(group: list[int]) -> None:
                    objects = [session.objects[i] for i in group]
                    inputs = {**frame_features(len(group), "vision_feat"),
                              **self._memory_inputs(objects, selections, calls, "memory_obj_ptrs"), **prompts_of(group)}
                    held = await hold(sam2.TRACK_STEP, inputs, list(_CANDIDATE_OUTPUTS), objects[0])
                    candidates.update({object_id: (held, row) for row, object_id in enumerate(group)})

                await _each([*((decode, g) for g in fresh), *((track, g) for g in followed)])

            chosen = {object_id: self._choose(session.objects[object_id], *candidates[object_id], prompted.get(object_id))
                      for object_id in ids}
            memories: dict[int, np.ndarray] = {}

            async def encode_memories(group: list[int]) -> None:
                encoded = await self._encode_memories(vision_feat, [chosen[i] for i in group], calls)
                memories.update(zip(group, encoded))

            await _each([(encode_memories, group)
                         for group in _batches(ids, lambda i: 0, contract.rows_per_call(sam2.MEMORY_ENCODER))])

            outcomes = []
            for object_id in ids:
                choice = chosen[object_id]
                if decoded.width * decoded.height <= INLINE_FRAME_PIXELS:
                    mask, box = mask_at_resolution(choice.mask_logits, decoded.width, decoded.height)
                else:
                    mask, box = await asyncio.to_thread(mask_at_resolution, choice.mask_logits, decoded.width, decoded.height)
                outcomes.append(
                    ObjectOutcome(
                        object_id, mask, box, choice.iou, choice.present, choice.score, choice.kalman_selected, choice.index
                    )
                )
            # The banks change last, all at once, with nothing awaited in between: a frame that
            # fails or is cancelled before this point leaves them as they were (see step).
            for object_id in ids:
                obj, choice = session.objects[object_id], chosen[object_id]
                if object_id in prompted:
                    obj.bank.add_conditioning(index, memories[object_id], choice.pointer)
                else:
                    obj.bank.add_frame(index, memories[object_id], choice.pointer, choice.iou, choice.score, choice.kf_score)
        return outcomes

    @staticmethod
    def _choose(obj: TrackedObject, held: Held, row: int, prompt: ObjectPrompt | None) -> _Choice:
        """SAMURAI's pick among the candidates of one object (batch row ``row`` of its call)."""
        masks = held.array("masks")
        ious = np.array(held.array("iou_scores"))[row]
        score = float(np.array(held.array("object_score_logits"))[row, 0])
        # Box prompts (and several points) use the single-mask output; everything else the
        # three multimask candidates, among which SAMURAI chooses.
        first = 0 if prompt is not None and prompt.single_mask else 1
        last = 1 if first == 0 else 4
        selection = obj.selector.select(masks[row, first:last], ious[first:last], score)
        index = first + selection.index
        mask_input: Tensor
        if selection.present and prompt is not None:
            mask_logits = np.array(masks[row, index])
            # The reference encodes a prompt frame's memory from the BINARY mask
            # (binarize_mask_from_pts_for_mem_enc, set by build_sam2_video_predictor): logits
            # scaled by a large factor keep their sign through the graph's bilinear upsampling
            # (linear) and saturate its sigmoid to exactly 0 / 1.
            mask_input = (mask_logits * PROMPT_MEMORY_LOGIT_GAIN)[None, None]
        elif selection.present:
            mask_logits = np.array(masks[row, index])
            mask_input = held.block("masks", (row, index))
        else:
            mask_logits = np.full(masks.shape[2:], -1024.0, np.float32)  # SAM 2's NO_OBJ_SCORE
            mask_input = mask_logits[None, None]
        pointer = np.array(held.array("obj_ptrs")[row, index])
        return _Choice(index, float(ious[index]), score, selection.present, selection.kalman_selected,
                       selection.kf_score, mask_logits, mask_input, pointer)

    def _memory_inputs(self, objects: list[TrackedObject], selections: dict[int, MemorySelection], calls: FrameCalls,
                       pointers_input: str) -> dict[str, Input]:
        """The attention's memory inputs for ``objects``, one per row (their selections share the
        memory and pointer counts)."""
        attention = calls.contract.specs[sam2.MEMORY_ATTENTION]
        memory_dtype = numpy_dtype(attention.input("memory_feats").datatype)
        parts: list[np.ndarray] = []
        tpos, pointers, tdiff = [], [], []
        for obj in objects:
            selection = selections[obj.object_id]
            memories = [m.astype(memory_dtype, copy=False) for m in selection.memories]
            rows = memory_rows(obj.sent_memories, memories)
            obj.sent_memories = [id(memories[i]) for i in rows]
            parts += [memories[i] for i in rows]
            # Row of the temporal encoding: 0 for the most recent memory (the reference's
            # num_maskmem - 1 - t_pos); prompt memories get num_maskmem - 1.
            tpos.append([selection.tpos_enc_index[i] for i in rows])
            pointers.append(np.stack(selection.obj_ptrs).astype(np.float32, copy=False))
            tdiff.append(selection.obj_ptr_tdiff)
        return {
            "memory_feats": Stacked(parts, (len(objects), len(parts) // len(objects))),
            "memory_tpos": np.asarray(tpos, dtype=np.int32),
            pointers_input: np.stack(pointers),
            "obj_ptr_tdiff": np.asarray(tdiff, dtype=np.int32),
        }

    async def _encode_memories(self, vision_feat: Tensor, chosen: list[_Choice], calls: FrameCalls) -> list[np.ndarray]:
        """The memory encoder on each object's chosen mask, one object per row of one call."""
        masks = [c.mask_input for c in chosen]
        inputs: dict[str, Input] = {
            "vision_feat": _once_per_row(vision_feat, len(chosen)),
            # One object: its mask by reference (the decoder's output, where Triton wrote it).
            "mask_logits": masks[0] if len(masks) == 1 else Stacked([_array(m) for m in masks], (len(masks),)),
            "object_score_logits": np.array([[c.score] for c in chosen], dtype=np.float32),
        }
        async with calls.hold(sam2.MEMORY_ENCODER, inputs, ["maskmem_feat"]) as encoded:
            feats = encoded.array("maskmem_feat")
            return [np.array(feats[row:row + 1]) for row in range(len(chosen))]  # the banks keep their own copies


def _once_per_row(tensor: Tensor, rows: int) -> Input:
    """The frame's ``tensor`` [1, ...] for a call of ``rows`` objects: by reference for one."""
    return tensor if rows == 1 else Repeated(tensor, rows)


def _array(tensor: Tensor) -> np.ndarray:
    """A tensor as numpy (a view of shared memory: valid while its call is held)."""
    return tensor.array() if isinstance(tensor, ShmRef) else tensor


def _batches(ids: list[int], key: Callable[[int], object], rows: int) -> list[list[int]]:
    """``ids`` in groups of equal ``key`` (the shapes the rows of one call must share), each cut
    into calls of at most ``rows`` objects."""
    groups: dict[object, list[int]] = {}
    for object_id in ids:
        groups.setdefault(key(object_id), []).append(object_id)
    return [members[i:i + rows] for members in groups.values() for i in range(0, len(members), rows)]


def _checkpoint(session: TrackingSession) -> Callable[[], None]:
    """What a frame may change before its memory banks are updated (the last step of a frame):
    the objects (removed, added), the frame size, each object's Kalman state and its slot hints.
    Returns the function that puts them back."""
    objects = dict(session.objects)
    size = (session.width, session.height)
    states = {
        object_id: (obj.selector.mean, obj.selector.covariance, obj.selector.stable_frames, list(obj.sent_memories), dict(obj.slots))
        for object_id, obj in objects.items()
    }

    def restore() -> None:
        session.objects.clear()
        session.objects.update(objects)
        session.width, session.height = size
        for object_id, (mean, covariance, stable_frames, sent, slots) in states.items():
            obj = objects[object_id]
            obj.selector.mean, obj.selector.covariance, obj.selector.stable_frames = mean, covariance, stable_frames
            obj.sent_memories, obj.slots = sent, slots

    return restore


_CANDIDATE_OUTPUTS = ("masks", "iou_scores", "obj_ptrs", "object_score_logits")


def _small_frame(image: common_pb2.Image) -> bool:
    """Whether the frame is small enough (by its header, <= INLINE_FRAME_PIXELS) to decode on the
    event loop: a 360x240 JPEG takes about 0.2 ms, about what the thread hop costs under load."""
    if image.WhichOneof("source") == "raw":
        width, height = image.raw.width, image.raw.height
    else:
        header = read_header(image.encoded)
        if header is None or header.width is None or header.height is None:
            return False  # decode_image in a thread reports what is wrong with it
        width, height = header.width, header.height
    return 0 < width * height <= INLINE_FRAME_PIXELS


async def _each(calls: list[tuple[Callable[[list[int]], Awaitable[None]], list[int]]]) -> None:
    """Each (function, group) call, concurrently when there are several (a task group for one
    call would only add task switches)."""
    if len(calls) == 1:
        call, group = calls[0]
        await call(group)
        return
    try:
        async with asyncio.TaskGroup() as tasks:
            for call, group in calls:
                tasks.create_task(call(group))
    except BaseExceptionGroup as failures:
        # The first failure as itself (an Unavailable or DeadlineExceeded the servicer maps to
        # its status), not wrapped in a group the error mapping would call INTERNAL.
        raise failures.exceptions[0] from None


@dataclass(frozen=True)
class _Choice:
    index: int  # candidate index among the decoder's 4
    iou: float
    score: float  # object score logit
    present: bool
    kalman_selected: bool
    kf_score: float | None
    mask_logits: np.ndarray  # low-res logits of the chosen candidate (NO_OBJ_SCORE when absent)
    mask_input: Tensor  # what the memory encoder gets for it
    pointer: np.ndarray
