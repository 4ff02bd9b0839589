"""The short forms of a Background (common.proto), shared by every client command and SDK method
that takes one: RemoveBackground (`framewise remove-background`, FramewiseClient.remove_background)
and talking videos (`framewise talking-video`, JobsClient.create_talking_video).

One builder and one command-line parser, so that "--background white" means the same everywhere.
The colour itself is checked by the server (it owns the colour names), not here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from framewise.v1 import common_pb2

BackgroundLike = common_pb2.Background | str | bytes
"""A ready Background; "transparent", "keep" or a colour ("#RRGGBB", "#RGB", "white", ...); or the
bytes of a picture (JPEG/PNG/WebP)."""

FITS = {"cover": common_pb2.BACKGROUND_FIT_COVER, "contain": common_pb2.BACKGROUND_FIT_CONTAIN}
# An option value with one of these suffixes (or a "/") is meant as a picture file: a missing one
# is reported as a missing file, not as the server's "not a colour".
_PICTURE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def background_message(
    background: BackgroundLike | None, *, fit: str = "cover", bar_color: str = ""
) -> common_pb2.Background | None:
    """A Background from its short form (None stays None: the server's default, a transparent
    cut-out). A picture is fitted by `fit` ("cover" or "contain", bars of `bar_color`)."""
    if background is None or isinstance(background, common_pb2.Background):
        return background
    if isinstance(background, (bytes, bytearray, memoryview)):
        if fit not in FITS:
            raise ValueError(f"fit must be 'cover' or 'contain', got {fit!r}")
        return common_pb2.Background(
            mode=common_pb2.BACKGROUND_MODE_IMAGE, image=common_pb2.Image(encoded=bytes(background)), fit=FITS[fit], color=bar_color
        )
    word = background.strip().lower()
    if word == "transparent":
        return common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_TRANSPARENT)
    if word == "keep":
        return common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_KEEP)
    return common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR, color=background)


def add_background_options(parser: argparse.ArgumentParser) -> None:
    """--background, --fit and --bar-color, read back by `background_option`."""
    parser.add_argument(
        "--background",
        default=None,
        metavar="transparent|keep|COLOR|PICTURE",
        help='"transparent" (default: the RGBA cut-out), "keep" (the original pixels), a picture file '
        '(a path that exists), or a colour: "#RRGGBB", "#RGB" or a name such as white',
    )
    parser.add_argument("--fit", choices=tuple(FITS), default="cover", help="how a background picture is fitted (default cover)")
    parser.add_argument("--bar-color", default="", metavar="COLOR", help="with --fit contain: the colour of the bars (default black)")


def background_option(text: str | None) -> str | bytes | None:
    """The value of --background as background_message takes it: an existing file's bytes (a
    picture), else the word or colour as given. A value that can only be a file but names none
    is a ValueError here, rather than the server's "not a colour"."""
    if text is None:
        return None
    picture = Path(text)
    if picture.is_file():
        return picture.read_bytes()
    if picture.suffix.lower() in _PICTURE_SUFFIXES or "/" in text:
        raise ValueError(f"--background {text}: no such file")
    return text
