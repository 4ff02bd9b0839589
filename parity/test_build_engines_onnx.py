"""The documented SAM 2 export, run the way a user runs it: `python build_engines.py --target onnx
--models sam2 --random-init --sam2-image-size S --output DIR` as a process, then `--target cpu
--sam2-onnx-dir DIR` on what it wrote. Needs torch and the SAM 2 package: the export environment
(`make parity`; never `make test`, whose environment has no torch; tests/unit/test_build_engines_onnx.py
checks the call signatures there without torch).

S = 256 keeps the run to ~15 s on 2 cores: the real SAM 2.1 hiera-tiny architecture (seeded random
weights) at a smaller model size, which SAM 2 supports for any multiple of 32 (the exporter's
check_image_size). The full size, 1024, is what `make parity` exports in parity/run.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from engines.cpu_tuning import BF16_SAM2_PARTS

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_ENGINES = REPO_ROOT / "build_engines.py"
PARTS = ("sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder")
SIZE = 256


def _build_engines(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILD_ENGINES), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("sam2_onnx")
    run = _build_engines("--target", "onnx", "--models", "sam2", "--random-init", "--seed", "0",
                         "--sam2-image-size", str(SIZE), "--output", str(output))
    assert run.returncode == 0, f"export failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return output


def test_export_writes_the_four_parts_at_the_asked_size(exported):
    for name in PARTS:
        model = onnx.load(str(exported / f"{name}.onnx"), load_external_data=False)
        metadata = {p.key: p.value for p in model.metadata_props}
        assert metadata["framewise_part"] == name
        assert metadata["image_size"] == str(SIZE)
        assert "RANDOM weights" in metadata["source"]
    image = onnx.load(str(exported / "sam2_image_encoder.onnx"), load_external_data=False).graph.input[0]
    assert [d.dim_value for d in image.type.tensor_type.shape.dim[1:]] == [SIZE, SIZE, 3]
    described = json.loads((exported / "sam2_export.json").read_text())
    assert described["image_size"] == SIZE and sorted(described["parts"]) == sorted(PARTS)


def test_export_report_has_every_check_passing(exported):
    report = json.loads((exported / "EXPORT.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    assert sorted(models) == sorted(PARTS)
    for name in PARTS:
        check = models[name]["check"]
        assert check is not None and check["ok"], f"{name}: {check}"


def _serve(exported: Path, tmp_path: Path, precision: str) -> Path:
    """The CPU repository build_engines.py writes for the export, in ``precision``."""
    repository = tmp_path / "repo"
    run = _build_engines("--target", "cpu", "--sam2-onnx-dir", str(exported), "--sam2-image-size", str(SIZE),
                         "--sam2-precision", precision, "--output", str(repository), timeout=120)
    assert run.returncode == 0, run.stderr
    return repository


def test_cpu_repository_serves_the_export(exported, tmp_path):
    repository = _serve(exported, tmp_path, "f32")
    for name in PARTS:
        served = repository / name / "1" / "model.onnx"
        config = (repository / name / "config.pbtxt").read_text()
        if name == "sam2_memory_attention":
            # served with its 4 cross-attentions' value projections folded (engines/value_fold.py) and
            # its attentions fused (engines/attention_fusion.py), checked against the export
            ops = [n.op_type for n in onnx.load(str(served)).graph.node]
            assert ops.count("MultiHeadAttention") == 8 and "Softmax" not in ops
            assert ("4 value projections folded behind their attention (engines/value_fold.py); "
                    "8 attentions fused into com.microsoft MultiHeadAttention") in config
        else:
            assert served.read_bytes() == (exported / f"{name}.onnx").read_bytes()
        assert f'key: "image_size" value {{ string_value: "{SIZE}" }}' in config
        assert "SAM 2.1 hiera-tiny (random weights)" in config
        # Every part batches (one object per row); on a CPU the attention runs its rows one by one.
        per_item = "true" if name == "sam2_memory_attention" else "false"
        assert f'key: "per_item_execution" value {{ string_value: "{per_item}" }}' in config, name


def test_cpu_repository_in_bf16_serves_the_heavy_parts_on_openvino(exported, tmp_path):
    repository = _serve(exported, tmp_path, "bf16")
    for name in PARTS:
        config = (repository / name / "config.pbtxt").read_text()
        heavy = name in BF16_SAM2_PARTS
        runtime, precision = ("openvino", "bf16") if heavy else ("onnxruntime", "f32")
        assert f'key: "runtime" value {{ string_value: "{runtime}" }}' in config, name
        assert f'key: "inference_precision" value {{ string_value: "{precision}" }}' in config, name
        # OpenVINO gets the memory attention unfused (the fused op is ONNX Runtime's own) but with
        # its value projections folded; every other part is the export as it is.
        served = (repository / name / "1" / "model.onnx").read_bytes()
        if name == "sam2_memory_attention":
            assert "4 value projections folded behind their attention (engines/value_fold.py)\"" in config
            ops = [n.op_type for n in onnx.load(str(repository / name / "1" / "model.onnx")).graph.node]
            assert "MultiHeadAttention" not in ops and ops.count("Softmax") == 8
        else:
            assert served == (exported / f"{name}.onnx").read_bytes(), name


def test_cpu_repository_refuses_the_export_at_another_size(exported, tmp_path):
    run = _build_engines("--target", "cpu", "--sam2-onnx-dir", str(exported), "--sam2-image-size", "512",
                         "--output", str(tmp_path / "repo"), timeout=120)
    assert run.returncode == 1
    assert "contract at SAM 2 size 512" in run.stderr


def test_export_refuses_a_size_hiera_cannot_tile(tmp_path):
    """80 passes the flag's own check (a multiple of 16) but not the image encoder's windows."""
    output = tmp_path / "onnx"
    run = _build_engines("--target", "onnx", "--models", "sam2", "--random-init", "--sam2-image-size", "80",
                         "--output", str(output), timeout=300)
    assert run.returncode == 1
    assert "S=80 is not a multiple of 32" in run.stderr and "try S=64 or 96" in run.stderr
    assert not list(output.glob("*.onnx"))
