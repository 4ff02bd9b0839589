"""Object detection: image -> letterbox -> Triton `yolov8` -> boxes in original pixels.

Sizes, tensor names, class names and the letterbox pad value come from the model's Triton
metadata and config parameters, so the CPU and GPU repositories (or a retrained model with
other classes) need no code change.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from framewise.v1 import common_pb2
from server.cache.keys import CacheKey
from server.cache.result_cache import ResultCache
from server.errors import InvalidInput, shown
from server.metrics import Metrics
from server.triton.model_spec import ModelSpec
from server.triton.monitor import TritonMonitor
from server.triton.runner import InferenceRunner
from server.vision.image_decode import DecodedImage, decode_image
from server.vision.letterbox import Letterbox, letterbox
from server.vision.yolo import decode_yolov8


@dataclass(frozen=True)
class DetectOptions:
    confidence: float = 0.25
    iou: float = 0.45
    max_detections: int = 100
    # Class ids to keep; None keeps every class.
    class_ids: frozenset[int] | None = frozenset({0})


@dataclass(frozen=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels


@dataclass(frozen=True)
class DetectionResult:
    detections: list[Detection]
    width: int
    height: int
    model: ModelSpec
    timings_ms: dict[str, float]
    # True when the result came from the result cache (same image, model and options before):
    # no decode, no Triton request, timings_ms["triton"] is 0.
    from_cache: bool = False


@dataclass(frozen=True)
class _YoloContract:
    """The parts of the model spec the pipeline needs, derived once per spec."""

    input_name: str
    output_name: str
    size: tuple[int, int]  # (height, width) of the model input
    class_names: tuple[str, ...]
    pad_value: int

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> _YoloContract:
        image = spec.inputs[0]
        output = spec.outputs[0]
        # Input is [batch, H, W, 3] (uint8 NHWC, preprocessing inside the graph).
        height, width = image.shape[-3], image.shape[-2]
        names = spec.json_parameter("class_names")
        assert isinstance(names, list)
        return cls(image.name, output.name, (height, width), tuple(names), int(spec.parameters.get("letterbox_pad_value", "114")))


class DetectionPipeline:
    def __init__(
        self,
        runner: InferenceRunner,
        monitor: TritonMonitor,
        metrics: Metrics,
        *,
        model_name: str = "yolov8",
        max_pixels: int = 50_000_000,
        cache: ResultCache | None = None,
    ) -> None:
        self.runner = runner
        self.monitor = monitor
        self.metrics = metrics
        self.model_name = model_name
        self.max_pixels = max_pixels
        self.cache = cache
        self._cached: tuple[ModelSpec, _YoloContract] | None = None

    def _contract(self, spec: ModelSpec) -> _YoloContract:
        # The monitor hands out a new spec object whenever Triton reloads the model.
        if self._cached is None or self._cached[0] is not spec:
            self._cached = (spec, _YoloContract.from_spec(spec))
        return self._cached[1]

    def class_names(self) -> tuple[str, ...]:
        return self._contract(self.monitor.require_ready(self.model_name)).class_names

    async def detect(
        self, image: common_pb2.Image, options: DetectOptions, *, timeout_s: float | None = None
    ) -> DetectionResult:
        started = time.perf_counter()
        spec = self.monitor.require_ready(self.model_name)
        contract = self._contract(spec)

        key: CacheKey | None = None
        cache_s = 0.0
        if self.cache is not None:
            key = await self.cache.key("detection", spec, image, _cache_params(options))
            value = await self.cache.get(key)
            cache_s = time.perf_counter() - started
            if value is not None:
                # A hit needs no decode: the stored result holds the image size too. (A bad
                # image is never stored, so its error still comes from the decode below.)
                detections, width, height = _from_cache_value(value)
                self.metrics.stage_latency.labels("detect", "cache").observe(cache_s)
                timings_ms = dict.fromkeys(("decode", "preprocess", "triton", "postprocess"), 0.0)
                timings_ms["cache"] = cache_s * 1e3
                timings_ms["total"] = (time.perf_counter() - started) * 1e3
                return DetectionResult(detections, width, height, spec, timings_ms, from_cache=True)

        decoded, canvas, mapping, decode_s, preprocess_s = await asyncio.to_thread(self._prepare, image, contract)

        remaining = None if timeout_s is None else timeout_s - (time.perf_counter() - started)
        run = await self.runner.run(
            spec,
            {contract.input_name: canvas[None]},
            [contract.output_name],
            lambda outputs: self._postprocess(outputs[contract.output_name][0], decoded, mapping, options, contract),
            timeout_s=remaining,
        )
        detections = run.value
        if self.cache is not None and key is not None:
            stored = time.perf_counter()
            await self.cache.put(key, _cache_value(detections, decoded.width, decoded.height))
            cache_s += time.perf_counter() - stored

        timings = {"decode": decode_s, "preprocess": preprocess_s, "triton": run.triton_s, "postprocess": run.consume_s}
        if self.cache is not None:
            timings["cache"] = cache_s  # hashing the input, the lookup and storing the result
        for stage, seconds in timings.items():
            self.metrics.stage_latency.labels("detect", stage).observe(seconds)
        timings_ms = {k: v * 1e3 for k, v in timings.items()}
        timings_ms["total"] = (time.perf_counter() - started) * 1e3
        return DetectionResult(detections, decoded.width, decoded.height, spec, timings_ms)

    def _prepare(
        self, image: common_pb2.Image, contract: _YoloContract
    ) -> tuple[DecodedImage, np.ndarray, Letterbox, float, float]:
        t0 = time.perf_counter()
        decoded = decode_image(image, max_pixels=self.max_pixels, min_decoded_size=contract.size)
        t1 = time.perf_counter()
        canvas, mapping = letterbox(decoded.rgb, contract.size, contract.pad_value)
        return decoded, canvas, mapping, t1 - t0, time.perf_counter() - t1

    def _postprocess(
        self,
        output: np.ndarray,
        decoded: DecodedImage,
        mapping: Letterbox,
        options: DetectOptions,
        contract: _YoloContract,
    ) -> list[Detection]:
        num_classes = output.shape[0] - 4
        class_mask = None
        if options.class_ids is not None:
            class_mask = np.zeros(num_classes, dtype=bool)
            class_mask[[c for c in options.class_ids if c < num_classes]] = True
        raw = decode_yolov8(
            output, confidence=options.confidence, iou=options.iou, max_detections=options.max_detections, class_mask=class_mask
        )
        # Model pixels -> decoded pixels -> original pixels (a reduced JPEG decode has scale > 1).
        boxes = mapping.to_source(raw.boxes, (decoded.rgb.shape[1], decoded.rgb.shape[0]))
        boxes *= np.array([decoded.scale, decoded.scale_y] * 2, dtype=np.float32)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, decoded.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, decoded.height)
        return [
            Detection(int(c), _label(contract.class_names, int(c)), float(s), tuple(float(v) for v in b))  # type: ignore[arg-type]
            for b, s, c in zip(boxes, raw.scores, raw.class_ids)
        ]

    def resolve_classes(self, ids: list[int], names: list[str], all_classes: bool) -> frozenset[int] | None:
        """Validate a class filter against the model's class list."""
        class_names = self.class_names()
        if all_classes:
            if ids or names:
                raise InvalidInput("all_classes cannot be combined with class_ids or class_names", "all_classes")
            return None
        chosen: set[int] = set()
        for class_id in ids:
            if not 0 <= class_id < len(class_names):
                raise InvalidInput(
                    f"class id {class_id} does not exist; the model has ids 0..{len(class_names) - 1}", "class_ids"
                )
            chosen.add(class_id)
        lookup = {name.lower(): i for i, name in enumerate(class_names)}
        for name in names:
            class_id = lookup.get(name.strip().lower())
            if class_id is None:
                raise InvalidInput(
                    f"unknown class name {shown(name)}; known names include {', '.join(class_names[:10])}, ... "
                    f"({len(class_names)} in all, see GetServerInfo)",
                    "class_names",
                )
            chosen.add(class_id)
        return frozenset(chosen) if chosen else frozenset({lookup.get("person", 0)})


def _cache_params(options: DetectOptions) -> dict[str, object]:
    """Every option that changes the detections (the class names come with the model's spec)."""
    classes = None if options.class_ids is None else sorted(options.class_ids)
    return {"confidence": options.confidence, "iou": options.iou, "max": options.max_detections, "classes": classes}


def _cache_value(detections: list[Detection], width: int, height: int) -> bytes:
    # JSON writes floats with repr, which reads back as the same float: a hit answers the
    # same numbers to the last bit.
    rows = [[d.class_id, d.label, d.score, *d.box] for d in detections]
    return json.dumps({"width": width, "height": height, "detections": rows}, separators=(",", ":")).encode()


def _from_cache_value(value: bytes) -> tuple[list[Detection], int, int]:
    stored = json.loads(value)
    detections = [
        Detection(int(c), str(label), float(score), (x1, y1, x2, y2))
        for c, label, score, x1, y1, x2, y2 in stored["detections"]
    ]
    return detections, int(stored["width"]), int(stored["height"])


def _label(names: tuple[str, ...], class_id: int) -> str:
    return names[class_id] if class_id < len(names) else str(class_id)
