"""The background of a talking video's photo (CreateTalkingVideoRequest.background): what D-ID is
sent, and the matted-image artifact that shows it, for every mode; bad backgrounds and bad
person choices refused at submit with the field named.

Real orchestrator, real Triton (U^2-Netp matting), the D-ID emulator. The expected pictures
are built from the matte the RemoveBackground RPC returns for the same crop (same model, same
pixels), so every pixel of the artifact is checked, not only a corner.
"""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.vision.compositing import Fit, composite, fit_background
from server.vision.persons import DEFAULT_CROP_MARGIN, crop_box
from tests.conftest import ASSETS, bad_request_fields
from tests.unit.test_did import tone_wav
from tests.e2e.test_jobs import download, emulator_requests, talking_request, upload, watch

PHOTO = "zidane.jpg"
GREEN = (0, 255, 0)


# A clean D-ID emulator (no faults, no request log) for every test.
pytestmark = pytest.mark.usefixtures("fresh_emulator")


def rgb_of(path_or_bytes) -> np.ndarray:  # noqa: ANN001
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def crop_and_matte(channel, response: jobs_pb2.CreateTalkingVideoResponse) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The crop the job used (its person box grown by the margin) and RemoveBackground's matte of it."""
    photo = rgb_of(ASSETS / "images" / PHOTO)
    box = response.person_box
    x1, y1, x2, y2 = crop_box((box.x1, box.y1, box.x2, box.y2), photo.shape[1], photo.shape[0], DEFAULT_CROP_MARGIN)
    matte = vision_service_pb2_grpc.VisionServiceStub(channel).RemoveBackground(
        vision_service_pb2.RemoveBackgroundRequest(
            image=common_pb2.Image(encoded=(ASSETS / "images" / PHOTO).read_bytes()),
            crop=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2),
            format=vision_service_pb2.MATTE_FORMAT_ALPHA_PNG,
        ),
        timeout=60,
    )
    alpha = cv2.imdecode(np.frombuffer(matte.png, np.uint8), cv2.IMREAD_UNCHANGED)
    return photo[y1:y2, x1:x2], alpha


def run_and_fetch(jobs, channel, did_emulator, **fields):  # noqa: ANN001, ANN201
    """Runs a single-person job to success: (response, the matting stage's message, the photo's
    artifact name, the photo decoded as stored, alpha kept)."""
    op = jobs.CreateTalkingVideo(talking_request(PHOTO, **fields), timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    done = operations_pb2_grpc.OperationsStub(channel).GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert done.response.Unpack(response)
    matting = next(e.stage_update for e in events if e.stage_update.stage == jobs_pb2.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE)
    photo = response.persons[0].photo
    data, first = download(jobs, op.name, photo.name)
    assert first.media_type == photo.media_type
    # D-ID received exactly one photo: this one.
    assert len(emulator_requests(did_emulator, "POST", "/images")) == 1
    return response, matting.message, photo.name, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_colour_background_fills_what_the_matte_leaves(jobs, channel, did_emulator) -> None:
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR, color="lime")
    response, message, name, bgr = run_and_fetch(jobs, channel, did_emulator, background=background)
    assert name == "person.png" and bgr.ndim == 3 and bgr.shape[2] == 3  # RGB PNG: nothing transparent
    assert "background replaced by #00ff00" in message, message
    assert response.background.mode == common_pb2.BACKGROUND_MODE_COLOR and response.background.color == "#00ff00"
    assert not response.matting_skipped
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    # The top corners are background: the colour, to within the matte's faint residue there
    # (U^2-Netp's alpha is soft: 1/255 of the photo can remain).
    for corner in (rgb[0, 0], rgb[0, -1]):
        assert np.abs(corner.astype(int) - GREEN).max() <= 3, corner
    crop, alpha = crop_and_matte(channel, response)
    assert rgb.shape[:2] == alpha.shape == crop.shape[:2]
    fill = np.empty_like(crop)
    fill[:] = GREEN
    np.testing.assert_array_equal(rgb, composite(crop, alpha, fill))
    assert (alpha == 0).mean() > 0.1 and (alpha == 255).mean() > 0.1  # a real matte: both sides present


@pytest.mark.parametrize("source", ["image", "image_upload_id"])
@pytest.mark.parametrize("fit", [common_pb2.BACKGROUND_FIT_COVER, common_pb2.BACKGROUND_FIT_CONTAIN])
def test_image_background_is_fitted_behind_the_person(jobs, channel, did_emulator, source, fit) -> None:
    picture = (ASSETS / "images" / "bus.jpg").read_bytes()
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_IMAGE, fit=fit, color="#123456")
    if source == "image":
        background.image.CopyFrom(common_pb2.Image(encoded=picture))
    else:
        background.image_upload_id = upload(jobs, picture, jobs_pb2.FILE_KIND_IMAGE).upload_id
    response, message, name, bgr = run_and_fetch(jobs, channel, did_emulator, background=background)
    assert name == "person.png" and bgr.shape[2] == 3 and "the picture" in message
    assert response.background.mode == common_pb2.BACKGROUND_MODE_IMAGE and response.background.fit == fit
    assert not response.background.HasField("image") and not response.background.image_upload_id  # not echoed
    crop, alpha = crop_and_matte(channel, response)
    height, width = alpha.shape
    behind = fit_background(rgb_of(picture), width, height, Fit.COVER if fit == common_pb2.BACKGROUND_FIT_COVER else Fit.CONTAIN,
                            (0x12, 0x34, 0x56))
    np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), composite(crop, alpha, behind))


