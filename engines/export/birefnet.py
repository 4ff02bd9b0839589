"""BiRefNet -> ONNX with the Framewise matting contract (build_engines.py --target onnx).

    image UINT8 [batch, 1024, 1024, 3] (RGB) -> alpha FP32 [batch, 1, 1024, 1024] in 0..1

Written as ``matting.onnx``: the GPU repository's Triton model ``matting`` serves BiRefNet-lite
(the CPU repository's serves U^2-Netp behind the same contract, at its own S).

ImageNet normalisation (mean 0.485/0.456/0.406, std 0.229/0.224/0.225 on 0..1 pixels) and the
final sigmoid are inside the graph; only the batch is dynamic.

Weights and code come from a local Hugging Face snapshot folder (``--birefnet-snapshot DIR``,
e.g. a download of ``ZhengPeng7/BiRefNet_lite``, the variant to prefer on a T4): ``config.json``
whose ``auto_map`` names the modelling code shipped in the snapshot (``birefnet.BiRefNet``,
``BiRefNet_config.BiRefNetConfig``, the ``trust_remote_code`` layout) and ``model.safetensors``
(or ``pytorch_model.bin``). The code is imported from the folder as a package (relative imports
work, as with transformers' dynamic modules), with every hub switched offline
(``HF_HUB_OFFLINE=1``); the weights are loaded with ``strict=True``. The snapshot's code needs
what it imports: transformers, timm, kornia, einops (``make export-env`` installs them).

``--random-init`` with a snapshot folder builds the snapshot's architecture with seeded random
weights (the weights file may then be absent). Without a snapshot there is no BiRefNet: no
package on PyPI ships BiRefNet's modelling code (checked: rembg ships ONNX sessions that
download BiRefNet ONNX files, withoutbg, carvekit, transparent-background and dis-bg-remover ship
other networks), and no model hub is reachable from these machines.

deform_conv2d (the ASPPDeformable blocks) is exported through the grid_sample decomposition in
``engines.export.deform_conv``; the comparison runs the original module, torchvision's kernel
included, against ONNX Runtime, so it checks the decomposition too.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any

from engines.export import checks
from engines.export.common import DEFAULT_OPSET, ExportResult, offline, seed_everything, set_dims, torch_export_onnx

NAME = "matting"  # the Triton model (and ONNX file) this network is exported for
IMAGE_SIZE = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ORT vs PyTorch on the matte (0..1), float32 on both sides.
RTOL = 1e-3
ATOL = 1e-3
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class SnapshotError(ValueError):
    """The folder is not a usable BiRefNet snapshot."""


def describe_snapshot(snapshot: Path) -> dict[str, Any]:
    """Check the folder's layout without importing anything heavy (for the CLI's early checks)."""
    snapshot = Path(snapshot).expanduser()
    if not snapshot.is_dir():
        raise SnapshotError(f"BiRefNet snapshot folder not found: {snapshot}")
    config_path = snapshot / "config.json"
    if not config_path.is_file():
        raise SnapshotError(f"{snapshot} has no config.json: not a Hugging Face snapshot folder")
    config = json.loads(config_path.read_text())
    target = config.get("auto_map", {}).get("AutoModelForImageSegmentation")
    if not target or "." not in target:
        raise SnapshotError(f"{config_path}: auto_map.AutoModelForImageSegmentation is missing; expected the "
                            f"BiRefNet snapshot layout (e.g. \"birefnet.BiRefNet\")")
    module_file = target.rsplit(".", 1)[0].split("--")[-1]
    if not (snapshot / f"{module_file.replace('.', '/')}.py").is_file():
        raise SnapshotError(f"{snapshot} does not ship {module_file}.py, the modelling code config.json names")
    weights = next((snapshot / f for f in WEIGHT_FILES if (snapshot / f).is_file()), None)
    return {"path": snapshot.resolve(), "config": config, "target": target, "weights": weights}


def load_snapshot(snapshot: Path, *, random_init: bool = False, seed: int = 0) -> tuple[Any, str]:
    """The snapshot's BiRefNet (eval, float32, CPU) and a description of its weights."""
    info = describe_snapshot(snapshot)
    if info["weights"] is None and not random_init:
        raise SnapshotError(f"{info['path']} has no {' or '.join(WEIGHT_FILES)}; pass --random-init to build "
                            f"the snapshot's architecture with random weights")
    offline()
    import torch

    folder: Path = info["path"]
    package = "framewise_birefnet_" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(folder)]  # a namespace for the snapshot's files: relative imports work
        sys.modules[package] = pkg
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # and so do absolute ones (from BiRefNet_config import ...)
    module_name, class_name = info["target"].split("--")[-1].rsplit(".", 1)
    module = importlib.import_module(f"{package}.{module_name}")
    cls = getattr(module, class_name)

    config_obj = None
    config_target = info["config"].get("auto_map", {}).get("AutoConfig")
    if config_target:
        cmod, cname = config_target.split("--")[-1].rsplit(".", 1)
        config_cls = getattr(importlib.import_module(f"{package}.{cmod}"), cname)
        fields = {k: v for k, v in info["config"].items()
                  if not k.startswith("_") and k not in {"auto_map", "architectures", "custom_pipelines"}}
        config_obj = config_cls(**fields)

    seed_everything(seed)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "bb_pretrained" in params:
        kwargs["bb_pretrained"] = False  # never look for backbone weights on disk or a hub
    if "config" in params and config_obj is not None:
        kwargs["config"] = config_obj
    model = cls(**kwargs)

    if random_init:
        source = f"random-init {folder.name} architecture (seed {seed})"
    else:
        weights: Path = info["weights"]
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        state = {_strip(k): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SnapshotError(f"{weights} does not match the snapshot's architecture: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        source = f"{folder.name}/{weights.name} sha256:{digest}"
    return model.float().eval(), source


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def contract_module(network: Any, image_size: int = IMAGE_SIZE) -> Any:
    """uint8 NHWC in, sigmoid matte out, around the snapshot's network."""
    import torch

    class BiRefNetContract(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net
            mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1) * 255.0
            std = torch.tensor(IMAGENET_STD, dtype=torch.float32).reshape(1, 3, 1, 1) * 255.0
            self.register_buffer("mean255", mean, persistent=False)
            self.register_buffer("std255", std, persistent=False)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = (image.permute(0, 3, 1, 2).float() - self.mean255) / self.std255
            preds = self.net(x)
            while isinstance(preds, (list, tuple)):  # eval mode returns the scaled predictions
                preds = preds[-1]
            return torch.sigmoid(preds)

    return BiRefNetContract(network).eval()


def export_birefnet(output_dir: Path, *, snapshot: Path, random_init: bool = False, seed: int = 0,
                    image_size: int = IMAGE_SIZE, opset: int = DEFAULT_OPSET, check_batch: int = 1,
                    rtol: float = RTOL, atol: float = ATOL, log=print) -> list[ExportResult]:
    """Write ``matting.onnx`` (BiRefNet) into ``output_dir``, checked by onnx.checker and against PyTorch."""
    import numpy as np
    import torch

    from engines.export.deform_conv import count_deform_convs, exportable_deform_conv2d

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    network, source = load_snapshot(snapshot, random_init=random_init, seed=seed)
    module = contract_module(network, image_size)
    path = output_dir / f"{NAME}.onnx"
    dummy = torch.zeros((1, image_size, image_size, 3), dtype=torch.uint8)
    with exportable_deform_conv2d(network) as patched:
        log(f"[{NAME}: BiRefNet] exporting {source} at {image_size}x{image_size} (opset {opset}, dynamic batch; "
            f"{count_deform_convs(network)} deformable-conv modules via grid_sample, {patched} bindings patched)")
        with torch.inference_mode():
            exporter = torch_export_onnx(module, (dummy,), path, input_names=["image"], output_names=["alpha"],
                                         batch_inputs={"image": 0}, opset=opset)
    import onnx

    graph = onnx.load(str(path))
    # Only the batch is dynamic: declare the contract's fixed dims (the tracer names them symbolically).
    graph = set_dims(graph, {"image": ["batch", image_size, image_size, 3], "alpha": ["batch", 1, image_size, image_size]})
    meta = {p.key: p.value for p in graph.metadata_props}
    meta.update({"framewise_source": source, "framewise_input_layout": "NHWC_RGB_UINT8",
                 "framewise_output_activation": "sigmoid", "image_size": str(image_size)})
    onnx.helper.set_model_props(graph, meta)
    onnx.save(graph, str(path))

    checks.check_model(path)
    rng = np.random.default_rng(seed)
    inputs = {"image": rng.integers(0, 256, (check_batch, image_size, image_size, 3), dtype=np.uint8)}
    report = checks.compare(module, path, inputs, rtol=rtol, atol=atol, check=False)  # torchvision's kernel
    log(str(report))
    result = ExportResult(NAME, path, source, report)
    result.notes.append(f"exported with the {exporter} exporter; deform_conv2d decomposed (grid_sample + matmul)")
    return [result]
