"""`framewise remove-background` against the running orchestrator: files written, the summary
line, and refused calls (status code name on stderr, non-zero exit)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tests.conftest import Orchestrator
from tests.e2e.test_cli import run

GIRL_SIZE = (600, 399)


def _read(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert pixels is not None, f"{path} is not a readable image"
    return pixels


def test_cut_out_alpha_and_colour(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    girl = assets / "images" / "girl-1.jpg"
    cut = run("remove-background", str(girl), "-o", str(tmp_path / "cut.png"), server=orchestrator.address)
    assert cut.returncode == 0, cut.stderr
    line = cut.stdout.strip()
    assert "\n" not in line and "600x399 RGBA cut-out, background transparent" in line
    assert ("(real)" in line) != ("(STAND-IN)" in line) and " ms (decode " in line
    bgra = _read(tmp_path / "cut.png")
    assert bgra.shape == (399, 600, 4)
    np.testing.assert_array_equal(bgra[..., :3], cv2.imread(str(girl)))

    alpha = run("remove-background", str(girl), "-o", str(tmp_path / "alpha.png"), "--alpha", server=orchestrator.address)
    assert alpha.returncode == 0 and "alpha matte" in alpha.stdout
    matte = _read(tmp_path / "alpha.png")
    np.testing.assert_array_equal(matte, bgra[..., 3])

    red = run("remove-background", str(girl), "-o", str(tmp_path / "red.png"), "--background", "#f00", server=orchestrator.address)
    assert red.returncode == 0 and "RGB, background color" in red.stdout
    out = _read(tmp_path / "red.png").astype(np.float64)
    a = matte.astype(np.float64)[..., None] / 255
    bg = np.zeros_like(out)
    bg[..., 2] = 255  # BGR red
    expected = np.floor(cv2.imread(str(girl)) * a + bg * (1 - a) + 0.5)
    np.testing.assert_array_equal(out, expected)


def test_picture_background_contain_and_feather(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    picture = tmp_path / "white.png"
    cv2.imwrite(str(picture), np.full((100, 100, 3), 255, np.uint8))  # square into 600x399: side bars
    out = tmp_path / "out.png"
    result = run(
        "remove-background", str(assets / "images" / "girl-1.jpg"), "-o", str(out), "--background", str(picture),
        "--fit", "contain", "--bar-color", "blue", "--feather", "4", server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RGB, background image" in result.stdout
    pixels = _read(out)
    assert pixels.shape == (399, 600, 3)
    # The picture is scaled to 399x399 and fills columns 100..498; outside, the bars are blue
    # wherever the subject is not.
    matte = _read(_alpha(orchestrator, assets, tmp_path, "--feather", "4"))
    bars = np.zeros((399, 600), bool)
    bars[:, :100] = bars[:, 499:] = True
    background = matte == 0
    assert (pixels[bars & background] == (255, 0, 0)).all()
    assert (pixels[~bars & background] == 255).all()


def _alpha(orchestrator: Orchestrator, assets: Path, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "matte.png"
    result = run("remove-background", str(assets / "images" / "girl-1.jpg"), "-o", str(out), "--alpha", *extra, server=orchestrator.address)
    assert result.returncode == 0, result.stderr
    return out


def test_crop_person(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "person.png"
    result = run(
        "remove-background", str(assets / "images" / "zidane.jpg"), "-o", str(out), "--crop-person", "--person-index", "1",
        "--background", "keep", server=orchestrator.address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "background keep" in result.stdout and "no matting" in result.stdout
    assert "person #1 of 2 at (" in result.stdout
    size = result.stdout.split(": ", 1)[1].split(" ", 1)[0]
    width, height = (int(v) for v in size.split("x"))
    assert _read(out).shape == (height, width, 3) and width < 1280


def test_refused_calls_exit_non_zero_with_the_status(orchestrator: Orchestrator, assets: Path, tmp_path: Path) -> None:
    girl = str(assets / "images" / "girl-1.jpg")
    out = tmp_path / "never.png"
    cases = [
        (["--background", "blurple"], 2, ["INVALID_ARGUMENT", "field background.color", "not a colour"]),
        (["--alpha", "--background", "white"], 2, ["INVALID_ARGUMENT", "field background"]),
        (["--crop-person", "--person-index", "9"], 2, ["INVALID_ARGUMENT", "field person_index", "person_index is 9"]),
        (["--feather", "100"], 2, ["INVALID_ARGUMENT", "field feather_px"]),
        (["--background", str(tmp_path / "missing.jpg")], 2, ["missing.jpg: no such file"]),
    ]
    not_a_picture = tmp_path / "notes.txt"
    not_a_picture.write_text("not a picture")
    cases.append((["--background", str(not_a_picture)], 2, ["INVALID_ARGUMENT", "field background.image.encoded"]))
    for extra, code, words in cases:
        result = run("remove-background", girl, "-o", str(out), *extra, server=orchestrator.address)
        assert result.returncode == code, (extra, result.stdout, result.stderr)
        assert all(w in result.stderr for w in words), (extra, result.stderr)
        assert not out.exists()
    empty = tmp_path / "sky.png"
    cv2.imwrite(str(empty), np.full((200, 300, 3), (235, 206, 135), np.uint8))
    nobody = run("remove-background", str(empty), "-o", str(out), "--crop-person", server=orchestrator.address)
    assert nobody.returncode == 1 and "FAILED_PRECONDITION" in nobody.stderr and "no person found" in nobody.stderr