def test_transparent_background_is_the_cut_out(jobs, channel, did_emulator) -> None:
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_TRANSPARENT)
    response, message, name, bgra = run_and_fetch(jobs, channel, did_emulator, background=background)
    assert name == "person.png" and bgra.shape[2] == 4 and message == "background removed"
    assert response.background.mode == common_pb2.BACKGROUND_MODE_TRANSPARENT
    crop, alpha = crop_and_matte(channel, response)
    np.testing.assert_array_equal(bgra[..., 3], alpha)
    np.testing.assert_array_equal(cv2.cvtColor(bgra[..., :3], cv2.COLOR_BGR2RGB), crop)


def test_unset_background_means_transparent_as_before(jobs, channel, did_emulator) -> None:
    response, _, name, bgra = run_and_fetch(jobs, channel, did_emulator)
    assert name == "person.png" and bgra.shape[2] == 4
    assert response.background.mode == common_pb2.BACKGROUND_MODE_TRANSPARENT and not response.matting_skipped


def test_keep_background_sends_the_original_pixels_without_matting(jobs, channel, did_emulator) -> None:
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_KEEP)
    response, message, name, bgr = run_and_fetch(jobs, channel, did_emulator, background=background)
    assert name == "person.jpg" and bgr.shape[2] == 3 and "BACKGROUND_MODE_KEEP" in message
    assert response.background.mode == common_pb2.BACKGROUND_MODE_KEEP
    assert response.matting_skipped and "BACKGROUND_MODE_KEEP" in response.matting_skipped_reason
    crop, _ = crop_and_matte(channel, response)
    # JPEG q95 of the crop: the original pixels, to within JPEG's rounding.
    assert np.abs(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(int) - crop.astype(int)).mean() < 2.0


def test_all_persons_with_a_colour_background(jobs, channel, did_emulator) -> None:
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR, color="#0000ff")
    op = jobs.CreateTalkingVideo(talking_request(PHOTO, all_persons=True, background=background), timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    done = operations_pb2_grpc.OperationsStub(channel).GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert done.response.Unpack(response)
    assert len(response.persons) == 2
    for person in response.persons:
        assert person.background.mode == common_pb2.BACKGROUND_MODE_COLOR and person.background.color == "#0000ff"
        data, _ = download(jobs, op.name, person.photo.name)
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(rgb[0, 0].astype(int) - (0, 0, 255)).max() <= 3, (person.person, rgb[0, 0])


def _bus() -> bytes:
    return (ASSETS / "images" / "bus.jpg").read_bytes()


@pytest.mark.parametrize(
    ("fields", "field", "code"),
    [
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR, color="not-a-colour")},
         "background.color", grpc.StatusCode.INVALID_ARGUMENT),
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR)},
         "background.color", grpc.StatusCode.INVALID_ARGUMENT),
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_IMAGE,
                                              image=common_pb2.Image(encoded=b"this is not a picture"))},
         "background.image.encoded", grpc.StatusCode.INVALID_ARGUMENT),
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_IMAGE)},
         "background.image", grpc.StatusCode.INVALID_ARGUMENT),
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_IMAGE, image_upload_id="0" * 32)},
         "background.image_upload_id", grpc.StatusCode.NOT_FOUND),
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR, color="red"), "skip_matting": True},
         "background.mode", grpc.StatusCode.INVALID_ARGUMENT),
        ({"background": common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_KEEP), "require_matting": True},
         "require_matting", grpc.StatusCode.INVALID_ARGUMENT),
        ({"all_persons": True, "person": jobs_pb2.PersonSelector(index=1)}, "person", grpc.StatusCode.INVALID_ARGUMENT),
        ({"all_persons": True, "max_persons": 5}, "max_persons", grpc.StatusCode.INVALID_ARGUMENT),
        ({"all_persons": True, "max_persons": -1}, "max_persons", grpc.StatusCode.INVALID_ARGUMENT),
        ({"max_persons": 2}, "max_persons", grpc.StatusCode.INVALID_ARGUMENT),
        ({"person": jobs_pb2.PersonSelector(index=-1)}, "person.index", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_backgrounds_and_person_choices_are_refused_at_submit(jobs, did_emulator, fields, field, code) -> None:
    request = jobs_pb2.CreateTalkingVideoRequest(image=_bus(), audio=tone_wav(0.5), **fields)
    with pytest.raises(grpc.RpcError) as err:
        jobs.CreateTalkingVideo(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert field in (bad_request_fields(err.value) or []), (err.value.details(), bad_request_fields(err.value))
    assert len(err.value.details()) < 1000
    assert not emulator_requests(did_emulator, "POST", "/images")  # nothing reached D-ID


def test_an_audio_upload_is_not_a_background_picture(jobs) -> None:
    audio = upload(jobs, tone_wav(0.5), jobs_pb2.FILE_KIND_AUDIO).upload_id
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_IMAGE, image_upload_id=audio)
    with pytest.raises(grpc.RpcError) as err:
        jobs.CreateTalkingVideo(jobs_pb2.CreateTalkingVideoRequest(image=_bus(), audio=tone_wav(0.5), background=background), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "background.image_upload_id" in (bad_request_fields(err.value) or [])
    assert "FILE_KIND_AUDIO" in err.value.details()
