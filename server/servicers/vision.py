"""VisionService: Detect (YOLOv8), RemoveBackground (the matting model + compositing), Segment (SAM 2 encoder + decoder)."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import numpy as np

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc
from server.errors import InvalidInput, ServiceError, TooLarge
from server.pipelines.detection import DetectionPipeline, DetectOptions
from server.pipelines.matting import MattingPipeline, crop_pixels
from server.sam2 import contract as sam2
from server.sam2.image_predictor import ImagePredictor
from server.sam2.prompts import prompt_from_proto
from server.servicers import convert
from server.pipelines.backgrounds import background_mode, proto_mode, resolve_background
from server.vision.compositing import MAX_FEATHER_PX, BackgroundMode, BackgroundSpec, encode_png, feather, render
from server.vision.image_decode import decode_image
from server.vision.persons import DEFAULT_CROP_MARGIN, PersonChoiceError, crop_box, select_person

MAX_DETECTIONS_LIMIT = 1000
# Room for the response's other fields and gRPC framing beside the PNG.
_RESPONSE_OVERHEAD_BYTES = 64 * 1024
_DEFAULTS = DetectOptions()
# crop_person: the detector's defaults (confidence 0.25, class "person" only).
_PERSONS = DetectOptions()


class VisionServicer(vision_service_pb2_grpc.VisionServiceServicer):
    def __init__(
        self,
        detection: DetectionPipeline,
        image_predictor: ImagePredictor,
        matting: MattingPipeline,
        *,
        max_response_bytes: int | None = None,
    ) -> None:
        self.detection = detection
        self.image_predictor = image_predictor
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
        started = time.perf_counter()
        alpha_only = _removal_format(request) == vision_service_pb2.MATTE_FORMAT_ALPHA_PNG
        _check_removal_options(request, alpha_only)
        # The background picture is decoded before any model runs: a bad one fails fast.
        spec: BackgroundSpec | None = None  # None: MATTE_FORMAT_ALPHA_PNG, the matte alone
        if not alpha_only:
            spec = await asyncio.to_thread(
                resolve_background, request.background, default_mode=BackgroundMode.TRANSPARENT, max_pixels=self.matting.max_pixels
            )
        response = vision_service_pb2.RemoveBackgroundResponse()
        timings: dict[str, float] = {}
        crop = (request.crop.x1, request.crop.y1, request.crop.x2, request.crop.y2) if request.HasField("crop") else None
        if request.crop_person:
            crop = await self._person_crop(request, context, response, timings)

        if spec is not None and spec.mode is BackgroundMode.KEEP:
            # Nothing to matte: the (cropped) original pixels, without paying for the model.
            decode_started = time.perf_counter()
            pixels, box = await asyncio.to_thread(self._original_pixels, request.image, crop)
            _add(timings, {"decode": (time.perf_counter() - decode_started) * 1e3})
            compose_started = time.perf_counter()
        else:
            matte = await self.matting.alpha(request.image, crop, timeout_s=context.time_remaining())
            _add(timings, matte.timings_ms)
            response.model.CopyFrom(convert.model_ref(matte.model))
            box = matte.crop_box
            compose_started = time.perf_counter()
            if spec is None:  # MATTE_FORMAT_ALPHA_PNG
                pixels = await asyncio.to_thread(feather, matte.alpha, request.feather_px)
            else:
                pixels = await asyncio.to_thread(render, matte.rgb, matte.alpha, spec, request.feather_px)
        png = await asyncio.to_thread(encode_png, pixels)
        # Compositing and PNG encoding are this RPC's post-processing (the pipeline stops at the matte).
        _add(timings, {"postprocess": (time.perf_counter() - compose_started) * 1e3})
        height, width = pixels.shape[:2]
        if self.max_response_bytes is not None and len(png) + _RESPONSE_OVERHEAD_BYTES > self.max_response_bytes:
            raise TooLarge(
                f"the {width}x{height} PNG is {len(png)} bytes, over this server's message limit of "
                f"{self.max_response_bytes} bytes; send a crop or a smaller image, or ask for MATTE_FORMAT_ALPHA_PNG"
            )
        timings["total"] = (time.perf_counter() - started) * 1e3
        response.png = png
        response.width, response.height = width, height
        response.channels = 1 if pixels.ndim == 2 else pixels.shape[2]
        if spec is not None:
            response.background_mode = proto_mode(spec.mode)
        response.output_box.CopyFrom(convert.box(box))
        response.timings.CopyFrom(convert.timings(timings))
        return response

    async def _person_crop(
        self,
        request: vision_service_pb2.RemoveBackgroundRequest,
        context: grpc.aio.ServicerContext,
        response: vision_service_pb2.RemoveBackgroundResponse,
        timings: dict[str, float],
    ) -> tuple[float, float, float, float]:
        """Detect persons, choose one, and return the crop around them (filling the response's
        person fields)."""
        result = await self.detection.detect(request.image, _PERSONS, timeout_s=context.time_remaining())
        _add(timings, {k: v for k, v in result.timings_ms.items() if k != "total"})
        people = sorted(result.detections, key=lambda d: d.score, reverse=True)
        try:
            chosen = select_person(
                [p.box for p in people],
                index=request.person_index if request.HasField("person_index") else None,
                field="person_index",
            )
        except PersonChoiceError as error:
            if error.kind == "no_person_found":
                # The request is well formed; the photo lacks what crop_person needs.
                raise ServiceError(
                    f"crop_person: {error} (or leave crop_person unset to process the whole image)",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                ) from None
            raise InvalidInput(str(error), "person_index") from None
        person = people[chosen]
        response.person_box.CopyFrom(convert.box(person.box))
        response.persons_found, response.person_index = len(people), chosen
        response.detection_model.CopyFrom(convert.model_ref(result.model))
        return crop_box(person.box, result.width, result.height, DEFAULT_CROP_MARGIN)

    def _original_pixels(
        self, image: common_pb2.Image, crop: tuple[float, float, float, float] | None
    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        decoded = decode_image(image, max_pixels=self.matting.max_pixels)
        box = crop_pixels(crop, decoded.width, decoded.height)
        x1, y1, x2, y2 = box
        return np.ascontiguousarray(decoded.rgb[y1:y2, x1:x2]), box

    async def Segment(
        self, request: vision_service_pb2.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> vision_service_pb2.SegmentResponse:
        prompt = prompt_from_proto(1, request.box if request.HasField("box") else None, list(request.points), "")
        result = await self.image_predictor.segment(request.image, prompt, timeout_s=context.time_remaining())
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


def _removal_format(request: vision_service_pb2.RemoveBackgroundRequest) -> int:
    output_format = request.format or vision_service_pb2.MATTE_FORMAT_RGBA_PNG
    if output_format not in (vision_service_pb2.MATTE_FORMAT_ALPHA_PNG, vision_service_pb2.MATTE_FORMAT_RGBA_PNG):
        raise InvalidInput(
            f"format {output_format} is not a MatteFormat: use MATTE_FORMAT_ALPHA_PNG or MATTE_FORMAT_RGBA_PNG",
            "format",
        )
    return output_format


def _check_removal_options(request: vision_service_pb2.RemoveBackgroundRequest, alpha_only: bool) -> None:
    """The cheap checks, before anything is decoded or run."""
    if alpha_only and request.HasField("background"):
        raise InvalidInput(
            "background cannot be combined with format MATTE_FORMAT_ALPHA_PNG (the matte alone has no background): "
            "leave background unset, or ask for MATTE_FORMAT_RGBA_PNG",
            "background",
        )
    feather_px = request.feather_px
    if not (math.isfinite(feather_px) and 0.0 <= feather_px <= MAX_FEATHER_PX):
        raise InvalidInput(f"feather_px must be within [0, {MAX_FEATHER_PX:g}] pixels, got {feather_px}", "feather_px")
    if feather_px and not alpha_only and background_mode(request.background, BackgroundMode.TRANSPARENT) is BackgroundMode.KEEP:
        raise InvalidInput(
            "feather_px has no effect with BACKGROUND_MODE_KEEP (no matte is used): leave it at 0", "feather_px"
        )
    if request.crop_person and request.HasField("crop"):
        raise InvalidInput("crop and crop_person cannot be combined: send one or the other", "crop")
    if request.HasField("person_index") and not request.crop_person:
        raise InvalidInput("person_index is used only with crop_person: set crop_person too", "person_index")


def _add(timings: dict[str, float], more: dict[str, float]) -> None:
    for stage, ms in more.items():
        timings[stage] = timings.get(stage, 0.0) + ms


def _fraction(request: vision_service_pb2.DetectRequest, field: str, default: float) -> float:
    if not request.HasField(field):
        return default
    value = getattr(request, field)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"{field} must be within [0, 1], got {value}", field)
    return value
