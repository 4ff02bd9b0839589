"""VisionService: Detect (YOLOv8), Segment (SAM 2 encoder + decoder). RemoveBackground arrives with BiRefNet."""

from __future__ import annotations

import math

import grpc

from framewise.v1 import vision_service_pb2, vision_service_pb2_grpc
from server.errors import InvalidInput
from server.pipelines import sam2_contract as sam2
from server.pipelines.detection import DetectionPipeline, DetectOptions
from server.pipelines.prompts import prompt_from_proto
from server.pipelines.segmentation import SegmentationPipeline
from server.servicers import convert
from server.servicers.unimplemented import abort_unimplemented

MAX_DETECTIONS_LIMIT = 1000
_DEFAULTS = DetectOptions()


class VisionServicer(vision_service_pb2_grpc.VisionServiceServicer):
    def __init__(self, detection: DetectionPipeline, segmentation: SegmentationPipeline) -> None:
        self.detection = detection
        self.segmentation = segmentation

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
        await abort_unimplemented(
            context,
            "framewise.v1.VisionService/RemoveBackground",
            "it arrives with the BiRefNet model (talking-video release)",
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
