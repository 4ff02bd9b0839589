"""Background removal: image (or a crop of it) -> Triton `birefnet` -> alpha matte at the crop's size.

Used by VisionService.RemoveBackground and by the talking-video job (which mattes the portrait
before sending it on). The model size, tensor names and the stand-in flag come from the model's
Triton metadata and config, so the CPU stand-in (any S) and a real GPU export need no code change.
Like the real BiRefNet, the model sees the crop squashed to S x S (no letterbox); the matte is
resized back to the crop's own size.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import cv2
import grpc
import numpy as np

from framewise.v1 import common_pb2
from server.errors import InvalidInput, ServiceError
from server.health import TritonMonitor
from server.metrics import Metrics
from server.triton.model_spec import ModelSpec
from server.triton.runner import InferenceRunner
from server.vision.image_decode import DecodedImage, decode_image

MODEL_NAME = "birefnet"
# Fast zlib level: a 1080p RGBA matte is several MB of pixels and the output is lossless anyway.
PNG_COMPRESSION = 1


@dataclass(frozen=True)
class Matte:
    alpha: np.ndarray  # uint8 [h, w], 255 = foreground; h x w is the crop's size in original pixels
    rgb: np.ndarray  # uint8 [h, w, 3], the crop's pixels at the same size (for an RGBA cut-out)
    crop_box: tuple[int, int, int, int]  # x1, y1, x2, y2 in original pixels (the whole image if no crop)
    image_width: int  # of the original image
    image_height: int
    model: ModelSpec  # the Triton model that answered; model.stand_in says whether it is real
    timings_ms: dict[str, float]  # decode, preprocess, triton, postprocess, total

    @property
    def width(self) -> int:
        return int(self.alpha.shape[1])

    @property
    def height(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def stand_in(self) -> bool:
        return self.model.stand_in


@dataclass(frozen=True)
class _MattingContract:
    """What the pipeline needs from the spec: tensor names and the model's input size."""

    input_name: str
    output_name: str
    size: tuple[int, int]  # (height, width) of the model input

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> _MattingContract:
        image, alpha = spec.input(), spec.output()
        # image [batch, H, W, 3] UINT8 (normalisation inside the graph) -> alpha [batch, 1, H, W].
        if len(image.shape) != 4 or image.shape[-1] != 3 or image.datatype != "UINT8" or min(image.shape[1:]) <= 0:
            raise ServiceError(
                f"model {spec.name!r} input {image.name!r} is {image.datatype} {list(image.shape)}; "
                "the matting contract needs UINT8 [batch, H, W, 3]"
            )
        if len(alpha.shape) != 4 or alpha.shape[1] != 1:
            raise ServiceError(
                f"model {spec.name!r} output {alpha.name!r} is {list(alpha.shape)}; the matting contract needs [batch, 1, H, W]"
            )
        return cls(image.name, alpha.name, (image.shape[1], image.shape[2]))


class MattingPipeline:
    def __init__(
        self,
        runner: InferenceRunner,
        monitor: TritonMonitor,
        *,
        max_pixels: int,
        metrics: Metrics | None = None,
        model_name: str = MODEL_NAME,
    ) -> None:
        self.runner = runner
        self.monitor = monitor
        self.max_pixels = max_pixels
        self.metrics = metrics
        self.model_name = model_name
        self._cached: tuple[ModelSpec, _MattingContract] | None = None

    def _contract(self, spec: ModelSpec) -> _MattingContract:
        # The monitor hands out a new spec object whenever Triton reloads the model.
        if self._cached is None or self._cached[0] is not spec:
            self._cached = (spec, _MattingContract.from_spec(spec))
        return self._cached[1]

    async def alpha(
        self,
        image: common_pb2.Image | DecodedImage,
        crop_box: tuple[float, float, float, float] | None = None,
        *,
        timeout_s: float | None = None,
        image_field: str = "image",
        crop_field: str = "crop",
    ) -> Matte:
        """The alpha matte of ``image`` (or of ``crop_box`` in it, original pixels x1, y1, x2, y2).

        ``image_field`` / ``crop_field`` name the request fields in InvalidInput errors, so a
        caller with another request shape (a job) still tells its client which field is wrong.
        """
        started = time.perf_counter()
        spec = self.monitor.require_ready(self.model_name)
        contract = self._contract(spec)

        if isinstance(image, DecodedImage):
            decoded = image
        else:
            decoded = await asyncio.to_thread(decode_image, image, max_pixels=self.max_pixels, field=image_field)
        decoded_at = time.perf_counter()
        box = crop_pixels(crop_box, decoded.width, decoded.height, crop_field)
        crop_rgb, frame = await asyncio.to_thread(_prepare, decoded, box, contract.size)
        prepared_at = time.perf_counter()

        remaining = None if timeout_s is None else timeout_s - (prepared_at - started)
        size = (box[2] - box[0], box[3] - box[1])
        run = await self.runner.run(
            spec,
            {contract.input_name: frame[None]},
            [contract.output_name],
            lambda outputs: _to_uint8(outputs[contract.output_name][0, 0], size),
            timeout_s=remaining,
        )

        timings = {
            "decode": decoded_at - started,
            "preprocess": prepared_at - decoded_at,
            "triton": run.triton_s,
            "postprocess": run.consume_s,
        }
        if self.metrics is not None:
            for stage, seconds in timings.items():
                self.metrics.stage_latency.labels("matting", stage).observe(seconds)
        timings_ms = {k: v * 1e3 for k, v in timings.items()}
        timings_ms["total"] = (time.perf_counter() - started) * 1e3
        return Matte(run.value, crop_rgb, box, decoded.width, decoded.height, spec, timings_ms)


