"""Video probing, sampling plans, sampled decoding, artifact writers and RLE decoding. No Triton."""

from __future__ import annotations

import fractions
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from server.media import video_reader
from server.media.video_reader import (
    BACKEND_OPENCV,
    BACKEND_PYAV,
    UnreadableVideo,
    check_first_frame,
    plan_fps,
    probe_video,
    read_frames,
    sampling_plan,
)
from server.media.video_writers import (
    CODEC_H264,
    CODEC_MP4V,
    FramesJsonWriter,
    MaskVideoWriter,
    MaskZipWriter,
    OverlayWriter,
    draw_overlay,
    label_mask,
    mask_png_name,
)
from server.vision import rle

try:
    import av
except ImportError:  # PyAV is a dev extra; the server runs without it
    av = None
needs_av = pytest.mark.skipif(av is None, reason="PyAV is not installed")

VIDEOS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "videos"
BEDROOM = VIDEOS / "bedroom.mp4"


def _cv2_facts(path: Path) -> tuple[float, int, int, int]:
    capture = cv2.VideoCapture(str(path))
    try:
        return (
            capture.get(cv2.CAP_PROP_FPS),
            int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        capture.release()


def _sequential(path: Path, count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    for _ in range(count):
        ok, frame = capture.read()
        assert ok
        frames.append(frame)
    capture.release()
    return frames


def _h264_mkv(path: Path, count: int, size: tuple[int, int] = (64, 48)) -> None:
    """A Matroska file: its header states no frame count."""
    width, height = size
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i * 5, np.uint8), format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------- probe


@pytest.mark.parametrize("name", ["bedroom.mp4", "05_default_juggle.mp4"])
def test_probe_matches_opencv(name: str) -> None:
    info = probe_video(VIDEOS / name)
    fps, count, width, height = _cv2_facts(VIDEOS / name)
    assert (info.fps, info.frame_count, info.width, info.height) == (fps, count, width, height)
    assert info.backend == BACKEND_OPENCV
    assert info.duration_s == pytest.approx(count / fps)


def test_probe_count_is_exact() -> None:
    capture = cv2.VideoCapture(str(BEDROOM))
    decoded = 0
    while capture.grab():
        decoded += 1
    capture.release()
    assert probe_video(BEDROOM).frame_count == decoded == 200


@needs_av
@pytest.mark.parametrize("with_pyav", [True, False])
def test_probe_counts_frames_when_the_container_does_not_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_pyav: bool
) -> None:
    path = tmp_path / "clip.mkv"
    _h264_mkv(path, 37)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # really not in the header
    if not with_pyav:  # OpenCV alone: counted by decoding
        monkeypatch.setattr(video_reader, "import_av", lambda: None)
    info = probe_video(path)
    assert (info.frame_count, info.width, info.height, info.fps) == (37, 64, 48, 25.0)


@needs_av
def test_probe_falls_back_to_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> video_reader.VideoInfo:
        raise UnreadableVideo("OpenCV says no")

    monkeypatch.setattr(video_reader, "_probe_opencv", refuse)
    info = probe_video(BEDROOM)
    assert info.backend == BACKEND_PYAV
    assert (info.fps, info.frame_count, info.width, info.height) == (30.0, 200, 960, 540)
    frames = list(read_frames(BEDROOM, [0, 3], backend=info.backend))
    assert [i for i, _ in frames] == [0, 3]
    reference = _sequential(BEDROOM, 4)
    for (_, frame), expected in zip(frames, (reference[0], reference[3]), strict=True):
        assert frame.shape == (540, 960, 3) and frame.dtype == np.uint8
        # Two FFmpeg builds convert YUV to BGR slightly differently; the picture is the same.
        assert np.abs(frame.astype(int) - expected.astype(int)).mean() < 3


# ---------------------------------------------------------------------------------- corrupt input


def test_random_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(UnreadableVideo, match="re-encode"):
        probe_video(path)


def test_truncated_mp4_is_rejected(tmp_path: Path) -> None:
    data = BEDROOM.read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])  # the moov atom sits at the end of this file
    with pytest.raises(UnreadableVideo, match="corrupt or truncated|could not be decoded"):
        probe_video(path)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UnreadableVideo, match="does not exist"):
        probe_video(tmp_path / "nothing.mp4")


def test_damage_in_the_middle_fails_the_read(tmp_path: Path) -> None:
    data = bytearray(BEDROOM.read_bytes())
    data[300_000:400_000] = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    info = probe_video(path)  # the header is intact
    assert info.frame_count == 200
    with pytest.raises(UnreadableVideo, match="truncated or corrupt"):
        for _ in read_frames(path, range(info.frame_count)):
            pass


