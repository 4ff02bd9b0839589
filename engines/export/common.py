"""Helpers shared by the exporters: offline environment, seeding, torch -> ONNX, graph contracts.

Imports only the standard library, numpy and onnx at module level; torch inside the functions.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.export.checks import CompareReport

DEFAULT_OPSET = 17  # GridSample needs >= 16; TensorRT 10.5's ONNX parser reads opsets 9..20

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
}


@dataclass
class ExportResult:
    """One exported graph: where it is, what it is, and how it compared with PyTorch."""

    name: str  # Triton model name (yolov8, matting, sam2_image_encoder, ...) or a variant
    path: Path
    source: str  # weights / snapshot / "random-init (seed N)"
    report: CompareReport | None = None
    notes: list[str] = field(default_factory=list)
    in_repository: bool = True  # False for variants the GPU repository does not serve

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.path.name,
            "source": self.source,
            "in_repository": self.in_repository,
            "contract": contract(self.path),
            "check": self.report.to_dict() if self.report is not None else None,
            "notes": self.notes,
        }


def offline() -> None:
    """No library may reach a hub: Hugging Face, transformers and Ultralytics run offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ.setdefault("YOLO_VERBOSE", "false")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def contract(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs and outputs as (name, Triton datatype, shape with symbolic dims as strings)."""
    return model_contract(onnx.load(str(path), load_external_data=False))


def model_contract(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """``contract`` of a graph in memory."""
    initializers = {i.name for i in model.graph.initializer}

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out.append({"name": v.name, "datatype": _ONNX_TO_TRITON.get(t.elem_type, str(t.elem_type)),
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def set_dims(model: onnx.ModelProto, dims: dict[str, list[int | str]]) -> onnx.ModelProto:
    """Declare fixed/symbolic dims of graph inputs and outputs (e.g. fix 640x640 of a graph exported
    with dynamic height/width), drop stale value_info and re-run shape inference."""
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        if value.name not in dims:
            continue
        wanted = dims[value.name]
        shape = value.type.tensor_type.shape
        if len(shape.dim) != len(wanted):
            raise ValueError(f"{value.name}: rank {len(shape.dim)}, asked to set {wanted}")
        for dim, new in zip(shape.dim, wanted):
            if isinstance(new, str):
                dim.Clear()
                dim.dim_param = new
            else:
                dim.Clear()
                dim.dim_value = int(new)
    del graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError:
        # Some exporter graphs defeat strict inference; the declared I/O dims still stand and
        # onnx.checker (full_check) runs on the saved file afterwards.
        return onnx.shape_inference.infer_shapes(model)


def torch_export_onnx(module: Any, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
                      batch_inputs: dict[str, int], opset: int = DEFAULT_OPSET) -> str:
    """Export with the TorchScript exporter where this torch has it (traced, the most tolerant of
    Python control flow in research code), else with ``torch.export`` (dynamo). Dim 0 of every
    name in ``batch_inputs`` (and of every output) is a dynamic ``batch``. Returns the exporter used."""
    import inspect
    import warnings

    import torch

    path = Path(path)
    # Static shapes are the point (only the batch is dynamic): the tracer's warnings about
    # Python ints taken from shapes say exactly that.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    params = inspect.signature(torch.onnx.export).parameters
    errors: list[str] = []
    if "dynamo" not in params or _legacy_exporter_available():
        try:
            kwargs: dict[str, Any] = {"dynamo": False} if "dynamo" in params else {}
            dynamic_axes = {name: {0: "batch"} for name in [*batch_inputs, *output_names]}
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, **kwargs)
            return "torchscript"
        except Exception as exc:  # noqa: BLE001 - fall through to the dynamo exporter, keep the reason
            errors.append(f"TorchScript exporter: {type(exc).__name__}: {exc}")
    try:
        batch = torch.export.Dim("batch", min=1, max=64)
        names = list(inspect.signature(module.forward).parameters)
        dynamic_shapes = {names[i]: ({0: batch} if input_names[i] in batch_inputs else None)
                          for i in range(len(args))}
        program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                    external_data=False)
        program.save(str(path))
        return "dynamo"
    except Exception as exc:
        errors.append(f"dynamo exporter: {type(exc).__name__}: {exc}")
        raise RuntimeError(f"cannot export {path.name} to ONNX:\n  " + "\n  ".join(errors)) from exc


def _legacy_exporter_available() -> bool:
    try:
        import torch.onnx.utils  # noqa: F401  (the TorchScript exporter lives there)
    except ImportError:
        return False
    return True
