"""Is this really audio? The talking-video job checks before spending a D-ID call, and the D-ID
emulator checks the same way D-ID would.

WAV is read with the standard library; MP3, M4A, OGG and FLAC are recognised by their magic
bytes and, when PyAV is installed, decoded to prove there is at least one audio frame (and no
video stream: an mp4 clip is not a voice track).
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

__all__ = ["AudioCheck", "NotAudio", "check_audio"]

_MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "m4a": "audio/mp4", "ogg": "audio/ogg", "flac": "audio/flac"}


class NotAudio(ValueError):
    """The bytes are not a usable voice track; the message says why."""


@dataclass(frozen=True)
class AudioCheck:
    format: str  # "wav", "mp3", "m4a", "ogg", "flac"
    # Seconds of audio, or None when PyAV is absent and the format is compressed.
    duration_s: float | None

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self.format]


def check_audio(data: bytes) -> AudioCheck:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as wav:
                frames, rate = wav.getnframes(), wav.getframerate()
        except (wave.Error, EOFError) as exc:
            # Non-PCM WAVs (float, extensible) are left to FFmpeg.
            duration = _probe(data)
            if duration is None:
                raise NotAudio(f"broken WAV file: {exc}") from None
            return AudioCheck("wav", duration)
        if frames <= 0 or rate <= 0:
            raise NotAudio("the WAV file has no samples")
        return AudioCheck("wav", frames / rate)
    fmt = _sniff_compressed(data)
    if fmt is None:
        raise NotAudio("not audio: expected WAV, MP3, M4A, OGG or FLAC")
    try:
        import av  # noqa: F401  (optional dependency)
    except ImportError:
        return AudioCheck(fmt, None)
    duration = _probe(data)
    if duration is None:
        raise NotAudio(f"looks like {fmt.upper()} but does not decode to any audio")
    return AudioCheck(fmt, duration)


def _sniff_compressed(data: bytes) -> str | None:
    if data[:3] == b"ID3":
        return "mp3"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"fLaC":
        return "flac"
    if data[4:8] == b"ftyp":  # MP4 family; the probe then requires an audio-only file.
        return "m4a"
    # MPEG audio frame sync: 11 set bits, a valid layer, a bitrate index that is not "bad".
    if len(data) >= 4 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0 and (data[1] & 0x06) != 0 and (data[2] & 0xF0) != 0xF0:
        return "mp3"
    return None


def _probe(data: bytes) -> float | None:
    """Seconds of decodable audio, or None. Decodes fully (voice tracks are small)."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio or container.streams.video:
                return None
            samples, rate = 0, 0
            for frame in container.decode(audio=0):
                samples += frame.samples
                rate = frame.sample_rate
            return samples / rate if samples and rate else None
    except (av.error.FFmpegError, ValueError, OSError):
        return None