# ---------------------------------------------------------------------------------- plan


def test_plan_every_frame() -> None:
    assert sampling_plan(30.0, 200) == list(range(200))
    assert sampling_plan(30.0, 200, sample_fps=30.0) == list(range(200))
    assert sampling_plan(30.0, 200, sample_fps=60.0) == list(range(200))  # never upsamples
    assert sampling_plan(30.0, 0) == []


def test_plan_halves_the_rate() -> None:
    plan = sampling_plan(30.0, 200, sample_fps=15.0)
    assert plan == list(range(0, 200, 2))
    assert plan_fps(30.0, 200, len(plan)) == pytest.approx(15.0)
    # Non-integer ratios: the nearest frame to each tick, evenly by time.
    plan = sampling_plan(24.0, 247, sample_fps=10.0)
    assert len(plan) == 103  # ceil(247 / 24 * 10) ticks
    times = np.array(plan) / 24.0
    assert np.abs(times - np.arange(len(plan)) / 10.0).max() <= 0.5 / 24.0 + 1e-9


def test_plan_caps_frames_evenly() -> None:
    plan = sampling_plan(30.0, 200, max_frames=12)
    assert len(plan) == 12 and plan[0] == 0 and plan == sorted(set(plan))
    assert np.diff(plan).min() >= 16 and np.diff(plan).max() <= 17  # spread over the whole video
    both = sampling_plan(30.0, 200, sample_fps=15.0, max_frames=10)
    assert len(both) == 10 and set(both) <= set(range(0, 200, 2))
    assert sampling_plan(30.0, 5, max_frames=12) == [0, 1, 2, 3, 4]


def test_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sampling_plan(30.0, 10, sample_fps=-1.0)
    with pytest.raises(ValueError):
        sampling_plan(30.0, 10, sample_fps=float("nan"))
    with pytest.raises(ValueError):
        sampling_plan(30.0, 10, max_frames=-1)


# ---------------------------------------------------------------------------------- decode


def test_read_frames_gives_exactly_the_planned_frames() -> None:
    wanted = [0, 1, 5, 17]
    reference = _sequential(BEDROOM, 18)
    frames = list(read_frames(BEDROOM, wanted))
    assert [i for i, _ in frames] == wanted
    for index, frame in frames:
        np.testing.assert_array_equal(frame, reference[index])
    np.testing.assert_array_equal(check_first_frame(BEDROOM), reference[0])


def test_read_frames_checks_indices_and_the_end() -> None:
    with pytest.raises(ValueError):
        read_frames(BEDROOM, [3, 2])
    with pytest.raises(UnreadableVideo, match="frame 205 was needed"):
        list(read_frames(BEDROOM, [198, 205]))


# ---------------------------------------------------------------------------------- writers


