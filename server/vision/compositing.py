"""Putting a matted subject on a new background: colours, cover/contain fits, feathering, blending.

Pure numpy + OpenCV (no gRPC, no protobuf, no Triton), shared by VisionService.RemoveBackground
and the talking-video job. Every image here is RGB channel order, uint8; a matte is uint8 [h, w]
with 255 = subject. The servicers turn the proto's `Background` into a `BackgroundSpec`.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import cv2
import numpy as np

# Echoed input is cut to this many characters, so a megabyte "colour" never lands in an error.
_ECHO_LIMIT = 64
MAX_FEATHER_PX = 64.0

# The 16 CSS basic colour keywords (CSS Color Module Level 3, section 4.1), plus the spellings
# people type for three of them (grey, cyan, magenta are CSS names for the same values).
CSS_BASIC_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "silver": (192, 192, 192),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "white": (255, 255, 255),
    "maroon": (128, 0, 0),
    "red": (255, 0, 0),
    "purple": (128, 0, 128),
    "fuchsia": (255, 0, 255),
    "magenta": (255, 0, 255),
    "green": (0, 128, 0),
    "lime": (0, 255, 0),
    "olive": (128, 128, 0),
    "yellow": (255, 255, 0),
    "navy": (0, 0, 128),
    "blue": (0, 0, 255),
    "teal": (0, 128, 128),
    "aqua": (0, 255, 255),
    "cyan": (0, 255, 255),
}
_HEX = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


class BackgroundMode(enum.Enum):
    KEEP = "keep"  # the original pixels, no compositing
    TRANSPARENT = "transparent"  # an RGBA cut-out
    COLOR = "color"  # the subject over a solid colour
    IMAGE = "image"  # the subject over a fitted picture


class Fit(enum.Enum):
    COVER = "cover"  # scale to cover the frame, centre, crop the overflow
    CONTAIN = "contain"  # scale to fit inside the frame, centre, bars around it


@dataclass(frozen=True)
class BackgroundSpec:
    """A resolved, validated background: what `render` needs and nothing from the wire."""

    mode: BackgroundMode = BackgroundMode.TRANSPARENT
    color: tuple[int, int, int] = (0, 0, 0)  # COLOR: the fill; IMAGE + CONTAIN: the bars
    image: np.ndarray | None = None  # IMAGE: uint8 RGB [h, w, 3] at any size
    fit: Fit = Fit.COVER

    def __post_init__(self) -> None:
        # A spec that cannot render is a programming error in the caller, not bad client input.
        if self.mode is BackgroundMode.IMAGE and (self.image is None or self.image.ndim != 3 or self.image.shape[2] != 3):
            raise ValueError("an IMAGE background needs an RGB image [h, w, 3]")

    @property
    def has_alpha(self) -> bool:
        """Whether `render` returns RGBA (4 channels) rather than RGB."""
        return self.mode is BackgroundMode.TRANSPARENT


def parse_color(text: str) -> tuple[int, int, int]:
    """"#RRGGBB", "#RGB" or a CSS basic colour name (case and surrounding blanks ignored) -> RGB.

    Raises ValueError with a message a user can act on for anything else.
    """
    value = text.strip()
    match = _HEX.fullmatch(value)
    if match:
        digits = match.group(1)
        if len(digits) == 3:
            digits = "".join(d * 2 for d in digits)
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    named = CSS_BASIC_COLORS.get(value.lower())
    if named is not None:
        return named
    shown = value if len(value) <= _ECHO_LIMIT else value[:_ECHO_LIMIT] + f"... ({len(value)} characters)"
    raise ValueError(
        f"{shown!r} is not a colour: use \"#RRGGBB\" or \"#RGB\" (hex) or a CSS basic colour name "
        f"({', '.join(sorted(CSS_BASIC_COLORS))})"
    )


def fit_background(
    image_rgb: np.ndarray, width: int, height: int, fit: Fit, bar_color: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """`image_rgb` fitted to a `width` x `height` frame: uint8 RGB [height, width, 3].

    COVER scales by the larger ratio and centre-crops; CONTAIN scales by the smaller ratio and
    centres the picture on `bar_color`. An odd leftover pixel goes right/bottom.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame {width}x{height} has no pixels")
    src_h, src_w = image_rgb.shape[:2]
    cover = fit is Fit.COVER
    scale = (max if cover else min)(width / src_w, height / src_h)
    # One side matches the frame exactly; the clamps only absorb floating-point rounding, so a
    # cover never leaves an unfilled row and a contain never spills over.
    new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    new_w, new_h = (max(width, new_w), max(height, new_h)) if cover else (min(width, new_w), min(height, new_h))
    resized = image_rgb if (new_w, new_h) == (src_w, src_h) else cv2.resize(image_rgb, (new_w, new_h), interpolation=_interpolation(scale))
    if cover:
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return np.ascontiguousarray(resized[top : top + height, left : left + width])
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = bar_color
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def feather(alpha: np.ndarray, radius_px: float) -> np.ndarray:
    """The matte with its edges softened over about `radius_px` pixels (0 = unchanged).

    A Gaussian blur (sigma = radius / 2, kernel truncated at the radius): a hard edge becomes a
    ramp about `2 * radius` wide centred on it, while pixels further than the radius from any
    edge keep exactly 0 or 255. The image border is replicated so a subject cut by the frame
    (a portrait's shoulders) does not fade out at the bottom.
    """
    if not math.isfinite(radius_px) or radius_px < 0:
        raise ValueError(f"feather radius must be a finite number >= 0, got {radius_px}")
    if radius_px == 0:
        return alpha
    half = max(1, math.ceil(radius_px))
    blurred = cv2.GaussianBlur(
        alpha.astype(np.float32), (2 * half + 1, 2 * half + 1), sigmaX=radius_px / 2, borderType=cv2.BORDER_REPLICATE
    )
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def composite(rgb: np.ndarray, alpha: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """out = (rgb * a + background * (255 - a)) / 255, rounded to nearest, uint8 RGB.

    Integer arithmetic: alpha 255 keeps the subject's pixel exactly and alpha 0 gives the
    background's pixel exactly.
    """
    if rgb.shape != background_rgb.shape or rgb.shape[:2] != alpha.shape:
        raise ValueError(f"sizes differ: pixels {rgb.shape}, matte {alpha.shape}, background {background_rgb.shape}")
    a = alpha.astype(np.uint32)[..., None]
    mixed = rgb.astype(np.uint32) * a + background_rgb.astype(np.uint32) * (255 - a)
    # (x + 127) // 255 is round(x / 255): x / 255 is never exactly half-way (255 is odd).
    return ((mixed + 127) // 255).astype(np.uint8)


def render(rgb: np.ndarray, alpha: np.ndarray, spec: BackgroundSpec, feather_px: float = 0.0) -> np.ndarray:
    """The subject with `spec`'s background: RGBA [h, w, 4] for TRANSPARENT, RGB [h, w, 3] otherwise.

    `rgb` and `alpha` are the subject's pixels and matte at the same size (a crop, or the whole
    image); KEEP returns `rgb` untouched (the matte is not used).
    """
    if spec.mode is BackgroundMode.KEEP:
        return rgb
    soft = feather(alpha, feather_px)
    if spec.mode is BackgroundMode.TRANSPARENT:
        return np.dstack((rgb, soft))
    height, width = alpha.shape
    if spec.mode is BackgroundMode.COLOR:
        background = np.empty_like(rgb)
        background[:] = spec.color
    else:
        assert spec.image is not None  # checked in BackgroundSpec
        background = fit_background(spec.image, width, height, spec.fit, spec.color)
    return composite(rgb, soft, background)


def encode_png(pixels: np.ndarray, compression: int = 1) -> bytes:
    """8-bit PNG of grayscale [h, w], RGB [h, w, 3] or RGBA [h, w, 4] pixels (RGB channel order).

    Compression level 1 by default: the output is lossless anyway, and a 1080p picture takes
    several times longer at zlib's default level for a few percent fewer bytes.
    """
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR(A) order
    elif pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    elif pixels.ndim != 2:
        raise ValueError(f"cannot write pixels of shape {pixels.shape} as PNG")
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:  # only for an impossible (empty) image
        raise ValueError(f"PNG encoding of a {pixels.shape} image failed")
    return encoded.tobytes()


def _interpolation(scale: float) -> int:
    # INTER_AREA when shrinking (no aliasing on a photo), bilinear when enlarging.
    return cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
