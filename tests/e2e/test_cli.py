"""The `framewise` console script against the running orchestrator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Orchestrator, free_port
from tests.e2e.test_detect import BUS_PEOPLE, assert_matches

# The console script installed next to the interpreter running the tests (make install).
FRAMEWISE = str(Path(sys.executable).parent / "framewise")


def run(*args: str, server: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FRAMEWISE, "--server", server, *args], capture_output=True, text=True, timeout=120)


def test_detect_json(orchestrator: Orchestrator, assets: Path) -> None:
    result = run("detect", "--json", str(assets / "images" / "bus.jpg"), server=orchestrator.address)
    assert result.returncode == 0, result.stderr
    detections = json.loads(result.stdout)["detections"]
    assert {d["label"] for d in detections} == {"person"}
    assert all(set(d) == {"label", "score", "box"} and 0 < d["score"] <= 1 for d in detections)
    assert_matches([tuple(d["box"]) for d in detections], BUS_PEOPLE)


def test_detect_table(orchestrator: Orchestrator, assets: Path) -> None:
    result = run("detect", str(assets / "images" / "zidane.jpg"), server=orchestrator.address)
    assert result.returncode == 0, result.stderr
    assert "2 detection(s) by yolov8 v1 (real)" in result.stdout
    assert result.stdout.count("person") == 2


def test_environment_variable_names_the_server(orchestrator: Orchestrator) -> None:
    import os

    env = dict(os.environ, FRAMEWISE_SERVER=orchestrator.address)
    result = subprocess.run([FRAMEWISE, "info"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout and "yolov8" in result.stdout and "real" in result.stdout
    assert "matting v1 U2-Netp (real)" in result.stdout  # the Triton name, then the network behind it


def test_info_fails_when_unreachable() -> None:
    result = run("info", server=f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the Framewise service" in result.stderr


def test_bad_input_exit_code(orchestrator: Orchestrator, tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    result = run("detect", str(not_an_image), server=orchestrator.address)
    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr and "not a supported image" in result.stderr
    missing = run("detect", str(tmp_path / "missing.jpg"), server=orchestrator.address)
    assert missing.returncode == 2 and "missing.jpg" in missing.stderr


def test_track_folder_json_and_overlay(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    import cv2

    folder = assets / "sequences" / "Crossing" / "img"
    x, y, w, h = (assets / "sequences" / "Crossing" / "groundtruth_rect.txt").read_text().split("\n")[0].split("\t")
    overlay = tmp_path / "overlay.mp4"
    result = run(
        "track", str(folder), "--box", f"{x},{y},{w},{h}", "--json", "--max-frames", "12", "--overlay", str(overlay),
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["frame"] for line in lines] == list(range(12))
    for line in lines:
        (obj,) = line["objects"]
        assert set(obj) == {"id", "box", "score", "present"} and obj["id"] == 1 and len(obj["box"]) == 4
    capture = cv2.VideoCapture(str(overlay))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    ok, frame = capture.read()
    assert ok and frame.shape == (240, 360, 3)


def test_track_video_file(orchestrator: Orchestrator, assets: Path) -> None:
    result = run(
        "track", str(assets / "videos" / "bedroom.mp4"), "--box", "300,100,200,300", "--max-frames", "4",
        server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 frames in" in result.stdout and "stand-in" in result.stdout
    assert "STAND-INS" in result.stderr


def test_track_bad_box(orchestrator: Orchestrator, assets: Path) -> None:
    result = run("track", str(assets / "videos" / "bedroom.mp4"), "--box", "5000,10,20,20", server=orchestrator.address)
    assert result.returncode == 2
    assert "not inside the 960x540 frame" in result.stderr
