"""The Triton python-backend model (engines/python_backend/onnx_model.py) in process, with a small
stand-in for Triton's ``triton_python_backend_utils`` (the real one exists only inside Triton's
stub process): how ``execute`` treats the requests Triton's dynamic batcher hands over. Served by
a real Triton: tests/e2e/test_tracking.py, tests/e2e/test_openvino_runtime.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

MODEL_FILE = Path(__file__).resolve().parents[2] / "engines" / "python_backend" / "onnx_model.py"


@dataclass
class _Tensor:
    name: str
    array: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.array


@dataclass
class _Response:
    output_tensors: list[_Tensor]
    error: object = None


@dataclass
class _Request:
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor
    module.InferenceResponse = _Response
    module.TritonError = lambda message: message
    module.get_input_tensor_by_name = lambda request, name: (
        _Tensor(name, request.inputs[name]) if name in request.inputs else None)
    module.triton_string_to_numpy = lambda name: {"TYPE_FP32": np.float32}[name]
    module.Logger = types.SimpleNamespace(log_info=lambda message: None, log_warn=lambda message: None)
    return module


def _load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parameters: dict[str, str]):
    """The python-backend model over y[b] = x[b] @ W + z[b] (rows independent), max_batch_size 8,
    with its session's runs counted."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "z"], ["y"])], "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n", 4])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")],
    )
    version = tmp_path / "1"
    version.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(version / "m.onnx"))
    config = {
        "name": "rows", "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32"}, {"name": "z", "data_type": "TYPE_FP32"}],
        "output": [{"name": "y", "data_type": "TYPE_FP32"}],
        "parameters": {k: {"string_value": v} for k, v in {"onnx_file": "m.onnx", "stand_in": "true", **parameters}.items()},
    }
    spec = importlib.util.spec_from_file_location("framewise_test_onnx_model", MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path),
                         "model_version": "1", "model_instance_name": "rows_0"})
    runs = []
    real_run = instance.session.run

    def counted(names, feeds):
        runs.append({name: a.shape for name, a in feeds.items()})
        return real_run(names, feeds)

    instance.session.run = counted
    instance.runs = runs
    instance.weight = weight
    return instance


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A batching model (per_item_execution "false"): see _load."""
    return _load(tmp_path, monkeypatch, {"per_item_execution": "false"})


def request(rows: int, n: int, seed: int) -> _Request:
    rs = np.random.RandomState(seed)
    return _Request({"x": rs.rand(rows, n, 3).astype(np.float32), "z": rs.rand(rows, n, 4).astype(np.float32)})


def expected(model, req: _Request) -> np.ndarray:  # noqa: ANN001
    return req.inputs["x"] @ model.weight + req.inputs["z"]


def test_requests_of_equal_shapes_run_as_one_call_and_each_gets_its_rows(model) -> None:  # noqa: ANN001
    requests = [request(2, 5, 0), request(1, 5, 1), request(3, 5, 2)]
    responses = model.execute(requests)
    assert model.runs == [{"x": (6, 5, 3), "z": (6, 5, 4)}]
    for req, response in zip(requests, responses, strict=True):
        assert response.error is None
        (tensor,) = response.output_tensors
        np.testing.assert_allclose(tensor.array, expected(model, req), rtol=1e-6)


def test_requests_of_other_shapes_run_in_their_own_calls(model) -> None:  # noqa: ANN001
    requests = [request(1, 5, 0), request(1, 7, 1), request(2, 5, 2)]  # n = 7 cannot join n = 5
    responses = model.execute(requests)
    assert sorted(run["x"] for run in model.runs) == [(1, 7, 3), (3, 5, 3)]
    for req, response in zip(requests, responses, strict=True):
        np.testing.assert_allclose(response.output_tensors[0].array, expected(model, req), rtol=1e-6)


def test_a_bad_request_fails_alone(model) -> None:  # noqa: ANN001
    bad = _Request({"x": np.zeros((2, 5, 3), np.float32), "z": np.zeros((1, 5, 4), np.float32)})  # batch sizes differ
    missing = _Request({"x": np.zeros((1, 5, 3), np.float32)})
    good = [request(1, 5, 0), request(2, 5, 1)]
    responses = model.execute([good[0], bad, missing, good[1]])
    assert "disagree on the batch size" in responses[1].error and "missing input 'z'" in responses[2].error
    for req, response in zip(good, (responses[0], responses[3]), strict=True):
        assert response.error is None
        np.testing.assert_allclose(response.output_tensors[0].array, expected(model, req), rtol=1e-6)
    assert model.runs == [{"x": (3, 5, 3), "z": (3, 5, 4)}]


class _CountingRelease:
    """Stands in front of an OpenVINO CompiledModel, counting release_memory calls."""

    def __init__(self, compiled) -> None:  # noqa: ANN001
        self.compiled, self.released = compiled, 0

    def release_memory(self) -> None:
        self.released += 1
        self.compiled.release_memory()


def test_openvino_gives_its_working_memory_back_once_per_execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """arena_shrinkage "true" on OpenVINO: CompiledModel.release_memory after every execute (not
    after every row of a per-item batch), and the next calls still compute the same."""
    model = _load(tmp_path, monkeypatch, {"per_item_execution": "true", "runtime": "openvino",
                                          "inference_precision": "f32", "arena_shrinkage": "true"})
    assert model.session.release_memory
    model.session.model = counting = _CountingRelease(model.session.model)
    for seed in range(3):
        requests = [request(2, 5, seed), request(1, 5, seed + 10)]
        responses = model.execute(requests)
        for req, response in zip(requests, responses, strict=True):
            np.testing.assert_allclose(response.output_tensors[0].array, expected(model, req), rtol=1e-5)
    assert len(model.runs) == 9  # every row alone (per item)
    assert counting.released == 3


def test_a_failed_memory_release_is_logged_and_the_responses_still_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _load(tmp_path, monkeypatch, {"per_item_execution": "true", "runtime": "openvino",
                                          "inference_precision": "f32", "arena_shrinkage": "true"})
    warnings = []
    sys.modules["triton_python_backend_utils"].Logger.log_warn = warnings.append

    class _Failing:
        def release_memory(self) -> None:
            raise RuntimeError("no")

    model.session.model = _Failing()
    req = request(2, 5, 0)
    (response,) = model.execute([req])
    assert response.error is None
    np.testing.assert_allclose(response.output_tensors[0].array, expected(model, req), rtol=1e-5)
    assert len(warnings) == 1 and "giving the working memory back failed: RuntimeError: no" in warnings[0]


def test_openvino_fixed_batch_compiles_one_row_and_runs_a_batch_row_by_row(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """openvino_fixed_batch "true": the batch dimension is compiled as 1 (the others stay as the
    file has them), so every row of every request runs alone, even where the config asks for a
    batch in one call; openvino_snippets "false" turns OpenVINO's snippets off."""
    model = _load(tmp_path, monkeypatch, {"per_item_execution": "false", "runtime": "openvino",
                                          "inference_precision": "f32", "openvino_fixed_batch": "true",
                                          "openvino_snippets": "false"})
    assert model.session.fixed_batch and model.per_item
    shape = model.session.model.inputs[0].get_partial_shape()
    assert shape[0].get_length() == 1 and shape[1].is_dynamic
    assert "fixed_batch=True, snippets=False" in model.session.describe()  # the compiled model does not say
    requests = [request(2, 5, 0), request(3, 5, 1), request(1, 7, 2)]
    responses = model.execute(requests)
    for req, response in zip(requests, responses, strict=True):
        assert response.error is None
        np.testing.assert_allclose(response.output_tensors[0].array, expected(model, req), rtol=1e-5)
    assert len(model.runs) == 6 and all(shapes["x"][0] == 1 for shapes in model.runs)


