"""CPU model repository builder: config, wrapped ONNX numerics, idempotence (no Triton needed)."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # tests/ is not a package; make `engines` importable
    sys.path.insert(0, str(REPO_ROOT))

from engines.cpu_repository import MissingWeightsError, build_cpu_repository  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
YOLO_ONNX = ASSETS / "models" / "yolov8n_int8.onnx"
U2NETP_ONNX = ASSETS / "models" / "u2netp.onnx"
BUS = ASSETS / "images" / "bus.jpg"
GIRL = ASSETS / "images" / "girl-1.jpg"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

needs_assets = pytest.mark.skipif(not (YOLO_ONNX.is_file() and U2NETP_ONNX.is_file() and BUS.is_file()),
                                  reason=f"shared assets not found under {ASSETS}")


def letterbox_rgb(path: Path, size: int = 640, pad: int = 114) -> np.ndarray:
    """uint8 [size,size,3] RGB: aspect-preserving resize, centred, padded with ``pad``."""
    cv2 = pytest.importorskip("cv2")
    bgr = cv2.imread(str(path))
    h, w = bgr.shape[:2]
    r = min(size / h, size / w)
    nw, nh = round(w * r), round(h * r)
    resized = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = np.full((size, size, 3), pad, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return np.ascontiguousarray(out[..., ::-1])


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


SAM2_PARTS = ("sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder")


def parse_config(repo: Path, name: str = "yolov8") -> model_config_pb2.ModelConfig:
    text = (repo / name / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if not YOLO_ONNX.is_file():
        pytest.skip(f"no weights at {YOLO_ONNX}")
    out = tmp_path_factory.mktemp("build") / "repo"
    return build_cpu_repository(out, YOLO_ONNX, instances=3, intra_op_threads=1,
                                max_batch_size=4, max_queue_delay_us=1500)


@needs_assets
def test_config_parses_with_contract_and_parameters(repo):
    config = parse_config(repo)
    assert config.name == "yolov8" and config.backend == "python"
    assert config.max_batch_size == 4
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("images", model_config_pb2.TYPE_UINT8, [640, 640, 3])
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == ("output0", model_config_pb2.TYPE_FP32, [84, 8400])
    (group,) = config.instance_group
    assert group.count == 3 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["onnx_file"] == "model.onnx"
    assert params["intra_op_threads"] == "1"
    assert params["stand_in"] == "false"
    assert params["source"].startswith("yolov8n_int8.onnx sha256:")
    assert params["network"] == "YOLOv8n"  # from the weights' own Ultralytics metadata
    assert params["letterbox_pad_value"] == "114"
    assert params["input_layout"] == "NHWC_RGB_UINT8"
    assert params["per_item_execution"] == "true"
    assert params["graph_rewrite"] == "1 inner-axis Softmax moved to the last axis (engines/softmax_axis.py)"
    names = json.loads(params["class_names"])
    assert len(names) == 80 and names[0] == "person" and names[79] == "toothbrush"
    assert (repo / "yolov8" / "1" / "model.py").read_text() == \
        (REPO_ROOT / "engines" / "python_backend" / "onnx_model.py").read_text()


@needs_assets
def test_wrapped_model_matches_original_on_letterboxed_image(repo):
    image = letterbox_rgb(BUS)
    wrapped = session(repo / "yolov8" / "1" / "model.onnx")
    original = session(YOLO_ONNX)
    assert wrapped.get_inputs()[0].name == "images" and wrapped.get_inputs()[0].type == "tensor(uint8)"
    (got,) = wrapped.run(["output0"], {"images": image[None]})
    nchw = (image.astype(np.float32) * np.float32(1.0 / 255.0)).transpose(2, 0, 1)[None]
    (want,) = original.run(["output0"], {"images": np.ascontiguousarray(nchw)})
    assert got.shape == (1, 84, 8400)
    # The served graph's rewrites (the box head's Softmax on the last axis) change no number.
    np.testing.assert_array_equal(got, want)


class FakeTritonUtils:
    """Just enough of triton_python_backend_utils to drive model.py outside Triton."""

    class Error:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class Response:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    def __init__(self, monkeypatch, run_dir: Path):
        self.logged: list[tuple[str, str]] = []
        fake = types.ModuleType("triton_python_backend_utils")
        fake.Tensor, fake.InferenceResponse, fake.TritonError = self.Tensor, self.Response, self.Error
        fake.get_input_tensor_by_name = lambda request, name: request.get(name)
        fake.triton_string_to_numpy = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16,
                                       "TYPE_INT32": np.int32}.__getitem__
        fake.Logger = types.SimpleNamespace(log_info=lambda message: self.logged.append(("info", message)),
                                            log_warn=lambda message: self.logged.append(("warn", message)))
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
        # The instances' presence files (engines/python_backend/onnx_model.py) go where the
        # Triton launcher would put them, not into the system's temporary directory.
        monkeypatch.setenv("FRAMEWISE_TRITON_RUN_DIR", str(run_dir))

    def load(self, repo: Path, name: str):
        spec = importlib.util.spec_from_file_location(f"framewise_onnx_model_{name}", repo / name / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        config = json_format.MessageToDict(parse_config(repo, name), preserving_proto_field_name=True)
        model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name),
                          "model_version": "1", "model_instance_name": f"{name}_0"})
        return model


@needs_assets
def test_python_model_runs_batch_image_by_image_and_isolates_errors(repo, monkeypatch, tmp_path):
    """Drive model.py with a stand-in for triton_python_backend_utils."""
    utils = FakeTritonUtils(monkeypatch, tmp_path)
    Tensor = utils.Tensor
    model = utils.load(repo, "yolov8")
    assert not [m for level, m in utils.logged if "STAND-IN" in m]

    image = letterbox_rgb(BUS)
    pair = np.stack([image, image[:, ::-1]])
    responses = model.execute([
        {"images": Tensor("images", pair)},
        {"images": Tensor("images", np.zeros((1, 32, 32, 3), np.uint8))},
        {"images": Tensor("images", image[None])},
    ])
    assert len(responses) == 3
    assert responses[0].error is None and responses[2].error is None
    assert responses[1].error is not None and responses[1].output_tensors == []
    (batched,) = [t.as_numpy() for t in responses[0].output_tensors]
    (single,) = [t.as_numpy() for t in responses[2].output_tensors]
    assert batched.shape == (2, 84, 8400) and batched.dtype == np.float32
    np.testing.assert_array_equal(batched[:1], single)
    model.finalize()


@needs_assets
def test_python_model_runs_a_stand_in_batch_in_one_call_and_says_stand_in(repo, monkeypatch, tmp_path):
    utils = FakeTritonUtils(monkeypatch, tmp_path)
    Tensor = utils.Tensor
    model = utils.load(repo, "sam2_mask_decoder")
    warnings = [m for level, m in utils.logged if level == "warn"]
    assert len(warnings) == 1 and "STAND-IN" in warnings[0] and "sam2_mask_decoder" in warnings[0]
    assert any("per_item_execution=False" in m for level, m in utils.logged if level == "info")

    calls = []
    run = model.session.run
    model.session = types.SimpleNamespace(run=lambda names, feeds, *options: calls.append(feeds) or run(names, feeds, *options),
                                          after_execute=model.session.after_execute, executing=model.session.executing)
    rs = np.random.RandomState(0)
    size = int(parse_config(repo, "sam2_mask_decoder").parameters["image_size"].string_value)
    feeds = {
        "image_embed": rs.normal(size=(3, 256, size // 16, size // 16)).astype(np.float32),
        "high_res_feat0": rs.uniform(size=(3, 32, size // 4, size // 4)).astype(np.float32),
        "high_res_feat1": rs.uniform(size=(3, 64, size // 8, size // 8)).astype(np.float32),
        "point_coords": np.array([[[100, 100], [300, 400]]] * 3, np.float32),
        "point_labels": np.array([[2, 3], [1, -1], [1, 0]], np.int32),
    }
    (response,) = model.execute([{n: Tensor(n, a) for n, a in feeds.items()}])
    assert response.error is None and len(calls) == 1  # the whole batch in one ORT call
    outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
    assert outputs["masks"].shape == (3, 4, size // 4, size // 4)
    assert outputs["iou_scores"].shape == (3, 4) and outputs["object_score_logits"].shape == (3, 1)
    assert outputs["obj_ptrs"].shape == (3, 4, 256)
    (first,) = model.execute([{n: Tensor(n, a[:1]) for n, a in feeds.items()}])
    np.testing.assert_allclose(first.output_tensors[0].as_numpy(), outputs["masks"][:1], atol=1e-5)
    model.finalize()


@needs_assets
def test_sam2_stand_ins_are_written_beside_yolov8(repo):
    manifest = json.loads((repo / "MANIFEST.json").read_text())
    assert manifest["models"] == ["yolov8", *SAM2_PARTS, "matting", "sam2_frame_step", "sam2_track_step"]
    assert manifest["stand_in_models"] == [*SAM2_PARTS]
    assert manifest["fingerprint"]["parameters"]["sam2_image_size"] == 1024
    for name in SAM2_PARTS:
        config = parse_config(repo, name)
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["stand_in"] == "true" and params["image_size"] == "1024"
        assert params["network"] == "stand-in"
        assert params["per_item_execution"] == "false"
        assert (repo / name / "1" / "model.onnx").is_file()
        assert (repo / name / "1" / "model.py").read_text() == (repo / "yolov8" / "1" / "model.py").read_text()
    vision = {t.name: list(t.dims) for t in parse_config(repo, "sam2_image_encoder").output}
    assert vision == {"vision_feat": [256, 64, 64], "high_res_feat0": [32, 256, 256],
                      "high_res_feat1": [64, 128, 128]}
    assert parse_config(repo, "sam2_mask_decoder").max_batch_size == 16
    # The per-object parts take one object per row, and Triton's dynamic batcher joins concurrent requests.
    for name in ("sam2_memory_attention", "sam2_memory_encoder"):
        assert parse_config(repo, name).max_batch_size == 16
        assert parse_config(repo, name).HasField("dynamic_batching")
    track = parse_config(repo, "sam2_track_step")
    assert track.max_batch_size == 16 and [list(t.dims) for t in track.input][:1] == [[256, 64, 64]]
    assert parse_config(repo, "sam2_frame_step").max_batch_size == 0


@needs_assets
def test_second_build_is_a_noop_and_force_rebuilds(tmp_path):
    out = tmp_path / "repo"
    build_cpu_repository(out, YOLO_ONNX)
    manifest, weights = out / "MANIFEST.json", out / "yolov8" / "1" / "model.onnx"
    first = json.loads(manifest.read_text())["build_id"]
    stamps = (manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    assert build_cpu_repository(out, YOLO_ONNX) == out
    assert (manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps
    assert json.loads(manifest.read_text())["build_id"] == first

    build_cpu_repository(out, YOLO_ONNX, force=True)
    assert json.loads(manifest.read_text())["build_id"] != first
    parse_config(out)

    build_cpu_repository(out, YOLO_ONNX, instances=4)  # a parameter change rebuilds too
    assert parse_config(out).instance_group[0].count == 4
    before = json.loads(manifest.read_text())["build_id"]
    build_cpu_repository(out, YOLO_ONNX, instances=4, sam2_image_size=512)
    assert json.loads(manifest.read_text())["build_id"] != before
    assert parse_config(out, "sam2_mask_decoder").parameters["image_size"].string_value == "512"
    assert list(parse_config(out, "sam2_mask_decoder").output[0].dims) == [4, 128, 128]
    stamp = manifest.stat().st_mtime_ns
    build_cpu_repository(out, YOLO_ONNX, instances=4, sam2_image_size=512)
    assert manifest.stat().st_mtime_ns == stamp

    other_u2netp = tmp_path / "weights" / "u2netp_copy.onnx"  # other matting weights rebuild it
    other_u2netp.parent.mkdir()
    other_u2netp.write_bytes(U2NETP_ONNX.read_bytes())
    build_cpu_repository(out, YOLO_ONNX, instances=4, sam2_image_size=512, u2netp_onnx=other_u2netp)
    assert json.loads(manifest.read_text())["fingerprint"]["models"]["matting"]["source"] == "u2netp_copy.onnx"
    assert parse_config(out, "matting").parameters["source"].string_value.startswith("u2netp_copy.onnx sha256:")
    stamp = manifest.stat().st_mtime_ns
    build_cpu_repository(out, YOLO_ONNX, instances=4, sam2_image_size=512, u2netp_onnx=other_u2netp)
    assert manifest.stat().st_mtime_ns == stamp

    (out / "matting" / "1" / "model.onnx").unlink()  # an incomplete repository is rebuilt
    build_cpu_repository(out, YOLO_ONNX, instances=4, sam2_image_size=512, u2netp_onnx=other_u2netp)
    assert (out / "matting" / "1" / "model.onnx").is_file()
    (out / "sam2_memory_encoder" / "1" / "model.onnx").unlink()
    build_cpu_repository(out, YOLO_ONNX, instances=4, sam2_image_size=512, u2netp_onnx=other_u2netp)
    assert (out / "sam2_memory_encoder" / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "weights"]  # no staging dirs left


@pytest.mark.parametrize("size", [100, 32, 0, 1024.0])
def test_bad_sam2_image_size_is_refused_before_writing(tmp_path, size):
    with pytest.raises(ValueError, match="multiple of 16"):
        build_cpu_repository(tmp_path / "repo", YOLO_ONNX, sam2_image_size=size)
    assert not (tmp_path / "repo").exists()


def test_missing_weights_raise_with_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "yolo.onnx"
    with pytest.raises(MissingWeightsError) as info:
        build_cpu_repository(tmp_path / "repo", missing)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(missing) in message
    assert "--yolo-onnx" in message and "FRAMEWISE_YOLO_ONNX" in message
    assert not (tmp_path / "repo").exists()


def test_missing_u2netp_weights_raise_with_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "u2netp.onnx"
    monkeypatch.setenv("FRAMEWISE_U2NETP_ONNX", str(missing))  # the default follows the variable
    with pytest.raises(MissingWeightsError) as info:
        build_cpu_repository(tmp_path / "repo", YOLO_ONNX)
    message = str(info.value)
    assert str(missing) in message and "U^2-Netp" in message
    assert "--u2netp-onnx" in message and "FRAMEWISE_U2NETP_ONNX" in message
    assert not (tmp_path / "repo").exists()


@needs_assets
def test_matting_is_the_real_u2netp_labelled_and_batched(repo, monkeypatch, tmp_path):
    config = parse_config(repo, "matting")
    assert config.name == "matting" and config.backend == "python" and config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", model_config_pb2.TYPE_UINT8, [320, 320, 3])
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == ("alpha", model_config_pb2.TYPE_FP32, [1, 320, 320])
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["stand_in"] == "false" and params["network"] == "U2-Netp"
    assert params["source"] == "u2netp.onnx sha256:309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"
    assert params["image_size"] == "320" and params["per_item_execution"] == "false"

    utils = FakeTritonUtils(monkeypatch, tmp_path)
    Tensor = utils.Tensor
    model = utils.load(repo, "matting")
    assert not [m for level, m in utils.logged if level == "warn"]  # a real model: no stand-in warning
    calls = []
    run = model.session.run
    model.session = types.SimpleNamespace(run=lambda names, feeds, *options: calls.append(feeds) or run(names, feeds, *options),
                                          after_execute=model.session.after_execute, executing=model.session.executing)
    girl, bus = _at(GIRL, 320), _at(BUS, 320)
    (response,) = model.execute([{"image": Tensor("image", np.stack([girl, bus]))}])
    assert response.error is None and len(calls) == 1  # the whole batch in one ORT call
    (alpha,) = [t.as_numpy() for t in response.output_tensors]
    assert alpha.shape == (2, 1, 320, 320) and alpha.dtype == np.float32
    (alone,) = model.execute([{"image": Tensor("image", bus[None])}])
    np.testing.assert_allclose(alone.output_tensors[0].as_numpy()[0], alpha[1], atol=1e-5)  # items independent
    model.finalize()


def _at(path: Path, size: int) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    return np.ascontiguousarray(cv2.resize(cv2.imread(str(path)), (size, size), interpolation=cv2.INTER_AREA)[..., ::-1])


def _reference_u2netp(original: ort.InferenceSession, rgb: np.ndarray) -> np.ndarray:
    """The reference steps around the raw network (rembg's u2netp session), in float64 numpy."""
    x = rgb / np.max(rgb)
    x = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    (saliency, *_) = original.run(None, {original.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)})
    prediction = saliency[:, 0]
    return (prediction - prediction.min()) / (prediction.max() - prediction.min())


