"""Background removal: image (or a crop of it) -> Triton `matting` -> alpha matte at the crop's size.

Used by VisionService.RemoveBackground and by the talking-video job (which mattes the portrait
before sending it on). The Triton model is named for the job; the network behind it is the
repository's (config parameter `network`): U^2-Netp at S = 320 in the CPU repository,
BiRefNet-lite at S = 1024 in the GPU one. Both take the same contract:

- in: `image` UINT8 [batch, S, S, 3], RGB. S, the tensor names and the stand-in flag come from
  Triton's metadata and config, never from this code.
- inside the graph: the network's own normalisation (U^2-Netp: divide by the image's maximum,
  then ImageNet mean/std; BiRefNet: /255, then ImageNet mean/std) and its output scaling
  (U^2-Netp: sigmoid, then min-max over the image; BiRefNet: sigmoid).
- out: `alpha` FP32 [batch, 1, S, S] in 0..1, 1 = foreground.

The crop is squashed to S x S (no letterbox, as both networks' reference code does) with an
anti-aliased Lanczos-3 resize (server/vision/resample.py, the filter of U^2-Netp's reference
pre-processing), and the float matte is resized back to the crop's own size with the same filter
before it is rounded to 8 bits.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import zlib
from dataclasses import dataclass

import cv2
import grpc
import numpy as np

from framewise.v1 import common_pb2
from server.cache.keys import CacheKey
from server.cache.result_cache import ResultCache
from server.errors import InvalidInput, ServiceError
from server.metrics import Metrics
from server.triton.model_spec import ModelSpec
from server.triton.monitor import TritonMonitor
from server.triton.runner import InferenceRunner
from server.vision.image_decode import DecodedImage, decode_image
from server.vision.resample import lanczos_resize

MODEL_NAME = "matting"
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
    timings_ms: dict[str, float]  # decode, preprocess, triton, postprocess, total (and cache)
    # True when the alpha came from the result cache (same image, crop and model before): no
    # Triton request, timings_ms["triton"] is 0. The pixels (rgb) are always this request's.
    from_cache: bool = False

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
        cache: ResultCache | None = None,
    ) -> None:
        self.runner = runner
        self.monitor = monitor
        self.max_pixels = max_pixels
        self.metrics = metrics
        self.model_name = model_name
        self.cache = cache
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

        key: CacheKey | None = None
        cache_s = 0.0
        if self.cache is not None:
            # The decode comes first either way: the crop is validated against the image's
            # size, and the cut-out needs this request's pixels (only the alpha is stored).
            key = await self.cache.key("matting", spec, image, {"box": list(box)})
            value = await self.cache.get(key)
            alpha = None if value is None else await asyncio.to_thread(_alpha_from_cache, value, box)
            cache_s = time.perf_counter() - decoded_at
            if alpha is not None:
                cropped_at = time.perf_counter()
                crop_rgb = await asyncio.to_thread(_crop, decoded, box)
                timings = {
                    "decode": decoded_at - started,
                    "preprocess": time.perf_counter() - cropped_at,
                    "triton": 0.0,
                    "postprocess": 0.0,
                    "cache": cache_s,
                }
                return self._matte(alpha, crop_rgb, box, decoded, spec, timings, started, from_cache=True)

        prepare_from = time.perf_counter()
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

        if self.cache is not None and key is not None:
            stored = time.perf_counter()
            await self.cache.put(key, await asyncio.to_thread(_alpha_cache_value, run.value))
            cache_s += time.perf_counter() - stored

        timings = {
            "decode": decoded_at - started,
            "preprocess": prepared_at - prepare_from,
            "triton": run.triton_s,
            "postprocess": run.consume_s,
        }
        if self.cache is not None:
            timings["cache"] = cache_s  # hashing the input, the lookup and storing the alpha
        return self._matte(run.value, crop_rgb, box, decoded, spec, timings, started, from_cache=False)

    def _matte(
        self,
        alpha: np.ndarray,
        crop_rgb: np.ndarray,
        box: tuple[int, int, int, int],
        decoded: DecodedImage,
        spec: ModelSpec,
        timings: dict[str, float],
        started: float,
        *,
        from_cache: bool,
    ) -> Matte:
        if self.metrics is not None:
            for stage, seconds in timings.items():
                self.metrics.stage_latency.labels("matting", stage).observe(seconds)
        timings_ms = {k: v * 1e3 for k, v in timings.items()}
        timings_ms["total"] = (time.perf_counter() - started) * 1e3
        return Matte(alpha, crop_rgb, box, decoded.width, decoded.height, spec, timings_ms, from_cache=from_cache)


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
    crop = _crop(decoded, box)
    height, width = model_size
    # Not cv2.resize: none of its filters widens when shrinking the way the reference's Lanczos
    # does, and U^2-Netp's foreground on a portrait then overlaps the reference's at IoU 0.86 to
    # 0.98 instead of 0.999 (README, "Matting on the CPU default").
    frame = lanczos_resize(crop, (width, height))
    return crop, np.ascontiguousarray(frame)


def _crop(decoded: DecodedImage, box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop's pixels at its original-pixel size (C-contiguous)."""
    x1, y1, x2, y2 = box
    # A reduced JPEG decode (scale > 1) holds fewer pixels than the original: map the box into it.
    sx, sy = decoded.scale, decoded.scale_y
    dx1, dy1 = min(int(x1 / sx), decoded.rgb.shape[1] - 1), min(int(y1 / sy), decoded.rgb.shape[0] - 1)
    dx2, dy2 = max(math.ceil(x2 / sx), dx1 + 1), max(math.ceil(y2 / sy), dy1 + 1)
    crop = decoded.rgb[dy1:dy2, dx1:dx2]
    out_w, out_h = x2 - x1, y2 - y1
    if crop.shape[:2] != (out_h, out_w):
        crop = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(crop)


def _alpha_cache_value(alpha: np.ndarray) -> bytes:
    """The uint8 matte, size first, zlib at its fastest level: mattes are mostly runs of 0 and
    255, so this stores several times more of them in the same bound, losslessly."""
    height, width = alpha.shape
    return struct.pack("<II", height, width) + zlib.compress(np.ascontiguousarray(alpha, dtype=np.uint8).tobytes(), 1)


def _alpha_from_cache(value: bytes, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """The stored matte, or None when it does not have the crop's size (never expected: the
    key holds the box; a mismatch is treated as a miss rather than trusted)."""
    height, width = struct.unpack_from("<II", value)
    if (width, height) != (box[2] - box[0], box[3] - box[1]):
        return None
    pixels = zlib.decompress(value[8:])
    if len(pixels) != height * width:
        return None
    # A writable array, like a computed matte (callers may composite in place).
    return np.frombuffer(bytearray(pixels), dtype=np.uint8).reshape(height, width)


def _to_uint8(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Model matte (0..1, FP32 or FP16) -> uint8 at ``size`` (width, height)."""
    # Resized as floats, rounded once (the reference rounds to 8 bits first, then resizes).
    resized = lanczos_resize(np.asarray(alpha, dtype=np.float32), size)
    return (np.clip(resized, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
