"""SAMURAI over the SAM 2 parts: the stateful driver that strings the model calls together
(SAM 2's ``sam2_video_predictor``, one frame at a time, several objects).

Per frame: encode the frame once -> per object: memory attention (not on its prompt frame) ->
mask decoder (all candidates) -> SAMURAI candidate selection (server.sam2.samurai) -> memory
encoder on the chosen mask -> memory bank update -> mask at the frame's resolution as COCO RLE.
The chains encoder -> attention -> decoder run inside Triton as ensembles
(engines/sam2_steps.py): a frame with one tracked object takes two round trips (sam2_frame_step,
memory encoder); with several objects, the frame is encoded once and each object takes
sam2_track_step (or the decoder alone on its prompt frame) and the memory encoder, the objects
concurrently. The tracking maths lives in server.sam2.samurai (pure numpy), the calls themselves
in frame_calls.py, the state between frames in session.py; this module decides what goes where.
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
from server.sam2.frame_calls import INLINE_FRAME_PIXELS, FrameCalls, ResizedFrame, memory_rows, numpy_dtype
from server.sam2.masks import mask_at_resolution
from server.sam2.prompts import ObjectPrompt, check_inside, prompt_tensors
from server.sam2.samurai import CandidateSelector, MemoryBank
from server.sam2.session import TrackedObject, TrackingSession
from server.triton.monitor import TritonMonitor
from server.triton.runner import Held, InferenceRunner, Input, Tensor
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

        def prompt_inputs(object_id: int) -> dict[str, Input]:
            coords, labels = prompt_tensors([prompted.get(object_id)], decoded.width, decoded.height, size)
            return {"point_coords": coords, "point_labels": labels}

        # Every model output stays where Triton wrote it (shared memory when co-located) until
        # the frame is done, and goes to the next model by reference: the feature maps never
        # pass through the orchestrator's hands.
        async with contextlib.AsyncExitStack() as frame_scope:
            def hold(model: str, inputs: dict[str, Input], outputs: list[str], obj: TrackedObject | None = None) -> Awaitable[Held]:
                return frame_scope.enter_async_context(calls.hold(model, inputs, outputs, obj))

            candidates: dict[int, Held] = {}
            if len(ids) == 1 and not prompted:
                # The common case, one object followed: encoder, attention and decoder in one call.
                (object_id,) = ids
                step = await hold(
                    sam2.FRAME_STEP,
                    {"image": frame, **self._memory_inputs(session.objects[object_id], index, calls, "memory_obj_ptrs"),
                     **prompt_inputs(object_id)},
                    ["vision_feat", *_CANDIDATE_OUTPUTS],
                    session.objects[object_id],
                )
                vision_feat = step.tensor("vision_feat")
                candidates[object_id] = step
            else:
                encoded = await hold(sam2.IMAGE_ENCODER, {"image": frame}, ["vision_feat", "high_res_feat0", "high_res_feat1"])
                vision_feat = encoded.tensor("vision_feat")
                features = {"high_res_feat0": encoded.tensor("high_res_feat0"), "high_res_feat1": encoded.tensor("high_res_feat1")}

                async def decode(object_id: int) -> None:
                    if object_id in prompted:  # a prompt frame is decoded without memory
                        inputs = {"image_embed": vision_feat, **features, **prompt_inputs(object_id)}
                        candidates[object_id] = await hold(sam2.MASK_DECODER, inputs, list(_CANDIDATE_OUTPUTS))
                    else:
                        memory = self._memory_inputs(session.objects[object_id], index, calls, "memory_obj_ptrs")
                        inputs = {"vision_feat": vision_feat, **features, **memory, **prompt_inputs(object_id)}
                        candidates[object_id] = await hold(sam2.TRACK_STEP, inputs, list(_CANDIDATE_OUTPUTS), session.objects[object_id])

                await _each(ids, decode)

            chosen = {object_id: self._choose(session.objects[object_id], candidates[object_id], prompted.get(object_id))
                      for object_id in ids}
            memories: dict[int, np.ndarray] = {}

            async def encode_memory(object_id: int) -> None:
                memories[object_id] = await self._encode_memory(vision_feat, chosen[object_id].mask_input, chosen[object_id].score, calls)

            await _each(ids, encode_memory)

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
    def _choose(obj: TrackedObject, held: Held, prompt: ObjectPrompt | None) -> _Choice:
        """SAMURAI's pick among the candidates of one object (batch row 0 of its call)."""
        masks = held.array("masks")
        ious = np.array(held.array("iou_scores"))[0]
        score = float(np.array(held.array("object_score_logits"))[0, 0])
        # Box prompts (and several points) use the single-mask output; everything else the
        # three multimask candidates, among which SAMURAI chooses.
        first = 0 if prompt is not None and prompt.single_mask else 1
        last = 1 if first == 0 else 4
        selection = obj.selector.select(masks[0, first:last], ious[first:last], score)
        index = first + selection.index
        mask_input: Tensor
        if selection.present and prompt is not None:
            mask_logits = np.array(masks[0, index])
            # The reference encodes a prompt frame's memory from the BINARY mask
            # (binarize_mask_from_pts_for_mem_enc, set by build_sam2_video_predictor): logits
            # scaled by a large factor keep their sign through the graph's bilinear upsampling
            # (linear) and saturate its sigmoid to exactly 0 / 1.
            mask_input = (mask_logits * PROMPT_MEMORY_LOGIT_GAIN)[None, None]
        elif selection.present:
            mask_logits = np.array(masks[0, index])
            mask_input = held.block("masks", (0, index))
        else:
            mask_logits = np.full(masks.shape[2:], -1024.0, np.float32)  # SAM 2's NO_OBJ_SCORE
            mask_input = mask_logits[None, None]
        pointer = np.array(held.array("obj_ptrs")[0, index])
        return _Choice(index, float(ious[index]), score, selection.present, selection.kalman_selected,
                       selection.kf_score, mask_logits, mask_input, pointer)

    def _memory_inputs(self, obj: TrackedObject, index: int, calls: FrameCalls, pointers_input: str) -> dict[str, Input]:
        selection = obj.bank.select_for(index)
        attention = calls.contract.specs[sam2.MEMORY_ATTENTION]
        memory_dtype = numpy_dtype(attention.input("memory_feats").datatype)
        memories = [m.astype(memory_dtype, copy=False) for m in selection.memories]
        rows = memory_rows(obj.sent_memories, memories)
        obj.sent_memories = [id(memories[i]) for i in rows]
        tpos = selection.tpos_enc_index
        return {
            "memory_feats": [memories[i] for i in rows],
            # Row of the temporal encoding: 0 for the most recent memory (the reference's
            # num_maskmem - 1 - t_pos); prompt memories get num_maskmem - 1.
            "memory_tpos": np.asarray([tpos[i] for i in rows], dtype=np.int32),
            pointers_input: np.stack(selection.obj_ptrs).astype(np.float32, copy=False),
            "obj_ptr_tdiff": np.asarray(selection.obj_ptr_tdiff, dtype=np.int32),
        }

    async def _encode_memory(self, vision_feat: Tensor, mask_logits: Tensor, score: float, calls: FrameCalls) -> np.ndarray:
        inputs = {
            "vision_feat": vision_feat,
            "mask_logits": mask_logits,
            "object_score_logits": np.array([[score]], dtype=np.float32),
        }
        async with calls.hold(sam2.MEMORY_ENCODER, inputs, ["maskmem_feat"]) as encoded:
            return np.array(encoded.array("maskmem_feat"))  # the bank keeps its own copy


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


async def _each(ids: list[int], call: Callable[[int], Awaitable[None]]) -> None:
    """``call`` for every object, concurrently when there are several (a task group for one
    object would only add task switches)."""
    if len(ids) == 1:
        await call(ids[0])
        return
    try:
        async with asyncio.TaskGroup() as group:
            for object_id in ids:
                group.create_task(call(object_id))
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