@needs_assets
def test_matting_graph_is_u2netp_with_the_reference_steps_inside(repo):
    wrapped = session(repo / "matting" / "1" / "model.onnx")
    original = session(U2NETP_ONNX)
    (inp,), (out,) = wrapped.get_inputs(), wrapped.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(uint8)", [320, 320, 3])
    assert (out.name, out.type, out.shape[1:]) == ("alpha", "tensor(float)", [1, 320, 320])

    girl, bus = _at(GIRL, 320), _at(BUS, 320)
    dim = (girl // 2).astype(np.uint8)  # max 127: the per-image maximum, not 255, is the divisor
    (alpha,) = wrapped.run(["alpha"], {"image": np.stack([girl, bus, dim])})
    for got, image in zip(alpha, (girl, bus, dim)):
        want = _reference_u2netp(original, image)
        assert np.abs(got - want).max() < 1e-4
        assert got.min() == 0.0 and abs(got.max() - 1.0) < 1e-6  # min-max per image, inside the graph
    # A real matte of the portrait: the person's torso is foreground, the corners background.
    girl_alpha = wrapped.run(["alpha"], {"image": girl[None]})[0][0, 0]
    (height, width), s = cv2_shape(GIRL), 320
    torso = girl_alpha[250 * s // height:330 * s // height, 200 * s // width:260 * s // width]
    assert torso.mean() > 0.9
    for corner in (girl_alpha[:30, :30], girl_alpha[:30, -30:], girl_alpha[-30:, :30], girl_alpha[-30:, -30:]):
        assert corner.max() < 0.05
    # No NaN for the cases the reference divides by zero in: an all-black image.
    (black,) = wrapped.run(["alpha"], {"image": np.zeros((1, 320, 320, 3), np.uint8)})
    assert np.isfinite(black).all() and 0.0 <= black.min() and black.max() <= 1.0


def cv2_shape(path: Path) -> tuple[int, int]:
    cv2 = pytest.importorskip("cv2")
    return cv2.imread(str(path)).shape[:2]


def test_real_sam2_exports_are_labelled_with_their_network():
    from engines.cpu_repository import _sam2_network

    assert _sam2_network("hiera tiny checkpoint sam2.1_hiera_tiny.pt sha256:0123") == "SAM 2.1 hiera-tiny"
    assert _sam2_network("hiera base_plus RANDOM weights (torch.manual_seed(0); no checkpoint)") == \
        "SAM 2.1 hiera-base-plus (random weights)"
    assert _sam2_network(None) == _sam2_network("something else") == "SAM 2"
