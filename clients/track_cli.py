"""`framewise track SOURCE --box x,y,w,h`: track one object through a video or a folder of frames.

Video files are decoded here and sent as raw BGR frames (no lossy re-encode); a folder's image
files are sent as they are, in name order. Frames are read only as the server asks for them, so
memory stays flat for any video length.

The session has a key (--session-key, default a new uuid4) sent as x-framewise-session, so a load
balancer keeps it on one replica. When that replica drains (it hands the session to the shared
store) or the connection breaks, the SDK reconnects with the same key and resumes from the frame
the session expects next: the output is the same as without the interruption.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np

from clients.masks import decode_rle
from clients.cli_connection import client_for
from framewise.v1 import common_pb2, tracking_service_pb2 as pb

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    track = commands.add_parser("track", help="track an object through a video file or a folder of frames")
    track.add_argument("source", type=Path, help="video file (mp4, ...) or folder of frames (sorted by name)")
    track.add_argument("--box", required=True, help="x,y,w,h of the object on the first frame, in pixels")
    track.add_argument("--json", action="store_true", help="print one JSON line per frame")
    track.add_argument("--overlay", type=Path, help="write the video with the mask drawn on it (mp4)")
    track.add_argument("--max-frames", type=int, default=0, help="stop after this many frames")
    track.add_argument(
        "--session-key",
        help="name of the tracking session (sent as x-framewise-session, which the load balancer hashes); default: a new uuid4",
    )
    track.add_argument(
        "--reconnect-timeout", type=float, default=60.0,
        help="seconds to keep reconnecting when a replica drains or the connection breaks, resuming the session "
        "where it stopped (0: do not reconnect)",
    )
    track.set_defaults(run=run)


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box must be x,y,w,h (four numbers), got {text!r}") from None
    return x, y, x + w, y + h


def _frames(source: Path) -> Iterator[tuple[common_pb2.Image, np.ndarray | None]]:
    """(image to send, BGR pixels when known locally) per frame."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {source}")
        for path in files:
            yield common_pb2.Image(encoded=path.read_bytes()), None
        return
    if not source.exists():
        raise ValueError(f"{source} does not exist")
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise ValueError(f"{source} is not a video OpenCV can decode")
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            raw = common_pb2.RawFrame(width=bgr.shape[1], height=bgr.shape[0], pixel_format=common_pb2.PIXEL_FORMAT_BGR8, data=bgr.tobytes())
            yield common_pb2.Image(raw=raw), bgr
    finally:
        capture.release()


async def run(args: argparse.Namespace) -> int:
    x1, y1, x2, y2 = _parse_box(args.box)
    frames = _frames(args.source)
    # Frames waiting for their result, kept only for the overlay (the server answers in order and
    # reads ahead by at most a frame or two, so this stays small).
    pending: dict[int, np.ndarray | None] = {}

    def requests() -> Iterator[pb.TrackFrame]:
        for index, (image, bgr) in enumerate(frames):
            if args.max_frames and index >= args.max_frames:
                return
            if args.overlay:
                pending[index] = bgr
            frame = pb.TrackFrame(image=image)
            if index == 0:
                frame.prompts.add(object_id=1, box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2))
            yield frame

    writer: _Overlay | None = _Overlay(args.overlay) if args.overlay else None
    started, count, present, stand_in = time.monotonic(), 0, 0, False
    def reconnecting(attempt: int, error: grpc.aio.AioRpcError) -> None:
        if attempt == 1:
            note = f"\nthe stream ended ({error.code().name}: {(error.details() or '')[:200]}); resuming the session"
            print(note, file=sys.stderr, flush=True)

    async with client_for(args) as client:
        responses = client.track(
            requests(), session_key=args.session_key, reconnect_timeout_s=args.reconnect_timeout, on_reconnect=reconnecting
        )
        async for response in responses:
            if response.WhichOneof("message") == "session":
                stand_in = any(m.stand_in for m in response.session.models)
                if stand_in and not args.json:
                    print("note: the server's SAM 2 models are STAND-INS (contract models): masks carry no learned meaning", file=sys.stderr)
                continue
            result = response.frame
            count += 1
            present += sum(o.present for o in result.objects)
            if args.json:
                print(json.dumps({"frame": result.frame_index, "objects": [_object_json(o) for o in result.objects]}), flush=True)
            else:
                _progress(count, time.monotonic() - started)
            if writer is not None:
                writer.write(pending.pop(result.frame_index, None), result, args.source)
    if writer is not None:
        writer.close()
    elapsed = time.monotonic() - started
    if not args.json:
        print(file=sys.stderr)
        print(
            f"{count} frames in {elapsed:.1f} s ({count / elapsed if elapsed else 0:.1f} frames/s); "
            f"object present in {present} of {count} frames" + (" (stand-in models)" if stand_in else "")
        )
        if args.overlay:
            print(f"overlay written to {args.overlay}")
    return 0


def _object_json(obj: pb.ObjectResult) -> dict[str, object]:
    box = [round(v, 1) for v in (obj.box.x1, obj.box.y1, obj.box.x2, obj.box.y2)]
    return {"id": obj.object_id, "box": box, "score": round(obj.predicted_iou, 4), "present": obj.present}


def _progress(count: int, elapsed: float) -> None:
    rate = count / elapsed if elapsed > 0 else 0.0
    print(f"\rtracking: {count} frames, {rate:.1f} frames/s", end="", file=sys.stderr, flush=True)


class _Overlay:
    """The frames with each object's mask tinted and its box drawn, as an mp4."""

    _COLOURS = [(255, 144, 30), (60, 180, 75), (0, 130, 245), (180, 30, 145), (200, 200, 0)]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: cv2.VideoWriter | None = None
        self.folder_files: list[Path] | None = None

    def write(self, bgr: np.ndarray | None, result: pb.FrameResult, source: Path) -> None:
        if bgr is None:  # a folder of frames: read the file back
            if self.folder_files is None:
                self.folder_files = sorted(p for p in source.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            bgr = cv2.imread(str(self.folder_files[result.frame_index]))
        canvas = bgr.copy()
        for obj in result.objects:
            colour = self._COLOURS[obj.object_id % len(self._COLOURS)]
            mask = decode_rle(obj.mask)
            canvas[mask] = (0.5 * canvas[mask] + 0.5 * np.array(colour)).astype(np.uint8)
            if obj.present:
                cv2.rectangle(canvas, (int(obj.box.x1), int(obj.box.y1)), (int(obj.box.x2), int(obj.box.y2)), colour, 2)
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (canvas.shape[1], canvas.shape[0]))
        self.writer.write(canvas)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
