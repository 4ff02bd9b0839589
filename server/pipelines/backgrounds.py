"""framewise.v1.Background -> server.vision.compositing.BackgroundSpec, or a clear INVALID_ARGUMENT.

Shared by RemoveBackground and the talking-video job. Decoding a background picture is CPU
work: call `resolve_background` through asyncio.to_thread.
"""

from __future__ import annotations

from framewise.v1 import common_pb2
from server.errors import InvalidInput
from server.vision.compositing import BackgroundMode, BackgroundSpec, Fit, parse_color
from server.vision.image_decode import decode_image

_MODES = {
    common_pb2.BACKGROUND_MODE_KEEP: BackgroundMode.KEEP,
    common_pb2.BACKGROUND_MODE_TRANSPARENT: BackgroundMode.TRANSPARENT,
    common_pb2.BACKGROUND_MODE_COLOR: BackgroundMode.COLOR,
    common_pb2.BACKGROUND_MODE_IMAGE: BackgroundMode.IMAGE,
}
_FITS = {
    common_pb2.BACKGROUND_FIT_UNSPECIFIED: Fit.COVER,
    common_pb2.BACKGROUND_FIT_COVER: Fit.COVER,
    common_pb2.BACKGROUND_FIT_CONTAIN: Fit.CONTAIN,
}
_BLACK = (0, 0, 0)


def background_mode(background: common_pb2.Background, default: BackgroundMode, field: str = "background") -> BackgroundMode:
    """The requested mode (`default` when unset), without decoding anything."""
    if background.mode == common_pb2.BACKGROUND_MODE_UNSPECIFIED:
        return default
    mode = _MODES.get(background.mode)
    if mode is None:
        raise InvalidInput(
            f"{field}.mode {background.mode} is not a BackgroundMode: use BACKGROUND_MODE_KEEP, _TRANSPARENT, _COLOR or _IMAGE",
            f"{field}.mode",
        )
    return mode


def resolve_background(
    background: common_pb2.Background,
    *,
    default_mode: BackgroundMode,
    max_pixels: int,
    field: str = "background",
    uploaded_image: bytes | None = None,
) -> BackgroundSpec:
    """Validate `background` and decode its picture (same limits as a request's main image).

    `uploaded_image`: the bytes of `image_upload_id`, resolved by a caller that supports uploads
    (a job); without it an upload id is refused (an RPC has no upload store).
    """
    mode = background_mode(background, default_mode, field)
    fit = _FITS.get(background.fit)
    if fit is None:
        raise InvalidInput(
            f"{field}.fit {background.fit} is not a BackgroundFit: use BACKGROUND_FIT_COVER or BACKGROUND_FIT_CONTAIN",
            f"{field}.fit",
        )
    source = background.WhichOneof("image_source")
    mode_name = common_pb2.BackgroundMode.Name(proto_mode(mode))
    if source is not None and mode is not BackgroundMode.IMAGE:
        raise InvalidInput(
            f"{field}.{source} is set but the mode is {mode_name}: set {field}.mode to BACKGROUND_MODE_IMAGE "
            "to use a picture, or leave the picture out",
            f"{field}.{source}",
        )
    if background.color and mode not in (BackgroundMode.COLOR, BackgroundMode.IMAGE):
        raise InvalidInput(
            f"{field}.color is set but the mode is {mode_name}: a colour is used by BACKGROUND_MODE_COLOR "
            "(the fill) and BACKGROUND_MODE_IMAGE (the bars of a contain fit)",
            f"{field}.color",
        )
    color = _color(background.color, field) if background.color else None

    if mode is BackgroundMode.COLOR:
        if color is None:
            raise InvalidInput(
                f"{field}.color is required with BACKGROUND_MODE_COLOR: \"#RRGGBB\", \"#RGB\" or a colour name such as \"white\"",
                f"{field}.color",
            )
        return BackgroundSpec(mode, color=color)
    if mode is BackgroundMode.IMAGE:
        if source == "image_upload_id":
            if uploaded_image is None:
                raise InvalidInput(
                    f"{field}.image_upload_id is for jobs only (this call has no upload store): send the picture's "
                    f"bytes in {field}.image.encoded",
                    f"{field}.image_upload_id",
                )
            image = common_pb2.Image(encoded=uploaded_image)
            image_field = f"{field}.image_upload_id"
        elif source == "image":
            image, image_field = background.image, f"{field}.image"
        else:
            raise InvalidInput(
                f"{field}.image is required with BACKGROUND_MODE_IMAGE: send the picture's bytes in {field}.image.encoded",
                f"{field}.image",
            )
        decoded = decode_image(image, max_pixels=max_pixels, field=image_field)
        return BackgroundSpec(mode, color=color or _BLACK, image=decoded.rgb, fit=fit)
    return BackgroundSpec(mode)


def proto_mode(mode: BackgroundMode) -> common_pb2.BackgroundMode.ValueType:
    """The wire value of a resolved mode (for responses and results)."""
    return next(number for number, value in _MODES.items() if value is mode)


def _color(text: str, field: str) -> tuple[int, int, int]:
    try:
        return parse_color(text)
    except ValueError as error:
        raise InvalidInput(f"{field}.color: {error}", f"{field}.color") from None
