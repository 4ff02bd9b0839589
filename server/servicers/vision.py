"""VisionService: Detect (YOLOv8), RemoveBackground (BiRefNet), Segment (SAM 2 encoder + decoder)."""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from framewise.v1 import vision_service_pb2, vision_service_pb2_grpc
from server.errors import InvalidInput, TooLarge
from server.pipelines import sam2_contract as sam2
from server.pipelines.detection import DetectionPipeline, DetectOptions
from server.pipelines.matting import MattingPipeline, encode_alpha_png, encode_rgba_png
from server.pipelines.prompts import prompt_from_proto
from server.pipelines.segmentation import SegmentationPipeline
from server.servicers import convert

MAX_DETECTIONS_LIMIT = 1000
# Room for the response's other fields and gRPC framing beside the PNG.
_RESPONSE_OVERHEAD_BYTES = 64 * 1024
_DEFAULTS = DetectOptions()


class VisionServicer(vision_service_pb2_grpc.VisionServiceServicer):
    def __init__(
        self,
        detection: DetectionPipeline,
        segmentation: SegmentationPipeline,
        matting: MattingPipeline,
        *,
        max_response_bytes: int | None = None,
    ) -> None:
        self.detection = detection
        self.segmentation = segmentation
        self.matting = matting
        # The server's max send size: a bigger PNG gets a clear error here instead of gRPC's own.
        self.max_response_bytes = max_response_bytes

    async def Detect(
        self, request: vision_service_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> vision_service_pb2.DetectResponse:
        options = self._options(request)
        result = await self.detection.detect(request.image, options, timeout_s=context.time_remaining())
        response = vision_service_pb2.DetectResponse(
            image_width=result.width,
            image_height=result.height,
            model=convert.model_ref(result.model),
            timings=convert.timings(result.timings_ms),
        )
        for detection in result.detections:
            response.detections.add(
                class_id=detection.class_id, label=detection.label, score=detection.score, box=convert.box(detection.box)
            )
        return response

    async def RemoveBackground(
        self, request: vision_service_pb2.RemoveBackgroundRequest, context: grpc.aio.ServicerContext
    ) -> vision_service_pb2.RemoveBackgroundResponse:
        output_format = request.format or vision_service_pb2.MATTE_FORMAT_RGBA_PNG
        if output_format not in (vision_service_pb2.MATTE_FORMAT_ALPHA_PNG, vision_service_pb2.MATTE_FORMAT_RGBA_PNG):
            raise InvalidInput(
                f"format {output_format} is not a MatteFormat: use MATTE_FORMAT_ALPHA_PNG or MATTE_FORMAT_RGBA_PNG",
                "format",
            )
        crop = request.crop if request.HasField("crop") else None
        matte = await self.matting.alpha(
            request.image,
            None if crop is None else (crop.x1, crop.y1, crop.x2, crop.y2),
            timeout_s=context.time_remaining(),
        )
        started = time.perf_counter()
        if output_format == vision_service_pb2.MATTE_FORMAT_ALPHA_PNG:
            png = await asyncio.to_thread(encode_alpha_png, matte.alpha)
        else:
            png = await asyncio.to_thread(encode_rgba_png, matte.rgb, matte.alpha)
        # PNG encoding is part of this RPC's post-processing (the pipeline stops at the matte).
        encode_ms = (time.perf_counter() - started) * 1e3
        if self.max_response_bytes is not None and len(png) + _RESPONSE_OVERHEAD_BYTES > self.max_response_bytes:
            raise TooLarge(
                f"the {matte.width}x{matte.height} PNG is {len(png)} bytes, over this server's message limit of "
                f"{self.max_response_bytes} bytes; send a crop or a smaller image, or ask for MATTE_FORMAT_ALPHA_PNG"
            )
        timings = dict(matte.timings_ms)
        timings["postprocess"] = timings.get("postprocess", 0.0) + encode_ms
        timings["total"] = timings.get("total", 0.0) + encode_ms
        return vision_service_pb2.RemoveBackgroundResponse(
            png=png,
            width=matte.width,
            height=matte.height,
            model=convert.model_ref(matte.model),
            timings=convert.timings(timings),
        )

    async def Segment(
        self, request: vision_service_pb2.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> vision_service_pb2.SegmentResponse:
        prompt = prompt_from_proto(1, request.box if request.HasField("box") else None, list(request.points), "")
        result = await self.segmentation.segment(request.image, prompt, timeout_s=context.time_remaining())
        response = vision_service_pb2.SegmentResponse(
            best_index=result.best_index,
            models=[convert.model_ref(result.contract.specs[name]) for name in (sam2.IMAGE_ENCODER, sam2.MASK_DECODER)],
            timings=convert.timings(result.timings_ms),
        )
        for candidate in result.candidates:
            response.candidates.add(
                index=candidate.index, mask=candidate.mask, predicted_iou=candidate.predicted_iou, box=convert.box(candidate.box)
            )
        return response

    def _options(self, request: vision_service_pb2.DetectRequest) -> DetectOptions:
        confidence = _fraction(request, "confidence_threshold", _DEFAULTS.confidence)
        iou = _fraction(request, "iou_threshold", _DEFAULTS.iou)
        if request.max_detections < 0 or request.max_detections > MAX_DETECTIONS_LIMIT:
            raise InvalidInput(
                f"max_detections must be between 1 and {MAX_DETECTIONS_LIMIT} (0 for the default {_DEFAULTS.max_detections}), "
                f"got {request.max_detections}",
                "max_detections",
            )
        classes = self.detection.resolve_classes(
            list(request.class_ids), list(request.class_names), request.all_classes
        )
        return DetectOptions(confidence, iou, request.max_detections or _DEFAULTS.max_detections, classes)


def _fraction(request: vision_service_pb2.DetectRequest, field: str, default: float) -> float:
    if not request.HasField(field):
        return default
    value = getattr(request, field)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"{field} must be within [0, 1], got {value}", field)
    return value
