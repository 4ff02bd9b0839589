"""Writes the ghz call data for framewise.v1.VisionService/Detect: one image as a DetectRequest.

The file is the request in the proto3 JSON mapping, which is what ghz's `--data-file` takes:
bytes fields are base64, field names lowerCamelCase, for example

    {"image": {"encoded": "/9j/4AAQ..."}, "confidenceThreshold": 0.25}

Run it from the repository root (the ghz configs in this folder name the default output):

    .venv/bin/python clients/ghz/make_data.py                      # -> clients/ghz/data/detect_bus.json
    .venv/bin/python clients/ghz/make_data.py --image photo.jpg --confidence 0.4

It also writes clients/ghz/data/metadata.json, the request metadata every config sends
("metadata-file"): {"authorization": "Bearer <key>"} when FRAMEWISE_API_KEY is set (readable by
its owner only, in the git-ignored data folder: the key stays off the command line and out of
the configs), else {} for a server without authentication.

Standard library only, so it also runs outside the project's virtual environment.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

GHZ_DIR = Path(__file__).resolve().parent
REPO = GHZ_DIR.parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "assets" / "images" / "bus.jpg"
DATA_DIR = GHZ_DIR / "data"  # git-ignored: generated, never committed
METADATA_FILE = DATA_DIR / "metadata.json"
API_KEY_ENV = "FRAMEWISE_API_KEY"


def default_output(image: Path) -> Path:
    return DATA_DIR / f"detect_{image.stem}.json"


def detect_request(image: Path, confidence: float | None = None, iou: float | None = None) -> dict:
    """The DetectRequest for `image` as a proto3 JSON object; unset thresholds keep the server's defaults."""
    request: dict = {"image": {"encoded": base64.b64encode(image.read_bytes()).decode("ascii")}}
    if confidence is not None:
        request["confidenceThreshold"] = confidence
    if iou is not None:
        request["iouThreshold"] = iou
    return request


def write_data_file(
    image: Path = DEFAULT_IMAGE, out: Path | None = None, confidence: float | None = None, iou: float | None = None
) -> Path:
    out = out if out is not None else default_output(image)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(detect_request(image, confidence, iou)) + "\n")
    return out


def request_metadata(api_key: str | None) -> dict[str, str]:
    """The metadata ghz sends with every call: the API key as a bearer credential, if any."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def write_metadata_file(api_key: str | None, out: Path = METADATA_FILE) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Created owner-only before the key is written into it.
    out.touch(mode=0o600, exist_ok=True)
    out.chmod(0o600)
    out.write_text(json.dumps(request_metadata(api_key)) + "\n")
    return out


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a ghz data file (DetectRequest as proto3 JSON) for one image.")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=f"JPEG/PNG/WebP image (default: {DEFAULT_IMAGE})")
    p.add_argument("--out", type=Path, help="output file (default: clients/ghz/data/detect_<image stem>.json)")
    p.add_argument("--confidence", type=_unit_interval, help="confidence_threshold, in [0, 1] (server default 0.25)")
    p.add_argument("--iou", type=_unit_interval, help="iou_threshold, in [0, 1] (server default 0.45)")
    args = p.parse_args(argv)
    if not args.image.is_file():
        print(f"make_data: no such image: {args.image}", file=sys.stderr)
        return 2
    out = write_data_file(args.image, args.out, args.confidence, args.iou)
    print(f"wrote {out} ({out.stat().st_size} bytes) from {args.image}")
    api_key = os.environ.get(API_KEY_ENV) or None
    metadata = write_metadata_file(api_key)
    print(f"wrote {metadata}: " + (f"authorization from {API_KEY_ENV}" if api_key else f"no credentials ({API_KEY_ENV} is not set)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
