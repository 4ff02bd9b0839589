"""Is this really audio? The talking-video job checks before spending a D-ID call, and the D-ID
emulator checks the same way D-ID would.

WAV is measured from its chunks: the duration is the bytes really present in the ``data`` chunk
divided by the frame size, never the size the header announces (a 44-byte header that claims
2 s of samples has none: it is refused here, at submit, instead of failing later at D-ID).
Compressed WAV codecs (ADPCM, MP3-in-WAV) are decoded with PyAV. MP3, M4A, OGG and FLAC are
recognised by their magic bytes and, when PyAV is installed, decoded to prove there is at least
one audio frame (and no video stream: an mp4 clip is not a voice track).
"""

from __future__ import annotations

import io
import struct
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
        return AudioCheck("wav", _wav_duration(data))
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


# WAVE format tags whose frames all have the fmt chunk's block_align bytes: PCM, IEEE float,
# A-law, mu-law. Any other tag is a compressed codec, measured by decoding it.
_FIXED_FRAME_TAGS = frozenset({0x0001, 0x0003, 0x0006, 0x0007})
_EXTENSIBLE = 0xFFFE


def _wav_chunks(data: bytes) -> dict[bytes, bytes]:
    """The RIFF/WAVE file's chunks by id (the first of each), each cut to the bytes present: a
    chunk whose size runs past the end of the file (a truncated upload, or a streaming writer
    that never filled in the size) holds what is there."""
    chunks: dict[bytes, bytes] = {}
    position = 12
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4]
        (size,) = struct.unpack_from("<I", data, position + 4)
        body = data[position + 8 : position + 8 + size]
        chunks.setdefault(chunk_id, body)
        position += 8 + size + (size & 1)  # chunks are padded to an even size
    return chunks


def _wav_duration(data: bytes) -> float:
    """Seconds of samples actually present in a WAV file, or NotAudio saying what is missing."""
    chunks = _wav_chunks(data)
    fmt = chunks.get(b"fmt ")
    if fmt is None or len(fmt) < 16:
        raise NotAudio("broken WAV file: no 'fmt ' chunk describing the samples")
    tag, channels, rate, _byte_rate, block_align = struct.unpack_from("<HHIIH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        (tag,) = struct.unpack_from("<H", fmt, 24)  # the sub-format GUID starts with the real tag
    if channels == 0 or rate == 0:
        raise NotAudio(f"broken WAV file: {channels} channels at {rate} Hz")
    samples = chunks.get(b"data")
    if not samples:
        raise NotAudio(
            "the WAV file has no audio samples: its data chunk is empty or missing "
            "(a header alone is not a voice track)"
        )
    if tag not in _FIXED_FRAME_TAGS:
        duration = _probe(data)
        if duration is None:
            raise NotAudio(f"the WAV file's codec (format tag {tag:#06x}) does not decode to any audio")
        return duration
    if block_align == 0:
        raise NotAudio("broken WAV file: its fmt chunk gives a frame size of 0 bytes")
    frames = len(samples) // block_align
    if frames == 0:
        raise NotAudio("the WAV file has no audio samples: its data chunk holds less than one frame")
    return frames / rate


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
