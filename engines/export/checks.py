"""Checks every export goes through: ``onnx.checker`` and ONNX Runtime against PyTorch.

Shared by the exporters (YOLOv8, BiRefNet, the SAM 2 parts). torch is imported lazily, inside
``compare``: importing this module costs onnx + numpy only.

    from engines.export.checks import check_model, compare, random_inputs

    check_model("out/yolov8.onnx")                         # onnx.checker, full_check (shape inference)
    inputs = random_inputs("out/yolov8.onnx", {"batch": 2}, seed=0)
    report = compare(torch_module, "out/yolov8.onnx", inputs, rtol=1e-3, atol=1e-3)
    print(report)                                          # one line per output: max abs / max rel error
    report.raise_if_failed()

``compare`` calls ``torch_module(*tensors)`` with the inputs in the dict's order (the ONNX input
order), in eval mode under ``torch.inference_mode()``; the module's result (a tensor, a
tuple/list of tensors, or a dict) is matched to the ONNX outputs by position, or by name for a
dict whose keys are the ONNX output names. An output passes when every element satisfies
``|ort - torch| <= atol + rtol * |torch|`` (``numpy.allclose``), integer and bool outputs when
they are equal. ``max_rel`` is ``max |ort - torch| / |torch|`` over the elements with
``|torch| > atol`` (elsewhere a relative error says nothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx


class ExportCheckError(AssertionError):
    """An exported graph is invalid or disagrees with the PyTorch module beyond the tolerances."""


@dataclass(frozen=True)
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    # Elements outside atol + rtol * |ref| (mismatching elements for integer outputs).
    mismatched: int
    ok: bool
    ref_max_abs: float  # largest |torch| value, to read max_abs against

    def line(self) -> str:
        status = "ok" if self.ok else f"FAIL ({self.mismatched} elements out of tolerance)"
        return (f"{self.name} {list(self.shape)} {self.dtype}: max abs err {self.max_abs:.3e}, "
                f"max rel err {self.max_rel:.3e} (|ref| max {self.ref_max_abs:.3g}) {status}")


@dataclass(frozen=True)
class CompareReport:
    onnx_path: str
    rtol: float
    atol: float
    inputs: dict[str, tuple[tuple[int, ...], str]]
    outputs: list[OutputDiff]
    torch_s: float
    ort_s: float
    providers: tuple[str, ...] = field(default=("CPUExecutionProvider",))

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def __str__(self) -> str:
        shapes = ", ".join(f"{n} {list(s)} {d}" for n, (s, d) in self.inputs.items())
        head = (f"{Path(self.onnx_path).name}: ONNX Runtime vs PyTorch on random inputs ({shapes}); "
                f"tolerance |err| <= {self.atol:g} + {self.rtol:g}*|ref|: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join([head, *(f"  {o.line()}" for o in self.outputs)])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise ExportCheckError(str(self))


def check_model(onnx_path: str | Path) -> onnx.ModelProto:
    """``onnx.checker`` with full_check (strict shape inference); returns the model (no weights
    loaded for models stored with external data). Raises ``ExportCheckError``."""
    path = str(onnx_path)
    try:
        # The path form works for models over 2 GB (external data) too.
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportCheckError(f"{path}: onnx.checker: {exc}") from exc
    return onnx.load(path, load_external_data=False)


_NUMPY_OF_ONNX = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.BOOL: np.bool_,
}


def random_inputs(onnx_path: str | Path, sizes: Mapping[str, int] | None = None, *, seed: int = 0,
                  overrides: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Random arrays for every graph input, in graph order.

    A dynamic dimension takes ``sizes[dim_param]`` (e.g. ``{"batch": 2}``), else 1. uint8 inputs
    are uniform 0..255, floats standard normal, integers uniform 0..3, bools random. ``overrides``
    replaces chosen inputs (e.g. valid point labels)."""
    sizes = dict(sizes or {})
    overrides = dict(overrides or {})
    model = onnx.load(str(onnx_path), load_external_data=False)
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    result: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in overrides:
            result[value.name] = np.asarray(overrides[value.name])
            continue
        t = value.type.tensor_type
        dtype = _NUMPY_OF_ONNX.get(t.elem_type)
        if dtype is None:
            raise ValueError(f"input {value.name!r}: unsupported type {onnx.TensorProto.DataType.Name(t.elem_type)}")
        shape = [d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 1) for d in t.shape.dim]
        if dtype == np.uint8:
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif np.issubdtype(dtype, np.floating):
            array = rng.standard_normal(size=shape).astype(dtype)
        elif dtype == np.bool_:
            array = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            array = rng.integers(0, 4, size=shape).astype(dtype)
        result[value.name] = array
    return result


