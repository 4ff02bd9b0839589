"""SAMURAI over the SAM 2 parts: the stateful driver that strings the model calls together.

Per frame (like sam2_video_predictor, one frame at a time, several objects):
  encode the frame once -> per object: memory attention (not on its prompt frame) -> one batched
  mask-decoder call for all objects -> SAMURAI candidate selection (server.tracking) -> memory
  encoder on the chosen mask -> memory bank update -> mask at the frame's resolution as COCO RLE.
The tracking maths lives in server.tracking (pure numpy); this module only moves tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import cv2
import grpc
import numpy as np

from framewise.v1 import common_pb2
from server.errors import InvalidInput, ServiceError, TooLarge
from server.health import TritonMonitor
from server.pipelines import sam2_contract as sam2
from server.pipelines.prompts import ObjectPrompt, check_inside, prompt_tensors
from server.pipelines.sam2_contract import Sam2Contract
from server.triton.runner import Held, InferenceRunner, Input, Tensor
from server.triton.shm import ShmRef
from server.tracking import CandidateSelector, MemoryBank, SamuraiConfig
from server.vision.masks import mask_at_resolution
from server.vision.image_decode import DecodedImage, decode_image



# Scale of a prompt frame's mask logits on their way to the memory encoder (see _track): a
# pixel stays non-binary only where |upsampled logit| < ~17.5 / gain.
PROMPT_MEMORY_LOGIT_GAIN = np.float32(1e6)


@dataclass
class TrackedObject:
    object_id: int
    selector: CandidateSelector
    bank: MemoryBank


@dataclass
class TrackingSession:
    """Everything one video's tracking needs between frames."""

    config: SamuraiConfig
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    width: int = 0
    height: int = 0
    next_frame_index: int = 0
    objects: dict[int, TrackedObject] = field(default_factory=dict)
    last_active: float = field(default_factory=time.monotonic)
    # One stream at a time drives a session.
    attached: bool = False
    # Set when a frame failed after the session's state started to change (Triton error,
    # deadline, cancellation mid-frame): the objects may disagree about the last frame, so the
    # session cannot be resumed.
    broken: str = ""

    def memory_bytes(self) -> int:
        return sum(o.bank.nbytes() for o in self.objects.values())


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
    frame_index: int
    objects: list[ObjectOutcome]
    timings_ms: dict[str, float]
    triton_bytes: int


