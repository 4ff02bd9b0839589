"""Checks that uploads are really an image / really audio, and renders a talk as a real mp4.

The "talk" is the uploaded photo held still for the length of the audio (H.264, yuv420p, 25 fps)
with the uploaded audio muxed in as AAC, via PyAV (which bundles FFmpeg). No lip sync: the point
is a file with the shape, duration and streams a D-ID result has.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from server.media.audio import NotAudio, check_audio as check_voice_track

FPS = 25
MAX_SIDE = 1920  # D-ID caps output resolution; keeps the emulator's encoding bounded.
AUDIO_RATE = 44100


class MediaError(ValueError):
    """The bytes are not what the field says (message is for the API's 400 description)."""


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) if ``data`` decodes as an image with OpenCV, else MediaError."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise MediaError("the 'image' file is not a decodable image (expected JPEG or PNG)")
    height, width = image.shape[:2]
    return width, height


def check_audio(data: bytes) -> float:
    """Duration in seconds if ``data`` is a voice track D-ID would take, else MediaError."""
    try:
        checked = check_voice_track(data)
    except NotAudio as exc:
        raise MediaError(f"the 'audio' file: {exc}") from None
    assert checked.duration_s is not None  # PyAV is a dependency of the emulator
    return checked.duration_s


def _even_frame(image: np.ndarray) -> np.ndarray:
    """Scale down to MAX_SIDE and pad by edge replication to even sides (yuv420p needs them)."""
    height, width = image.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    if scale < 1.0:
        image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        height, width = image.shape[:2]
    return cv2.copyMakeBorder(image, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)


def render_talk(image_path: Path, audio_path: Path, out_path: Path) -> None:
    """Write an mp4: the still image for the audio's duration, with the audio as AAC."""
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"cannot read the uploaded image {image_path.name}")
    rgb = cv2.cvtColor(_even_frame(image), cv2.COLOR_BGR2RGB)
    tmp_path = out_path.with_suffix(".part")
    with av.open(str(audio_path)) as source, av.open(str(tmp_path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height = rgb.shape[1], rgb.shape[0]
        video.pix_fmt = "yuv420p"
        # One encoder thread: x264 would otherwise burst on every core of the host, and the
        # emulator stands in for a remote service that takes none of the service's cores.
        video.options = {"preset": "veryfast", "crf": "23", "tune": "stillimage", "threads": "1"}
        video.codec_context.thread_count = 1
        audio = out.add_stream("aac", rate=AUDIO_RATE)
        audio.layout = "mono"
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE)
        samples = 0
        for frame in source.decode(audio=0):
            frame.pts = None
            for resampled in resampler.resample(frame):
                samples += resampled.samples
                out.mux(audio.encode(resampled))
        for resampled in resampler.resample(None):
            samples += resampled.samples
            out.mux(audio.encode(resampled))
        out.mux(audio.encode(None))
        if samples == 0:
            raise MediaError(f"the uploaded audio {audio_path.name} has no samples")
        n_frames = max(1, round(samples / AUDIO_RATE * FPS))
        still = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for index in range(n_frames):
            still.pts = index
            still.time_base = Fraction(1, FPS)
            out.mux(video.encode(still))
        out.mux(video.encode(None))
    tmp_path.replace(out_path)
