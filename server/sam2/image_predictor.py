"""Single-image segmentation (the Segment call; SAM 2's ``sam2_image_predictor``): image +
box/points -> every SAM 2 candidate mask with its score.

The same encoder and decoder as the video predictor, without memory: one encoder call, one
decoder call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import cv2
import numpy as np

from framewise.v1 import common_pb2
from server.sam2 import contract as sam2
from server.sam2.contract import Sam2Contract
from server.sam2.masks import mask_at_resolution
from server.sam2.prompts import ObjectPrompt, check_inside, prompt_tensors
from server.triton.monitor import TritonMonitor
from server.triton.runner import InferenceRunner
from server.vision.image_decode import decode_image


@dataclass(frozen=True)
class Candidate:
    index: int
    mask: common_pb2.RleMask
    box: tuple[float, float, float, float]
    predicted_iou: float


@dataclass(frozen=True)
class SegmentationResult:
    candidates: list[Candidate]
    best_index: int
    contract: Sam2Contract
    timings_ms: dict[str, float]


class ImagePredictor:
    """Segments one image from one prompt (``segment``); keeps nothing between calls."""

    def __init__(self, runner: InferenceRunner, monitor: TritonMonitor, *, max_pixels: int) -> None:
        self.runner = runner
        self.monitor = monitor
        self.max_pixels = max_pixels

    async def segment(
        self, image: common_pb2.Image, prompt: ObjectPrompt, *, timeout_s: float | None = None
    ) -> SegmentationResult:
        started = time.perf_counter()
        contract = Sam2Contract.from_specs({name: self.monitor.require_ready(name) for name in sam2.MODELS})
        decoded = await asyncio.to_thread(decode_image, image, max_pixels=self.max_pixels)
        check_inside(prompt, decoded.width, decoded.height, "")
        size = contract.image_size
        frame = await asyncio.to_thread(cv2.resize, decoded.rgb, (size, size), interpolation=cv2.INTER_LINEAR)
        decoded_at = time.perf_counter()

        def deadline() -> float | None:
            return None if timeout_s is None else timeout_s - (time.perf_counter() - started)

        encoder, decoder = contract.specs[sam2.IMAGE_ENCODER], contract.specs[sam2.MASK_DECODER]
        features = ["vision_feat", "high_res_feat0", "high_res_feat1"]
        coords, labels = prompt_tensors([prompt], decoded.width, decoded.height, size)
        # The encoder's feature maps go to the decoder by reference (shared memory when Triton
        # is co-located): only the frame, the prompt and the masks cross.
        async with self.runner.hold(encoder, {"image": frame[None]}, features, timeout_s=deadline()) as encoded:
            inputs = {
                "image_embed": encoded.tensor("vision_feat"),
                "high_res_feat0": encoded.tensor("high_res_feat0"),
                "high_res_feat1": encoded.tensor("high_res_feat1"),
                "point_coords": coords,
                "point_labels": labels,
            }
            async with self.runner.hold(
                decoder, inputs, ["masks", "iou_scores"], timeout_s=deadline(), max_shapes=contract.shm_max_shapes(sam2.MASK_DECODER)
            ) as decoded_masks:
                masks, ious = np.array(decoded_masks.array("masks")), np.array(decoded_masks.array("iou_scores"))
        triton_s = encoded.triton_s + decoded_masks.triton_s
        triton_done = time.perf_counter()

        candidates = []
        for index in range(masks.shape[1]):
            mask, box = await asyncio.to_thread(mask_at_resolution, masks[0, index], decoded.width, decoded.height)
            candidates.append(Candidate(index, mask, box, float(ious[0, index])))
        timings = {
            "decode": (decoded_at - started) * 1e3,
            "triton": triton_s * 1e3,
            "postprocess": (time.perf_counter() - triton_done) * 1e3,
            "total": (time.perf_counter() - started) * 1e3,
        }
        return SegmentationResult(candidates, int(np.argmax(ious[0])), contract, timings)