class TrackingEngine:
    def __init__(self, runner: InferenceRunner, monitor: TritonMonitor, *, max_pixels: int, max_objects: int = 16) -> None:
        self.runner = runner
        self.monitor = monitor
        self.max_pixels = max_pixels
        self.max_objects = max_objects
        self._contract: tuple[tuple[int, ...], Sam2Contract] | None = None

    def contract(self) -> Sam2Contract:
        specs = {name: self.monitor.require_ready(name) for name in sam2.MODELS}
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
        frame leaves the session as it was; a frame that fails later (Triton error, deadline,
        cancellation) marks the session broken, because its objects may then disagree about
        which frame they have seen."""
        started = time.perf_counter()
        contract = self.contract()
        decoded = await asyncio.to_thread(decode_image, image, max_pixels=self.max_pixels, field="frame.image")
        index = self._validate(session, frame_index, decoded, prompts, removals)
        decode_s = time.perf_counter() - started

        try:
            outcome, calls = await self._apply(session, index, decoded, prompts, removals, contract, started, timeout_s)
        except BaseException as exc:
            session.broken = f"frame {index} failed half-way ({type(exc).__name__}: {exc})"
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
        prompts: list[ObjectPrompt],
        removals: list[int],
        contract: Sam2Contract,
        started: float,
        timeout_s: float | None,
    ) -> tuple[list[ObjectOutcome], _Calls]:
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

        calls = _Calls(self.runner, contract, started, timeout_s)
        return await self._track(session, index, decoded, prompted, contract, calls), calls

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
        prompted: dict[int, ObjectPrompt],
        contract: Sam2Contract,
        calls: _Calls,
    ) -> list[ObjectOutcome]:
        size = contract.image_size
        frame = await asyncio.to_thread(cv2.resize, decoded.rgb, (size, size), interpolation=cv2.INTER_LINEAR)
        ids = sorted(session.objects)
        # Every model output stays where Triton wrote it (shared memory when co-located) until
        # the frame is done, and goes to the next model by reference: the feature maps never
        # pass through the orchestrator's hands.
        async with contextlib.AsyncExitStack() as frame_scope:
            encoded = await frame_scope.enter_async_context(
                calls.hold(sam2.IMAGE_ENCODER, {"image": frame[None]}, ["vision_feat", "high_res_feat0", "high_res_feat1"])
            )
            vision_feat = encoded.tensor("vision_feat")
            embeds: list[Tensor] = []
            for object_id in ids:
                if object_id in prompted:
                    embeds.append(vision_feat)  # a prompt frame is decoded without memory
                else:
                    attended = await frame_scope.enter_async_context(
                        self._attend(session.objects[object_id], index, vision_feat, calls)
                    )
                    embeds.append(attended.tensor("conditioned_feat"))
            coords, labels = prompt_tensors([prompted.get(i) for i in ids], decoded.width, decoded.height, size)
            decoder_inputs = _decoder_inputs(embeds, encoded, coords, labels)
            decoded_masks = await frame_scope.enter_async_context(
                calls.hold(sam2.MASK_DECODER, decoder_inputs, ["masks", "iou_scores", "obj_ptrs", "object_score_logits"])
            )
            masks = decoded_masks.array("masks")
            ious = np.array(decoded_masks.array("iou_scores"))
            ptrs = decoded_masks.array("obj_ptrs")
            scores = np.array(decoded_masks.array("object_score_logits"))

            outcomes = []
            for b, object_id in enumerate(ids):
                obj = session.objects[object_id]
                prompt = prompted.get(object_id)
                # Box prompts (and several points) use the single-mask output; everything else
                # the three multimask candidates, among which SAMURAI chooses.
                first = 0 if prompt is not None and prompt.single_mask else 1
                last = 1 if first == 0 else 4
                score = float(scores[b, 0])
                selection = obj.selector.select(masks[b, first:last], ious[b, first:last], score)
                chosen = first + selection.index
                if selection.present and prompt is not None:
                    mask_logits = np.array(masks[b, chosen])
                    # The reference encodes a prompt frame's memory from the BINARY mask
                    # (binarize_mask_from_pts_for_mem_enc, set by build_sam2_video_predictor):
                    # logits scaled by a large factor keep their sign through the graph's bilinear
                    # upsampling (linear) and saturate its sigmoid to exactly 0 / 1.
                    mask_input: Tensor = (mask_logits * PROMPT_MEMORY_LOGIT_GAIN)[None, None]
                elif selection.present:
                    mask_logits = np.array(masks[b, chosen])
                    mask_input = decoded_masks.block("masks", (b, chosen))
                else:
                    mask_logits = np.full(masks.shape[2:], -1024.0, np.float32)  # SAM 2's NO_OBJ_SCORE
                    mask_input = mask_logits[None, None]
                memory = await self._encode_memory(vision_feat, mask_input, score, calls)
                pointer = np.array(ptrs[b, chosen])
                if prompt is not None:
                    obj.bank.add_conditioning(index, memory, pointer)
                else:
                    obj.bank.add_frame(index, memory, pointer, float(ious[b, chosen]), score, selection.kf_score)
                mask, box = await asyncio.to_thread(mask_at_resolution, mask_logits, decoded.width, decoded.height)
                outcomes.append(
                    ObjectOutcome(
                        object_id, mask, box, float(ious[b, chosen]), selection.present, score, selection.kalman_selected, chosen
                    )
                )
        return outcomes

    def _attend(
        self, obj: TrackedObject, index: int, vision_feat: Tensor, calls: _Calls
    ) -> contextlib.AbstractAsyncContextManager[Held]:
        selection = obj.bank.select_for(index)
        attention = calls.contract.specs[sam2.MEMORY_ATTENTION]
        memory_dtype = _numpy_dtype(attention.input("memory_feats").datatype)
        return calls.hold(
            sam2.MEMORY_ATTENTION,
            {
                "vision_feat": vision_feat,
                "memory_feats": [m.astype(memory_dtype, copy=False) for m in selection.memories],
                # Row of the temporal encoding: 0 for the most recent memory (the reference's
                # num_maskmem - 1 - t_pos); prompt memories get num_maskmem - 1.
                "memory_tpos": np.asarray(selection.tpos_enc_index, dtype=np.int32),
                "obj_ptrs": np.stack(selection.obj_ptrs).astype(np.float32, copy=False),
                "obj_ptr_tdiff": np.asarray(selection.obj_ptr_tdiff, dtype=np.int32),
            },
            ["conditioned_feat"],
        )

    async def _encode_memory(self, vision_feat: Tensor, mask_logits: Tensor, score: float, calls: _Calls) -> np.ndarray:
        inputs = {
            "vision_feat": vision_feat,
            "mask_logits": mask_logits,
            "object_score_logits": np.array([[score]], dtype=np.float32),
        }
        async with calls.hold(sam2.MEMORY_ENCODER, inputs, ["maskmem_feat"]) as encoded:
            return np.array(encoded.array("maskmem_feat"))  # the bank keeps its own copy


def _decoder_inputs(embeds: list[Tensor], encoded: Held, coords: np.ndarray, labels: np.ndarray) -> dict[str, Tensor]:
    """One object: every feature map by reference. Several objects: one batch, which has to be
    assembled (and repeats the high-resolution maps per object)."""
    if len(embeds) == 1:
        return {
            "image_embed": embeds[0],
            "high_res_feat0": encoded.tensor("high_res_feat0"),
            "high_res_feat1": encoded.tensor("high_res_feat1"),
            "point_coords": coords,
            "point_labels": labels,
        }
    as_array = lambda t: t.array() if isinstance(t, ShmRef) else t  # noqa: E731
    return {
        "image_embed": np.concatenate([as_array(e) for e in embeds]),
        "high_res_feat0": np.repeat(encoded.array("high_res_feat0"), len(embeds), axis=0),
        "high_res_feat1": np.repeat(encoded.array("high_res_feat1"), len(embeds), axis=0),
        "point_coords": coords,
        "point_labels": labels,
    }


class _Calls:
    """Model calls of one frame: the deadline they share, their time and the bytes they move."""

    def __init__(self, runner: InferenceRunner, contract: Sam2Contract, started: float, timeout_s: float | None) -> None:
        self.runner = runner
        self.contract = contract
        self.deadline = None if timeout_s is None else started + timeout_s
        self.triton_s = 0.0
        self._held: list[Held] = []

    @property
    def bytes_moved(self) -> int:
        """Bytes the orchestrator wrote to or read from Triton's side this frame; tensors passed
        by reference between models do not count, they never left shared memory."""
        return sum(h.bytes_moved for h in self._held)

    @contextlib.asynccontextmanager
    async def hold(self, model: str, inputs: dict[str, Input], outputs: list[str]) -> AsyncIterator[Held]:
        remaining = None if self.deadline is None else self.deadline - time.perf_counter()
        async with self.runner.hold(
            self.contract.specs[model], inputs, outputs, timeout_s=remaining, max_shapes=self.contract.shm_max_shapes(model)
        ) as held:
            self.triton_s += held.triton_s
            self._held.append(held)
            yield held


def _numpy_dtype(datatype: str) -> type:
    return {"FP16": np.float16, "FP32": np.float32}[datatype]


