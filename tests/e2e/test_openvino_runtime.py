"""The python-backend model on OpenVINO in bf16 (engines/python_backend/onnx_model.py, runtime
"openvino"), served by a real Triton: what `build_engines.py --sam2-precision bf16` writes for the
SAM 2 image encoder, memory attention and memory encoder (the decoder stays on ONNX Runtime in
fp32). Each part's outputs are compared with ONNX Runtime in fp32 on the same ONNX file and
the same inputs: bf16 keeps 8 bits of mantissa, so they agree to about 1 % of the output's range.
That OpenVINO (and not ONNX Runtime) ran them, in the precision the CPU allows, is read from what
each instance logged when Triton loaded it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from engines import cpu_tuning
from engines.cpu_repository import build_cpu_repository
from tests.conftest import SAM2_TEST_IMAGE_SIZE, YOLO_ONNX, TritonProcess, free_port
from server.triton.launcher import TritonPorts

SAM2_PARTS = ("sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder")
BF16_PARTS = cpu_tuning.BF16_SAM2_PARTS
# Rows of a dynamic dimension in the test inputs: 3 memories, 5 object pointers, 2 prompt points.
DYNAMIC_ROWS = 3
_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
          "TYPE_UINT8": np.uint8}


@pytest.fixture(scope="module")
def bf16_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    repository = build_cpu_repository(tmp_path_factory.mktemp("bf16") / "repository", YOLO_ONNX,
                                      sam2_image_size=SAM2_TEST_IMAGE_SIZE, sam2_precision="bf16")
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
    control = ("--model-control-mode=explicit", *(f"--load-model={part}" for part in SAM2_PARTS))
    process = TritonProcess(repository, tmp_path_factory.mktemp("bf16-triton"), ports, extra_args=control)
    process.start()
    yield process
    process.stop()


def _config(repository: Path, part: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repository / part / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _inputs(config: model_config_pb2.ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Two rows: the image encoder, compiled for one row (fixed_batch), must run them one by one.
    batch = [2] if config.max_batch_size > 0 else []
    feeds = {}
    for spec in config.input:
        shape = batch + [DYNAMIC_ROWS if d < 0 else d for d in spec.dims]
        dtype = _NUMPY[model_config_pb2.DataType.Name(spec.data_type)]
        if np.issubdtype(dtype, np.integer):  # indices (temporal rows, labels): small and valid
            feeds[spec.name] = rng.integers(0, DYNAMIC_ROWS, shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def test_the_heavy_parts_run_on_openvino_bf16_and_the_others_on_onnx_runtime(bf16_triton: TritonProcess) -> None:
    for part in SAM2_PARTS:
        params = {k: v.string_value for k, v in _config(bf16_triton.repository, part).parameters.items()}
        expected = ("openvino", "bf16") if part in BF16_PARTS else ("onnxruntime", "f32")
        assert (params["runtime"], params["inference_precision"]) == expected, part
    log = (bf16_triton.work_dir / "tritonserver.log").read_text(errors="replace")
    granted = re.findall(r"(sam2_\w+) instance \S+: \S+ on openvino [\d.]+\S* CPU, inference precision (\w+)", log)
    assert {name for name, _ in granted} == set(BF16_PARTS), log[-3000:]
    on_ort = set(re.findall(r"(sam2_\w+) instance \S+: \S+ on onnxruntime [\d.]+ CPU fp32", log))
    assert on_ort == set(SAM2_PARTS) - set(BF16_PARTS), log[-3000:]
    # OpenVINO settles on bf16 only where the CPU computes it; elsewhere it says f32 (and runs it).
    expected = "bf16" if cpu_tuning.cpu_has_bf16() else "f32"
    assert {precision for _, precision in granted} == {expected}
    # The image encoder alone is compiled for one row, with OpenVINO's snippets off.
    compiled = dict(re.findall(r"(sam2_\w+) instance \S+: \S+ on openvino .*?(fixed_batch=\w+, snippets=\w+)", log))
    assert compiled == {part: ("fixed_batch=True, snippets=False" if part in cpu_tuning.FIXED_BATCH_SAM2_PARTS
                               else "fixed_batch=False, snippets=True") for part in BF16_PARTS}, compiled
    assert re.search(r"sam2_image_encoder instance \S+: .* per_item_execution=True", log)


@pytest.mark.parametrize("part", SAM2_PARTS)
def test_each_part_on_openvino_bf16_matches_onnx_runtime_fp32(bf16_triton: TritonProcess, part: str) -> None:
    config = _config(bf16_triton.repository, part)
    feeds = _inputs(config, np.random.default_rng(sum(map(ord, part))))
    session = ort.InferenceSession(str(bf16_triton.repository / part / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in config.output]
    expected = dict(zip(names, session.run(names, feeds)))

    with triton_grpc.InferenceServerClient(bf16_triton.url) as client:
        inputs = []
        for name, array in feeds.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), triton_grpc.np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(part, inputs, outputs=[triton_grpc.InferRequestedOutput(n) for n in names],
                              client_timeout=60)
    for name in names:
        got, want = result.as_numpy(name).astype(np.float32), expected[name].astype(np.float32)
        assert got.shape == want.shape, name
        scale = float(np.abs(want).max()) or 1.0
        error = float(np.abs(got - want).max()) / scale
        assert error < 0.05, f"{part}.{name}: max error {error:.3g} of the output's range"