def _masks(count: int, height: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    out = []
    for i in range(count):
        mask = np.zeros((height, width), np.uint8)
        mask[5 + i : 20 + i, 3 : 30 - i] = 255
        mask[rng.random((height, width)) < 0.02] = 7  # odd values survive too (object ids)
        out.append(mask)
    return out


def test_label_mask_values() -> None:
    a = np.zeros((4, 5), bool)
    a[:2] = True
    b = np.zeros((4, 5), bool)
    b[1:3] = True
    assert set(np.unique(label_mask([(1, a)], 4, 5))) == {0, 255}
    labels = label_mask([(3, b), (2, a)], 4, 5)
    assert labels[0, 0] == 2 and labels[1, 0] == 3 and labels[2, 0] == 3 and labels[3, 0] == 0  # higher id wins
    with pytest.raises(ValueError):
        label_mask([(1, a), (300, b)], 4, 5)


@needs_av
def test_ffv1_mask_video_is_lossless(tmp_path: Path) -> None:
    path = tmp_path / "masks.mkv"
    masks = _masks(5, 41, 37)  # odd sizes on purpose
    with MaskVideoWriter(path, 37, 41, 30000 / 1001) as writer:  # NTSC, as OpenCV reports it
        for mask in masks:
            writer.write(mask)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "ffv1"
        assert stream.average_rate == fractions.Fraction(30000, 1001)
        decoded = [frame.to_ndarray(format="gray") for frame in container.decode(stream)]
    assert len(decoded) == len(masks)
    for got, expected in zip(decoded, masks, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_mask_zip_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "masks.zip"
    masks = _masks(3, 20, 30)
    indices = [0, 7, 14]
    with MaskZipWriter(path) as writer:
        for index, mask in zip(indices, masks, strict=True):
            writer.write(index, mask)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == [mask_png_name(i) for i in indices] == ["000000.png", "000007.png", "000014.png"]
        for name, expected in zip(archive.namelist(), masks, strict=True):
            png = np.frombuffer(archive.read(name), np.uint8)
            decoded = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)
            assert decoded.dtype == np.uint8 and decoded.ndim == 2
            np.testing.assert_array_equal(decoded, expected)
    first = path.read_bytes()
    with MaskZipWriter(path) as writer:  # the same frames give the same bytes
        for index, mask in zip(indices, masks, strict=True):
            writer.write(index, mask)
    assert path.read_bytes() == first


@needs_av
@pytest.mark.parametrize("codec", [CODEC_H264, CODEC_MP4V])
def test_overlay_mp4_is_readable(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "overlay.mp4"
    height, width = 41, 37
    frames = [np.full((height, width, 3), 40 * i, np.uint8) for i in range(6)]
    mask = np.zeros((height, width), bool)
    mask[10:30, 5:20] = True
    with OverlayWriter(path, width, height, 15.0, codec=codec) as writer:
        for frame in frames:
            writer.write(draw_overlay(frame, [(1, mask, (5.0, 10.0, 20.0, 30.0), True)]))
    assert writer.codec == codec
    assert (writer.width, writer.height) == (38, 42)  # 4:2:0 needs even sizes: padded
    fps, count, out_width, out_height = _cv2_facts(path)
    assert (count, out_width, out_height, fps) == (6, 38, 42, 15.0)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == ("h264" if codec == CODEC_H264 else "mpeg4")


@needs_av
def test_overlay_prefers_h264(tmp_path: Path) -> None:
    with OverlayWriter(tmp_path / "o.mp4", 32, 32, 10.0) as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
    assert writer.codec == CODEC_H264


def test_draw_overlay_tints_only_the_mask() -> None:
    frame = np.full((20, 20, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = draw_overlay(frame, [(1, mask, (0.0, 0.0, 0.0, 0.0), False)])
    assert (out[0, 0] == 100).all() and not (out[10, 10] == 100).all()
    assert (frame == 100).all()  # the input is left alone


def test_frames_json_shape(tmp_path: Path) -> None:
    path = tmp_path / "frames.json"
    records = [
        {
            "frame_index": i,
            "source_frame_index": 2 * i,
            "time_s": 2 * i / 30,
            "objects": [
                {
                    "id": 1,
                    "box": [1.0, 2.0, 3.0, 4.0],
                    "score": 0.9,
                    "present": True,
                    "object_score": 3.5,
                    "kalman_selected": False,
                }
            ],
        }
        for i in range(3)
    ]
    with FramesJsonWriter(path) as writer:
        for record in records:
            writer.write(record)
    assert json.loads(path.read_text()) == records
    with FramesJsonWriter(tmp_path / "empty.json"):
        pass
    assert json.loads((tmp_path / "empty.json").read_text()) == []


# ---------------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("seed", range(12))
def test_rle_decode_matches_pycocotools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 120, 2))
    mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
    if seed % 3 == 0:  # a blob, the usual shape of an object
        mask[:] = 0
        mask[height // 4 : height // 2 + 1, width // 3 : width // 3 * 2 + 1] = 1
    if seed % 4 == 1:
        mask[:] = seed % 2
    encoded = coco_mask.encode(np.asfortranarray(mask))
    counts = encoded["counts"].decode()
    np.testing.assert_array_equal(rle.decode(counts, height, width), coco_mask.decode(encoded).astype(bool))
    assert rle.encode(rle.decode(counts, height, width)) == counts


def test_rle_decode_large_mask() -> None:
    mask = np.zeros((540, 960), np.uint8)
    mask[100:400, 200:700] = 1
    counts = coco_mask.encode(np.asfortranarray(mask))["counts"].decode()
    np.testing.assert_array_equal(rle.decode(counts, 540, 960), mask.astype(bool))


def test_rle_decode_rejects_wrong_sizes() -> None:
    counts = rle.encode(np.ones((4, 4), bool))
    with pytest.raises(ValueError):
        rle.decode(counts, 5, 4)
    with pytest.raises(ValueError):
        rle.decode("", 2, 2)
    with pytest.raises(ValueError):
        rle.decode("\x7f", 2, 2)
