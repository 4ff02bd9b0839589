"""The voice-track check (server/media/audio.py): what a talking video accepts as audio, and the
duration it reports, computed from the samples that are really there, never from a header."""

from __future__ import annotations

import struct

import pytest

from server.media.audio import NotAudio, check_audio
from tests.unit.test_did import tone_wav


def wav_header(
    *, data_bytes_claimed: int, rate: int = 16000, channels: int = 1, bits: int = 16, fmt_tag: int = 1
) -> bytes:
    """A canonical 44-byte RIFF/WAVE header whose data chunk claims ``data_bytes_claimed``."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes_claimed) + b"WAVE"
        + b"fmt " + struct.pack("<I", 16) + fmt
        + b"data" + struct.pack("<I", data_bytes_claimed)
    )


def test_a_real_tone_reports_its_duration() -> None:
    checked = check_audio(tone_wav(1.5))
    assert checked.format == "wav" and checked.media_type == "audio/wav"
    assert checked.duration_s == pytest.approx(1.5, abs=1e-3)


def test_a_header_only_wav_claiming_two_seconds_is_refused() -> None:
    # 16 kHz mono 16-bit: 64000 data bytes would be 2.0 s, but none follow the header.
    header = wav_header(data_bytes_claimed=64000)
    assert len(header) == 44
    with pytest.raises(NotAudio, match="no audio samples"):
        check_audio(header)


@pytest.mark.parametrize("fmt_tag", [1, 3])  # PCM, IEEE float: the same chunk arithmetic
def test_a_header_with_an_empty_data_chunk_is_refused(fmt_tag: int) -> None:
    bits = 16 if fmt_tag == 1 else 32
    with pytest.raises(NotAudio, match="no audio samples"):
        check_audio(wav_header(data_bytes_claimed=0, fmt_tag=fmt_tag, bits=bits))


def test_a_truncated_wav_reports_the_samples_it_has() -> None:
    # The header claims 2.0 s; 0.5 s of samples follow (a cut-off upload): 0.5 s it is.
    samples = tone_wav(0.5)[44:]
    checked = check_audio(wav_header(data_bytes_claimed=64000) + samples)
    assert checked.duration_s == pytest.approx(0.5, abs=1e-3)


def test_a_float_wav_is_measured_from_its_data_chunk() -> None:
    # 8000 Hz stereo float32: 8 bytes a frame; 4000 frames = 0.5 s.
    data = b"\x00\x00\x80\x3e" * 2 * 4000
    checked = check_audio(wav_header(data_bytes_claimed=len(data), rate=8000, channels=2, bits=32, fmt_tag=3) + data)
    assert checked.format == "wav" and checked.duration_s == pytest.approx(0.5, abs=1e-3)


def test_chunks_before_the_data_chunk_are_skipped() -> None:
    # A LIST chunk between fmt and data (as many editors write), odd-sized to exercise the pad byte.
    wav = tone_wav(0.25)
    extra = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\x00"
    doctored = wav[:36] + extra + wav[36:]
    doctored = doctored[:4] + struct.pack("<I", len(doctored) - 8) + doctored[8:]
    assert check_audio(doctored).duration_s == pytest.approx(0.25, abs=1e-3)


@pytest.mark.parametrize(
    "data",
    [
        b"RIFF\x00\x00\x00\x00WAVEjunk",  # no chunks at all
        b"RIFF" + struct.pack("<I", 4) + b"WAVE",  # nothing after the form type
        wav_header(data_bytes_claimed=64000)[:36] + b"\x00" * 4000,  # fmt but no data chunk
    ],
)
def test_broken_wavs_are_refused(data: bytes) -> None:
    with pytest.raises(NotAudio):
        check_audio(data)


def test_not_audio_at_all_is_refused() -> None:
    with pytest.raises(NotAudio, match="expected WAV"):
        check_audio(b"\x00" * 4096)
