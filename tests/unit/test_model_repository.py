"""The committed GPU repository (model_repository/) and the TensorRT build's refusals.

Runs in `make test` without TensorRT, a GPU or torch: the configs are compared with the CPU
repository that engines.cpu_repository builds (same names, tensors, dtypes, dims, parameters the
orchestrator reads), and `build_engines.py --target tensorrt` must stop with exit status 2 before
writing anything when TensorRT or a CUDA GPU is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import build_engines
from engines import sam2_steps
from engines import tensorrt_build as trtb

GPU_REPO = REPO_ROOT / "model_repository"
YOLO_ONNX = REPO_ROOT.parent / "shared" / "assets" / "models" / "yolov8n_int8.onnx"
MODELS = ("yolov8", "matting", "sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention",
          "sam2_memory_encoder")
# Configuration-only Triton ensembles over the SAM 2 parts (engines/sam2_steps.py): no plan.
ENSEMBLES = sam2_steps.STEP_MODELS
# Config parameters the orchestrator reads (server/pipelines, server/triton/model_spec.py) or that
# describe the contract: identical in both repositories.
SHARED_PARAMETERS = ("class_names", "letterbox_pad_value", "input_layout", "image_size", "num_candidates",
                     "max_memories", "max_object_pointers", "output_activation")
# `matting` is one contract served by a different network per repository (U^2-Netp at S = 320 on
# CPU, BiRefNet-lite at S = 1024 on the GPU): these describe the network, not the contract.
NETWORK_PARAMETERS = {"matting": ("image_size", "output_activation")}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def gpu_config(name: str) -> model_config_pb2.ModelConfig:
    return parse(GPU_REPO / name / "config.pbtxt")


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.fixture(scope="module")
def cpu_repo(tmp_path_factory) -> Path:
    if not YOLO_ONNX.is_file():
        pytest.skip(f"no YOLOv8 weights at {YOLO_ONNX} (the CPU repository needs them)")
    from engines.cpu_repository import build_cpu_repository

    # The defaults: S = 1024 for SAM 2, as the GPU configs; the matting network's own S.
    return build_cpu_repository(tmp_path_factory.mktemp("cpu") / "repo", YOLO_ONNX)


# --- the committed configs ------------------------------------------------------------------------

def test_one_tensorrt_config_per_model():
    found = sorted(p.parent.name for p in GPU_REPO.glob("*/config.pbtxt"))
    assert found == sorted((*MODELS, *ENSEMBLES))
    for name in MODELS:
        config = gpu_config(name)
        assert config.name == name
        assert config.platform == "tensorrt_plan" and not config.backend
        assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and g.count >= 1
                   for g in config.instance_group)
        assert config.HasField("dynamic_batching") == (config.max_batch_size > 0)
        assert params(config)["stand_in"] == "false"
        assert (GPU_REPO / name / "1").is_dir()


def test_step_ensembles_are_generated_from_the_part_configs(cpu_repo):
    parts = {n: gpu_config(n) for n in (sam2_steps.IMAGE_ENCODER, sam2_steps.MEMORY_ATTENTION, sam2_steps.MASK_DECODER)}
    expected = sam2_steps.step_configs(parts, {"stand_in": "false", "source": "Triton ensemble of the SAM 2 parts",
                                               "network": "SAM 2.1 hiera-tiny"})
    for name in ENSEMBLES:
        committed = (GPU_REPO / name / "config.pbtxt").read_text()
        assert committed == expected[name], f"{name}: regenerate with engines/sam2_steps.py"
        gpu, cpu = gpu_config(name), parse(cpu_repo / name / "config.pbtxt")
        assert gpu.platform == cpu.platform == "ensemble"
        for side in ("input", "output"):
            assert [(t.name, t.data_type, list(t.dims)) for t in getattr(gpu, side)] == \
                   [(t.name, t.data_type, list(t.dims)) for t in getattr(cpu, side)], (name, side)
        assert [step.model_name for step in gpu.ensemble_scheduling.step] == \
               [step.model_name for step in cpu.ensemble_scheduling.step]
        assert (GPU_REPO / name / "1").is_dir()


def test_plan_file_per_compute_capability():
    for name in MODELS:
        config = gpu_config(name)
        assert config.cc_model_filenames["7.5"] == "model.sm75.plan"  # the T4
        for cc, filename in config.cc_model_filenames.items():
            major, minor = cc.split(".")
            assert filename == f"model.sm{major}{minor}.plan"


def test_plans_are_ignored_by_git():
    for name in MODELS:
        plan = f"model_repository/{name}/1/model.sm75.plan"
        result = subprocess.run(["git", "check-ignore", "-q", plan], cwd=REPO_ROOT, check=False)
        if result.returncode == 128:
            pytest.skip("not a git checkout")
        assert result.returncode == 0, f"{plan} is not git-ignored"
    tracked = subprocess.run(["git", "ls-files", "model_repository"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=False).stdout.split()
    assert not [t for t in tracked if t.endswith((".plan", ".onnx", ".engine"))]


def test_same_contract_as_the_cpu_repository(cpu_repo):
    for name in MODELS:
        cpu, gpu = parse(cpu_repo / name / "config.pbtxt"), gpu_config(name)
        cpu_params, gpu_params = params(cpu), params(gpu)

        def tensors(config, size):
            # A network-specific model size S is compared as the symbol "S": the orchestrator
            # reads it from Triton's metadata, so only where it appears is the contract.
            return [(t.name, t.data_type, ["S" if size and d == size else d for d in t.dims])
                    for t in (*config.input, *config.output)]

        sized = "image_size" in NETWORK_PARAMETERS.get(name, ())
        cpu_size, gpu_size = (int(cpu_params["image_size"]), int(gpu_params["image_size"])) if sized else (0, 0)
        assert tensors(gpu, gpu_size) == tensors(cpu, cpu_size), name
        # Same batching semantics: with max_batch_size > 0 the dims exclude the batch.
        assert (gpu.max_batch_size > 0) == (cpu.max_batch_size > 0), name
        for key in SHARED_PARAMETERS:
            if key not in NETWORK_PARAMETERS.get(name, ()):
                assert cpu_params.get(key) == gpu_params.get(key), f"{name}: parameter {key}"
        # Every model says which network serves it, in both repositories.
        assert cpu_params.get("network") and gpu_params.get("network"), name


def test_matting_is_a_different_network_per_repository(cpu_repo):
    cpu, gpu = params(parse(cpu_repo / "matting" / "config.pbtxt")), params(gpu_config("matting"))
    assert (cpu["network"], cpu["image_size"], cpu["stand_in"]) == ("U2-Netp", "320", "false")
    assert (gpu["network"], gpu["image_size"], gpu["stand_in"]) == ("BiRefNet-lite", "1024", "false")
    # The matting contract's dims: image [S, S, 3] -> alpha [1, S, S], with each repository's S.
    for config, size in ((parse(cpu_repo / "matting" / "config.pbtxt"), 320), (gpu_config("matting"), 1024)):
        assert [list(t.dims) for t in config.input] == [[size, size, 3]]
        assert [list(t.dims) for t in config.output] == [[1, size, size]]


def test_batch_limits_fit_the_orchestrator():
    # One frame per encoder/detector/matting call; a frame's objects in calls of up to
    # MAX_OBJECTS_PER_CALL rows (--max-objects-per-session defaults to 8).
    from server.config import ServerConfig
    from server.sam2.contract import MAX_OBJECTS_PER_CALL, PER_OBJECT_MODELS

    assert gpu_config("sam2_mask_decoder").max_batch_size >= ServerConfig().max_objects_per_session
    for name in PER_OBJECT_MODELS:  # calls of MAX_OBJECTS_PER_CALL objects fit every per-object part
        assert gpu_config(name).max_batch_size >= MAX_OBJECTS_PER_CALL, name
    for name in ("yolov8", "matting", "sam2_image_encoder"):
        assert gpu_config(name).max_batch_size >= 1


def test_warmup_requests_match_the_inputs():
    for name in MODELS:
        config = gpu_config(name)
        assert config.model_warmup, f"{name} has no model_warmup"
        declared = {t.name: t for t in config.input}
        for warmup in config.model_warmup:
            assert set(warmup.inputs) == set(declared), name
            assert 1 <= warmup.batch_size <= max(config.max_batch_size, 1)
            for key, data in warmup.inputs.items():
                spec = declared[key]
                assert data.data_type == spec.data_type
                assert len(data.dims) == len(spec.dims)
                assert all(d == w or (d == -1 and w >= 1) for d, w in zip(spec.dims, data.dims)), (name, key)
                assert data.zero_data or data.random_data


def test_profiles_cover_the_dynamic_dims():
    def network_inputs(config: trtb.ModelConfig) -> dict[str, tuple[int, ...]]:
        batched = config.max_batch_size > 0
        return {t.name: tuple(([-1] if batched else []) + t.dims) for t in config.inputs}

    shapes = {}
    for name in MODELS:
        config = trtb.read_config(GPU_REPO / name / "config.pbtxt")
        shapes[name] = trtb.profile_shapes(config, network_inputs(config))
        for lo, opt, hi in shapes[name].values():
            assert all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi))
            assert all(d > 0 for d in hi)
    assert shapes["yolov8"]["images"] == ((1, 640, 640, 3), (4, 640, 640, 3), (8, 640, 640, 3))
    # Memory attention: objects 1..4 a call (2 typical), memories 1..7, pointers 1..16 per object.
    attention = shapes["sam2_memory_attention"]
    assert attention["memory_feats"] == ((1, 1, 64, 64, 64), (2, 7, 64, 64, 64), (4, 7, 64, 64, 64))
    assert attention["memory_tpos"][2] == (4, 7)
    assert attention["obj_ptrs"][0][:2] == (1, 1) and attention["obj_ptrs"][2][:2] == (4, 16)
    assert attention["obj_ptr_tdiff"][2] == (4, 16)
    assert attention["vision_feat"][2] == (4, 256, 64, 64)
    assert shapes["sam2_memory_encoder"]["mask_logits"] == ((1, 1, 256, 256), (2, 1, 256, 256), (8, 1, 256, 256))
    decoder = shapes["sam2_mask_decoder"]
    assert decoder["point_coords"][0] == (1, 1, 2) and decoder["point_coords"][2] == (16, 64, 2)
    assert decoder["point_labels"][2] == (16, 64)
    assert decoder["image_embed"][2] == (16, 256, 64, 64)


def test_config_reader_agrees_with_protobuf():
    """tensorrt_build reads the configs without protobuf (the TensorRT container has none)."""
    for name in MODELS:
        path = GPU_REPO / name / "config.pbtxt"
        ours, theirs = trtb.read_config(path), parse(path)
        assert ours.name == theirs.name and ours.platform == theirs.platform
        assert ours.max_batch_size == theirs.max_batch_size
        for mine, proto in ((ours.inputs, theirs.input), (ours.outputs, theirs.output)):
            assert [(t.name, t.data_type, t.dims) for t in mine] == \
                [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in proto]
        assert ours.parameters == params(theirs)
        assert ours.cc_model_filenames == dict(theirs.cc_model_filenames)


def test_container_pins_agree():
    assert trtb.TRITON_IMAGE.rsplit(":", 1)[1] == trtb.TENSORRT_IMAGE.rsplit(":", 1)[1], \
        "plans must be built by the TensorRT of the Triton release that serves them"
    for name in MODELS:
        assert trtb.TRITON_IMAGE in (GPU_REPO / name / "config.pbtxt").read_text()
        assert trtb.TENSORRT_VERSION in (GPU_REPO / name / "config.pbtxt").read_text()


# --- build_engines.py --target tensorrt refuses early -----------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} if root.exists() else {}


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    import shutil

    copy = tmp_path / "model_repository"
    shutil.copytree(GPU_REPO, copy)
    return copy


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


@pytest.fixture
def fake_tensorrt(monkeypatch):
    module = types.ModuleType("tensorrt")
    module.__version__ = trtb.TENSORRT_VERSION + ".18"
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def test_without_tensorrt_exit_2_and_nothing_written(repo_copy, tmp_path, no_tensorrt, capsys):
    onnx_dir = tmp_path / "onnx"
    before, before_real = _snapshot(repo_copy), _snapshot(GPU_REPO)
    code = build_engines.main(["--target", "tensorrt", "--output", str(repo_copy), "--onnx-dir", str(onnx_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "TensorRT" in err and trtb.TENSORRT_IMAGE in err
    assert _snapshot(repo_copy) == before and _snapshot(GPU_REPO) == before_real
    assert not onnx_dir.exists()


def test_without_a_gpu_exit_2_and_nothing_written(repo_copy, tmp_path, fake_tensorrt, monkeypatch, capsys):
    def no_gpu():
        raise trtb.BuildError("no NVIDIA driver here (libcuda.so.1: not found)")

    monkeypatch.setattr(trtb, "probe_gpu", no_gpu)
    before = _snapshot(repo_copy)
    code = build_engines.main(["--target", "tensorrt", "--output", str(repo_copy), "--onnx-dir", str(tmp_path)])
    assert code == 2
    assert "NVIDIA driver" in capsys.readouterr().err
    assert _snapshot(repo_copy) == before


def test_gpu_probe_on_this_machine_says_why():
    """The real probe (ctypes libcuda) either finds a GPU or raises BuildError: never crashes."""
    try:
        gpu = trtb.probe_gpu()
    except trtb.BuildError as exc:
        assert "GPU" in str(exc) or "CUDA" in str(exc) or "driver" in str(exc)
    else:
        assert gpu.major >= 3


def test_wrong_tensorrt_version_exit_2(repo_copy, tmp_path, fake_tensorrt, monkeypatch, capsys):
    fake_tensorrt.__version__ = "10.8.0.43"
    monkeypatch.setattr(trtb, "probe_gpu", lambda: trtb.Gpu("Tesla T4", 7, 5, 16 << 30))
    code = build_engines.main(["--target", "tensorrt", "--output", str(repo_copy), "--onnx-dir", str(tmp_path)])
    assert code == 2
    assert "10.8.0.43" in capsys.readouterr().err


def test_missing_onnx_files_exit_2_and_are_all_listed(repo_copy, tmp_path, fake_tensorrt, monkeypatch, capsys):
    monkeypatch.setattr(trtb, "probe_gpu", lambda: trtb.Gpu("Tesla T4", 7, 5, 16 << 30))
    (tmp_path / "yolov8.onnx").write_bytes(b"not really")
    before = _snapshot(repo_copy)
    code = build_engines.main(["--target", "tensorrt", "--output", str(repo_copy), "--onnx-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    for name in MODELS[1:]:
        assert f"{name}.onnx is missing" in err
    assert "yolov8.onnx is missing" not in err
    assert _snapshot(repo_copy) == before


def test_unknown_compute_capability_is_refused(repo_copy, tmp_path, fake_tensorrt, monkeypatch, capsys):
    monkeypatch.setattr(trtb, "probe_gpu", lambda: trtb.Gpu("Some GPU", 12, 1, 16 << 30))
    for name in MODELS:
        (tmp_path / f"{name}.onnx").write_bytes(b"x")
    code = build_engines.main(["--target", "tensorrt", "--output", str(repo_copy), "--onnx-dir", str(tmp_path)])
    assert code == 2
    assert "cc_model_filenames" in capsys.readouterr().err


def test_onnx_target_without_export_environment_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build_engines, "_missing_modules", lambda *names: [n for n in names if n != "onnxruntime"])
    out = tmp_path / "onnx"
    code = build_engines.main(["--target", "onnx", "--output", str(out), "--models", "yolov8", "--random-init"])
    err = capsys.readouterr().err
    assert code == 2 and "make export-env" in err and "torch" in err
    assert not out.exists()


@pytest.mark.parametrize("model", ["matting", "birefnet"])  # the GPU's matting network is BiRefNet
def test_birefnet_without_snapshot_says_so(tmp_path, capsys, monkeypatch, model):
    monkeypatch.setattr(build_engines, "_missing_modules", lambda *names: [])
    monkeypatch.delenv(build_engines.BIREFNET_SNAPSHOT_ENV, raising=False)
    code = build_engines.main(["--target", "onnx", "--output", str(tmp_path / "o"), "--models", model,
                               "--random-init"])
    err = capsys.readouterr().err
    assert code == 2 and "--birefnet-snapshot" in err and "PyPI" in err and "BiRefNet" in err


def test_birefnet_snapshot_layout_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build_engines, "_missing_modules", lambda *names: [])
    snapshot = tmp_path / "BiRefNet_lite"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "BiRefNet_config.BiRefNetConfig", "AutoModelForImageSegmentation": "birefnet.BiRefNet"}}))
    args = ["--target", "onnx", "--output", str(tmp_path / "o"), "--models", "matting",
            "--birefnet-snapshot", str(snapshot)]
    assert build_engines.main(args) == 2
    assert "birefnet.py" in capsys.readouterr().err
    (snapshot / "birefnet.py").write_text("# modelling code\n")
    assert build_engines.main(args) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_no_heavy_imports_on_the_serving_paths(tmp_path):
    """--target cpu, the refusing tensorrt target and the orchestrator never import torch & co."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
sys.modules['tensorrt'] = None
import build_engines
assert build_engines.main(['--target', 'tensorrt', '--output', {str(tmp_path / 'repo')!r}]) == 2
import engines.cpu_repository, engines.tensorrt_build, engines.export.checks, engines.export.common
import engines.export.yolo, engines.export.birefnet
import server.app
heavy = [m for m in ('torch', 'ultralytics', 'torchvision', 'sam2', 'transformers') if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