def test_openvino_keeps_a_dynamic_batch_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _load(tmp_path, monkeypatch, {"per_item_execution": "false", "runtime": "openvino",
                                          "inference_precision": "f32"})
    assert not model.session.fixed_batch and not model.per_item
    assert model.session.model.inputs[0].get_partial_shape()[0].is_dynamic
    (response,) = model.execute([request(3, 5, 0)])
    assert response.error is None and len(model.runs) == 1


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, os.getpid())
print("executing", flush=True)
sys.stdin.readline()
"""


class _OtherInstance:
    """Another instance's process, executing (holding its lock on the presence file) until it is
    let go or killed."""

    def __init__(self, path: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "executing"

    def finish(self) -> None:
        self.process.communicate("\n", timeout=10)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def _contention_aware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FRAMEWISE_TRITON_RUN_DIR", str(tmp_path))
    model = _load(tmp_path, monkeypatch, {"per_item_execution": "true", "intra_op_threads": "2",
                                          "allow_spinning": "true", "contended_intra_op_threads": "1"})
    (path,) = tmp_path.glob("framewise-rows-*.instances")
    return model, str(path)


def test_presence_sees_another_process_executing_and_never_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = _contention_aware(tmp_path, monkeypatch)
    presence = model.session.presence
    assert not presence.others_executing()
    with presence.executing():
        assert not presence.others_executing()  # its own lock does not count
        other = _OtherInstance(path)
        assert presence.others_executing()
        other.finish()
        assert not presence.others_executing()
    crashed = _OtherInstance(path)
    assert presence.others_executing()
    crashed.kill()  # a lock dies with its process: a crashed instance never reads as busy
    assert not presence.others_executing()


def test_a_call_runs_on_the_wide_session_alone_and_on_the_narrow_one_beside_another_instance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = _contention_aware(tmp_path, monkeypatch)
    session = model.session
    described = session.describe()
    assert "alone: onnxruntime" in described and "intra_op_threads=2, allow_spinning=True" in described
    assert "while another instance executes: onnxruntime" in described
    assert "intra_op_threads=1, allow_spinning=False" in described
    req = request(2, 5, 0)
    (alone,) = model.execute([req])
    assert session.calls == {"alone": 2, "contended": 0}  # per item: two rows, two calls
    other = _OtherInstance(path)
    try:
        (contended,) = model.execute([req])
    finally:
        other.finish()
    assert session.calls == {"alone": 2, "contended": 2}
    np.testing.assert_array_equal(alone.output_tensors[0].array, contended.output_tensors[0].array)
    np.testing.assert_allclose(alone.output_tensors[0].array, expected(model, req), rtol=1e-6)
    model.execute([req])
    assert session.calls == {"alone": 4, "contended": 2}


def test_without_a_presence_file_every_call_takes_the_narrow_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slower alone, never oversubscribed: the safe side when the instances cannot see each other."""
    monkeypatch.setenv("FRAMEWISE_TRITON_RUN_DIR", str(tmp_path / "absent"))
    model = _load(tmp_path, monkeypatch, {"per_item_execution": "false", "intra_op_threads": "2",
                                          "contended_intra_op_threads": "1"})
    assert model.session.presence is None
    req = request(1, 5, 0)
    (response,) = model.execute([req])
    assert response.error is None and model.session.calls == {"alone": 0, "contended": 1}
