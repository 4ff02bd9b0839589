"""YOLOv8 -> ONNX with the Framewise contract (build_engines.py --target onnx).

    images UINT8 [batch, 640, 640, 3] (letterboxed RGB) -> output0 FP32 [batch, 84, 8400]

The network is exported by Ultralytics' own exporter (``YOLO(...).export(format="onnx")``,
dynamic axes, no simplifier), the spatial size is then fixed to the contract's 640x640 (only the
batch stays dynamic) and the uint8 NHWC input with cast, 1/255 scaling and transpose inside the
graph is put in front by ``engines.onnx_wrap.prepend_uint8_nhwc_preprocessing``, the same
surgery the CPU repository applies to the int8 weights. Class names stay in the ONNX
metadata (``names``), where the CPU builder reads them too.

Weights: ``--yolo-weights file.pt`` (an Ultralytics checkpoint), or ``--random-init``: the
architecture of ``yolov8n.yaml`` (shipped inside the ultralytics package) with weights drawn from
a seeded generator and the 80 COCO class names, so the whole path is exercised without a download.

End-to-end variant (``--yolo-end2end``, file ``yolov8_end2end.onnx``, not served by the GPU
repository, whose orchestrator decodes the raw head): Ultralytics' ``nms=True`` export, NMS inside
the graph, ``images`` UINT8 [1, 640, 640, 3] -> ``output0`` FP32 [1, 300, 6], rows
``x1, y1, x2, y2, score, class_id`` in letterboxed model pixels, zero rows past the detections.
Class-aware NMS with Ultralytics' export defaults (conf 0.25, IoU 0.7). Batch 1 only: the
exporter unrolls its per-image NMS loop over the batch size it traces. With random weights no
score passes 0.25, so its check compares empty outputs; it means something with real weights.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from engines.export import checks
from engines.export.common import DEFAULT_OPSET, ExportResult, offline, seed_everything, set_dims
from engines.onnx_wrap import prepend_uint8_nhwc_preprocessing

NAME = "yolov8"
END2END_NAME = "yolov8_end2end"
IMAGE_SIZE = 640
# ORT vs PyTorch, float32 on both sides: boxes are in pixels (0..640), scores in 0..1.
RTOL = 1e-3
ATOL = 1e-3


def _coco_names() -> list[str]:
    import ultralytics
    import yaml

    data = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml").read_text())
    names = data["names"]
    return [str(names[i]) for i in range(len(names))]


def load_model(weights: Path | None, *, random_init: bool, variant: str = "yolov8n", seed: int = 0) -> tuple[Any, str]:
    """An Ultralytics ``YOLO`` object and a description of where its weights come from."""
    offline()
    from ultralytics import YOLO

    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"YOLOv8 weights not found: {weights}")
        return YOLO(str(weights)), f"{weights.name} (Ultralytics checkpoint)"
    if not random_init:
        raise ValueError("YOLOv8 export needs --yolo-weights FILE.pt or --random-init")
    seed_everything(seed)
    model = YOLO(f"{variant}.yaml")  # the architecture file ships inside the ultralytics package
    names = _coco_names()
    model.model.names = dict(enumerate(names))
    return model, f"random-init {variant}.yaml (seed {seed}, COCO class names)"


class Uint8NhwcReference:
    """The PyTorch side of the comparison: the same contract as the exported graph."""

    def __new__(cls, network: Any):
        import torch

        class _Wrapped(torch.nn.Module):
            def __init__(self, net: Any) -> None:
                super().__init__()
                self.net = net

            def forward(self, images: torch.Tensor) -> torch.Tensor:
                x = images.permute(0, 3, 1, 2).float() / 255.0
                y = self.net(x)
                return y[0] if isinstance(y, (tuple, list)) else y

        return _Wrapped(network).eval()


def export_yolov8(output_dir: Path, *, weights: Path | None = None, random_init: bool = False,
                  variant: str = "yolov8n", seed: int = 0, opset: int = DEFAULT_OPSET, check_batch: int = 2,
                  rtol: float = RTOL, atol: float = ATOL, log=print) -> list[ExportResult]:
    """Write ``yolov8.onnx`` (the raw head, the served contract) into ``output_dir``, checked by
    onnx.checker and against PyTorch; returns the result (report included)."""
    model, source = load_model(weights, random_init=random_init, variant=variant, seed=seed)
    return [_export_raw(model, source, Path(output_dir), seed=seed, opset=opset, check_batch=check_batch,
                        rtol=rtol, atol=atol, log=log)]


def export_yolov8_end2end(output_dir: Path, *, weights: Path | None = None, random_init: bool = False,
                          variant: str = "yolov8n", seed: int = 0, opset: int = DEFAULT_OPSET, rtol: float = RTOL,
                          atol: float = ATOL, log=print) -> list[ExportResult]:
    """Write ``yolov8_end2end.onnx`` (NMS inside, batch 1; not served by model_repository/)."""
    model, source = load_model(weights, random_init=random_init, variant=variant, seed=seed)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return [_export_end2end(model, source, Path(output_dir), seed=seed, opset=opset, rtol=rtol, atol=atol, log=log)]


def _export_raw(model: Any, source: str, output_dir: Path, *, seed: int, opset: int, check_batch: int,
                rtol: float, atol: float, log) -> ExportResult:
    import numpy as np

    output_dir.mkdir(parents=True, exist_ok=True)
    num_outputs = 4 + len(model.model.names)
    log(f"[{NAME}] exporting with Ultralytics (opset {opset}, dynamic batch)")
    graph = set_dims(_ultralytics_export(model, opset=opset, nms=False),
                     {"images": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE],
                      "output0": ["batch", num_outputs, _anchors(IMAGE_SIZE)]})
    path = _finish(graph, output_dir / f"{NAME}.onnx", source)
    checks.check_model(path)
    inputs = {"images": np.random.default_rng(seed).integers(0, 256, (check_batch, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                               dtype=np.uint8)}
    report = checks.compare(_reference(model, nms=False), path, inputs, rtol=rtol, atol=atol, check=False)
    log(str(report))
    return ExportResult(NAME, path, source, report)


def _export_end2end(model: Any, source: str, output_dir: Path, *, seed: int, opset: int, rtol: float,
                    atol: float, log) -> ExportResult:
    """Batch 1 only: Ultralytics unrolls its per-image NMS loop over the batch size it traces."""
    import numpy as np

    log(f"[{END2END_NAME}] exporting with Ultralytics (opset {opset}, batch 1, NMS inside)")
    path = _finish(_ultralytics_export(model, opset=opset, nms=True), output_dir / f"{END2END_NAME}.onnx", source)
    checks.check_model(path)
    inputs = {"images": np.random.default_rng(seed).integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)}
    report = checks.compare(_reference(model, nms=True), path, inputs, rtol=rtol, atol=atol, check=False)
    log(str(report))
    result = ExportResult(END2END_NAME, path, source, report, in_repository=False)
    if report.outputs and report.outputs[0].ref_max_abs == 0.0:
        result.notes.append("no detection above conf 0.25 on the check input (random weights): the comparison "
                            "is vacuous for this export")
        log(f"  note: no detection above conf 0.25 on the check input: the {END2END_NAME} comparison is vacuous")
    result.notes.append("images UINT8 [1, 640, 640, 3] -> output0 FP32 [1, 300, 6]: x1, y1, x2, y2, score, class_id "
                        "in letterboxed model pixels, zero rows past the detections (class-aware NMS, conf 0.25, "
                        "IoU 0.7); batch 1 only; not served by model_repository/")
    return result


def _finish(graph: onnx.ModelProto, path: Path, source: str) -> Path:
    """uint8 NHWC input in front, provenance in the metadata, saved at ``path``."""
    graph = prepend_uint8_nhwc_preprocessing(graph)
    meta = {p.key: p.value for p in graph.metadata_props}
    meta.update({"framewise_source": source, "framewise_input_layout": "NHWC_RGB_UINT8"})
    onnx.helper.set_model_props(graph, meta)
    onnx.save(graph, str(path))
    return path


def _anchors(size: int) -> int:
    return sum((size // s) ** 2 for s in (8, 16, 32))


def _ultralytics_export(model: Any, *, opset: int, nms: bool) -> onnx.ModelProto:
    """Run Ultralytics' exporter in a scratch directory (it writes next to the weights or into
    the working directory) and return the graph; the scratch directory is removed."""
    import shutil

    scratch = Path(tempfile.mkdtemp(prefix="framewise-yolo-"))
    try:
        with _cwd(scratch):
            # The raw head: dynamic axes (the spatial ones are fixed afterwards). NMS inside: static,
            # batch 1 (the exporter unrolls its per-image NMS loop over the traced batch).
            kwargs: dict[str, Any] = {"format": "onnx", "imgsz": IMAGE_SIZE, "dynamic": not nms, "simplify": False,
                                      "opset": opset, "device": "cpu", "half": False, "batch": 1, "nms": nms}
            produced = model.export(**kwargs)
        path = Path(produced)
        if not path.is_absolute():
            path = scratch / path
        if not path.is_file():
            raise RuntimeError(f"Ultralytics export reported {produced} but no such file exists")
        return onnx.load(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _reference(model: Any, nms: bool) -> Any:
    """The PyTorch module the exported graph is compared with."""
    import copy

    network = copy.deepcopy(model.model).float().eval()
    for p in network.parameters():
        p.requires_grad_(False)
    if nms:
        from ultralytics.cfg import get_cfg
        from ultralytics.engine.exporter import NMSModel  # Ultralytics' own end-to-end wrapper

        args = get_cfg(overrides={"format": "onnx", "nms": True, "imgsz": IMAGE_SIZE, "dynamic": False, "batch": 1})
        args.conf = 0.25 if args.conf is None else args.conf  # the exporter's default for NMS exports
        network = NMSModel(_export_mode(network), args)
    return Uint8NhwcReference(network)


def _export_mode(network: Any) -> Any:
    """Put the Detect head in its export mode (one tensor out), as the exporter does."""
    for m in network.modules():
        if type(m).__name__ in {"Detect"}:
            m.export = True
            m.format = "onnx"
            m.dynamic = True
    return network


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