def crop_pixels(
    crop_box: tuple[float, float, float, float] | None, width: int, height: int, field: str = "crop"
) -> tuple[int, int, int, int]:
    """The validated crop as whole pixels (outward-rounded), or the whole image when None."""
    if crop_box is None:
        return (0, 0, width, height)
    x1, y1, x2, y2 = crop_box
    text = f"{field} ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
    if not all(math.isfinite(v) for v in crop_box):
        raise InvalidInput(f"{text} has a coordinate that is not a finite number", field)
    if not (x2 > x1 and y2 > y1):
        raise InvalidInput(f"{text} has zero or negative area: x2 > x1 and y2 > y1 are required", field)
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise InvalidInput(f"{text} is not inside the {width}x{height} image", field)
    # Outward rounding: a fractional box keeps every pixel it touches (and never becomes empty).
    return (math.floor(x1), math.floor(y1), min(math.ceil(x2), width), min(math.ceil(y2), height))


def encode_alpha_png(alpha: np.ndarray) -> bytes:
    """8-bit grayscale PNG of the matte alone."""
    return _png(alpha)


def encode_rgba_png(rgb: np.ndarray, alpha: np.ndarray) -> bytes:
    """8-bit RGBA PNG: the pixels with the matte as alpha channel (the cut-out)."""
    if rgb.shape[:2] != alpha.shape:
        raise ValueError(f"pixels {rgb.shape[:2]} and matte {alpha.shape} differ in size")
    # OpenCV writes BGRA channel order.
    return _png(np.dstack((rgb[..., 2], rgb[..., 1], rgb[..., 0], alpha)))


def _png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:  # only on an impossible image (zero size): a server bug, not the caller's
        raise ServiceError(f"PNG encoding of a {pixels.shape} image failed", code=grpc.StatusCode.INTERNAL)
    return encoded.tobytes()


def _prepare(
    decoded: DecodedImage, box: tuple[int, int, int, int], model_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(the crop's pixels at its original-pixel size, the model input [H, W, 3])."""
    x1, y1, x2, y2 = box
    # A reduced JPEG decode (scale > 1) holds fewer pixels than the original: map the box into it.
    sx, sy = decoded.scale, decoded.scale_y
    dx1, dy1 = min(int(x1 / sx), decoded.rgb.shape[1] - 1), min(int(y1 / sy), decoded.rgb.shape[0] - 1)
    dx2, dy2 = max(math.ceil(x2 / sx), dx1 + 1), max(math.ceil(y2 / sy), dy1 + 1)
    crop = decoded.rgb[dy1:dy2, dx1:dx2]
    out_w, out_h = x2 - x1, y2 - y1
    if crop.shape[:2] != (out_h, out_w):
        crop = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    height, width = model_size
    # INTER_AREA when shrinking (anti-aliased, like the reference's PIL resize), bilinear otherwise.
    shrink = crop.shape[0] > height or crop.shape[1] > width
    frame = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(crop), np.ascontiguousarray(frame)


def _to_uint8(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Model matte (0..1, FP32 or FP16) -> uint8 at ``size`` (width, height)."""
    resized = cv2.resize(np.asarray(alpha, dtype=np.float32), size, interpolation=cv2.INTER_LINEAR)
    return (np.clip(resized, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