def ort_session(onnx_path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=list(providers))


def compare(torch_module: Any, onnx_path: str | Path, inputs: Mapping[str, np.ndarray], rtol: float = 1e-3,
            atol: float = 1e-4, *, check: bool = True, providers: Sequence[str] = ("CPUExecutionProvider",),
            threads: int = 0) -> CompareReport:
    """Run ``torch_module`` and the ONNX graph on the same ``inputs``; report every output's errors.

    ``check``: run ``check_model`` first. Does not raise on a mismatch: look at ``report.ok`` or
    call ``report.raise_if_failed()``."""
    import torch

    if check:
        check_model(onnx_path)
    inputs = {name: np.ascontiguousarray(value) for name, value in inputs.items()}

    session = ort_session(onnx_path, providers, threads)
    onnx_outputs = [o.name for o in session.get_outputs()]
    feed_names = {i.name for i in session.get_inputs()}
    missing = feed_names - set(inputs)
    if missing:
        raise ValueError(f"inputs missing for ONNX graph inputs {sorted(missing)}")
    started = time.perf_counter()
    ort_values = session.run(onnx_outputs, {k: v for k, v in inputs.items() if k in feed_names})
    ort_s = time.perf_counter() - started

    if hasattr(torch_module, "eval"):
        torch_module.eval()
    tensors = [torch.from_numpy(v.copy()) for v in inputs.values()]
    started = time.perf_counter()
    with torch.inference_mode():
        result = torch_module(*tensors)
    torch_s = time.perf_counter() - started
    torch_values = _match_outputs(result, onnx_outputs)

    diffs = [_diff(name, ref, got, rtol, atol) for name, ref, got in zip(onnx_outputs, torch_values, ort_values)]
    return CompareReport(
        onnx_path=str(onnx_path), rtol=rtol, atol=atol,
        inputs={k: (tuple(v.shape), str(v.dtype)) for k, v in inputs.items()},
        outputs=diffs, torch_s=torch_s, ort_s=ort_s, providers=tuple(providers),
    )


def _match_outputs(result: Any, onnx_outputs: list[str]) -> list[np.ndarray]:
    import torch

    if isinstance(result, Mapping):
        if set(onnx_outputs) <= set(result):
            values = [result[name] for name in onnx_outputs]
        else:
            values = list(result.values())
    elif isinstance(result, (tuple, list)):
        values = _flatten(result)
    else:
        values = [result]
    if len(values) != len(onnx_outputs):
        raise ExportCheckError(f"the PyTorch module returned {len(values)} tensors, the ONNX graph has "
                               f"{len(onnx_outputs)} outputs {onnx_outputs}")
    return [v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in values]


def _flatten(items: Any) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, (tuple, list)):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def _diff(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> OutputDiff:
    if ref.shape != got.shape:
        return OutputDiff(name, tuple(got.shape), str(got.dtype), float("inf"), float("inf"), -1, False, float("nan"))
    if not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(got.dtype, np.floating)):
        mismatched = int(np.count_nonzero(ref != got))
        max_abs = float(np.abs(ref.astype(np.int64) - got.astype(np.int64)).max(initial=0))
        return OutputDiff(name, tuple(got.shape), str(got.dtype), max_abs, 0.0, mismatched, mismatched == 0,
                          float(np.abs(ref.astype(np.int64)).max(initial=0)))
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    nan_mismatch = int(np.count_nonzero(np.isnan(r) != np.isnan(g)))
    both = ~(np.isnan(r) | np.isnan(g))
    err = np.abs(r - g)[both]
    mag = np.abs(r)[both]
    max_abs = float(err.max(initial=0.0))
    big = mag > atol
    max_rel = float((err[big] / mag[big]).max(initial=0.0))
    mismatched = int(np.count_nonzero(err > atol + rtol * mag)) + nan_mismatch
    return OutputDiff(name, tuple(got.shape), str(got.dtype), max_abs, max_rel, mismatched, mismatched == 0,
                      float(mag.max(initial=0.0)))
