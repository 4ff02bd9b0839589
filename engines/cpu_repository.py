"""Build the CPU Triton model repository (python backend running ONNX Runtime).

Layout written at ``output``::

    MANIFEST.json             builder version, source sha256, parameters (idempotence)
    yolov8/config.pbtxt
    yolov8/1/model.onnx       the real YOLOv8n int8 weights behind a uint8 NHWC input
    yolov8/1/model.py         copy of engines/python_backend/onnx_model.py
    sam2_image_encoder/...    SAM 2 parts: STAND-IN contract models (engines/sam2_standin),
    sam2_mask_decoder/...     the same three files each; no SAM 2 weights exist on these
    sam2_memory_attention/... machines, so the graphs are deterministic arithmetic with the
    sam2_memory_encoder/...   real tensor names, ranks and dtypes, reported as stand-ins
    matting/...               background removal: the REAL U^2-Netp weights (u2netp.onnx) behind
                              the matting contract, same three files; S = 320, read from the graph

Same model names and tensor contracts as the GPU repository (the model contract (README.md, "The model contract")), with
one difference by design: the matting model is a different network per repository (U^2-Netp at
S = 320 here, BiRefNet-lite at S = 1024 on the GPU), so its S differs; the orchestrator reads S
from Triton's metadata. Every config says which network it serves (parameter ``network``).
Every SAM 2 size follows from the model size S (``sam2_image_size``): features S/16, high-res
features S/4 and S/8, masks S/4.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import onnx

from engines import (
    attention_fusion,
    cpu_tuning,
    onnx_graph,
    onnx_wrap,
    sam2_standin,
    sam2_steps,
    softmax_axis,
    value_fold,
)
from engines.cpu_tuning import CpuTuning
from engines.hashing import sha256_file
from engines.onnx_wrap import prepend_uint8_nhwc_preprocessing, wrap_u2net_matting

log = logging.getLogger(__name__)

# 3: birefnet stand-in added; 4: SAM 2 step ensembles; 5: real U^2-Netp as `matting` (the
# birefnet stand-in is gone), a `network` parameter in every config; 6: instances and ONNX Runtime
# settings tuned for the build machine (engines/cpu_tuning.py); 7: the SAM 2 parts' runtime and
# precision (OpenVINO bf16 where the CPU has it); 8: memory attention and memory encoder take one
# object per batch row (max_batch_size 16), sam2_track_step batches them
BUILDER_VERSION = 9
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YOLO_ONNX = REPO_ROOT.parent / "shared" / "assets" / "models" / "yolov8n_int8.onnx"
YOLO_ONNX_ENV = "FRAMEWISE_YOLO_ONNX"
DEFAULT_U2NETP_ONNX = REPO_ROOT.parent / "shared" / "assets" / "models" / "u2netp.onnx"
U2NETP_ONNX_ENV = "FRAMEWISE_U2NETP_ONNX"
PYTHON_MODEL_TEMPLATE = Path(__file__).resolve().parent / "python_backend" / "onnx_model.py"
MANIFEST = "MANIFEST.json"
ONNX_FILE = "model.onnx"
LETTERBOX_PAD_VALUE = 114
INPUT_LAYOUT = "NHWC_RGB_UINT8"
DEFAULT_SAM2_IMAGE_SIZE = 1024
SAM2_STAND_IN_SOURCE = "stand-in contract model (no SAM 2 weights on this machine)"
STAND_IN_NETWORK = "stand-in"
# Heads of SAM 2.1's memory attention (self and cross, every size): the export leaves the head count
# dynamic, so the fusion is told it; a wrong count fails the builder's output check, never silently.
SAM2_MEMORY_ATTENTION_HEADS = 1
# Instances and ONNX Runtime threads of every model come from the machine the repository is built
# on (engines/cpu_tuning.py): each SAM 2 part is a heavy part (every core in one session), YOLOv8
# and matting serve independent requests.
# Background removal. The Triton model is named for its job, not its network: U^2-Netp here,
# BiRefNet-lite in the GPU repository, behind the same contract (the `network` parameter says which).
MATTING = "matting"
MATTING_MAX_BATCH_SIZE = 4
# The network each known U^2-Net file (rembg's names) is; another file is labelled by its name.
U2NET_NETWORKS = {"u2netp": "U2-Netp", "u2net": "U2-Net", "u2net_human_seg": "U2-Net (human segmentation)"}
STAND_IN_MODELS = tuple(part.name for part in sam2_standin.PARTS)
MODEL_NAMES = ("yolov8", *STAND_IN_MODELS, MATTING)
# Triton ensembles over the SAM 2 parts (engines/sam2_steps.py): configuration only.
ENSEMBLE_MODELS = sam2_steps.STEP_MODELS

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
}


class MissingWeightsError(FileNotFoundError):
    """The ONNX weights the repository is built from are not where we looked."""

    def __init__(self, path: Path, *, network: str = "YOLOv8", flag: str = "--yolo-onnx",
                 env: str = YOLO_ONNX_ENV, default: Path = DEFAULT_YOLO_ONNX):
        self.path = Path(path)
        super().__init__(
            f"{network} ONNX weights not found at {self.path}. Provide the file with "
            f"{flag} PATH or the {env} environment variable "
            f"(default: ../shared/assets/models/{default.name} relative to the repo root, "
            f"i.e. {default})."
        )


def default_yolo_onnx() -> Path:
    """``$FRAMEWISE_YOLO_ONNX`` when set, else the shared asset next to the repo."""
    env = os.environ.get(YOLO_ONNX_ENV)
    return Path(env).expanduser() if env else DEFAULT_YOLO_ONNX


def default_u2netp_onnx() -> Path:
    """``$FRAMEWISE_U2NETP_ONNX`` when set, else the shared asset next to the repo."""
    env = os.environ.get(U2NETP_ONNX_ENV)
    return Path(env).expanduser() if env else DEFAULT_U2NETP_ONNX


def read_manifest(output: Path) -> dict | None:
    try:
        return json.loads((Path(output) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def build_cpu_repository(
    output: Path,
    yolo_onnx: Path,
    *,
    instances: int | None = None,
    intra_op_threads: int | None = None,
    max_batch_size: int = 8,
    # The CPU python backend runs a batch's images one after another, so holding a lone request
    # back to form a batch buys nothing; batches still form from requests that queue while every
    # instance is busy.
    max_queue_delay_us: int = 0,
    sam2_image_size: int = DEFAULT_SAM2_IMAGE_SIZE,
    force: bool = False,
    sam2_onnx_dir: Path | None = None,
    u2netp_onnx: Path | None = None,
    cpu_cores: int | None = None,
    sam2_precision: str = "auto",
) -> Path:
    """Write the CPU model repository at ``output`` and return its path.

    Instances and ONNX Runtime settings are tuned for ``cpu_cores`` (None: the cores this process
    may use, engines/cpu_tuning.available_cores) by engines/cpu_tuning.py; ``instances`` (yolov8's
    instance count) and ``intra_op_threads`` (every model's) override the tuned values when given.
    ``max_batch_size`` applies to yolov8; the SAM 2 parts have fixed batch limits (their contract). ``sam2_image_size`` is the SAM 2 model size S (a
    multiple of 16). ``u2netp_onnx``: the U^2-Netp weights the matting model serves (None:
    ``default_u2netp_onnx()``); its S comes from the graph (320). A no-op when
    ``output/MANIFEST.json`` already records the same builder version, source weights (sha256),
    stand-in graph code, python model and parameters, unless ``force``. The repository is written into a temporary sibling directory and renamed into place.

    ``sam2_onnx_dir``: a folder with the four real SAM 2 part exports (``<part>.onnx``, from
    engines/export/sam2_parts.py); they are served instead of the stand-ins (``stand_in: false``,
    their file, sha256 and export source in the config), after checking they have the stand-ins'
    exact contract. Their model size S must be ``sam2_image_size``. None (default): stand-ins.

    ``sam2_precision``: "f32" (ONNX Runtime), "bf16" (OpenVINO) or "auto" (bf16 for real parts on a
    CPU with native bf16, else f32: engines/cpu_tuning.resolve_sam2_precision).
    """
    output = Path(output).expanduser().absolute()
    yolo_onnx = Path(yolo_onnx).expanduser().absolute()
    u2netp_onnx = Path(u2netp_onnx if u2netp_onnx is not None else default_u2netp_onnx()).expanduser().absolute()
    for name, value, low in (("instances", instances, 1), ("intra_op_threads", intra_op_threads, 1),
                             ("cpu_cores", cpu_cores, 1), ("max_batch_size", max_batch_size, 1),
                             ("max_queue_delay_us", max_queue_delay_us, 0)):
        if value is None and name in ("instances", "intra_op_threads", "cpu_cores"):
            continue
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    sam2_standin.check_image_size(sam2_image_size)
    if not yolo_onnx.is_file():
        raise MissingWeightsError(yolo_onnx)
    if not u2netp_onnx.is_file():
        raise MissingWeightsError(u2netp_onnx, network="U^2-Netp", flag="--u2netp-onnx", env=U2NETP_ONNX_ENV,
                                  default=DEFAULT_U2NETP_ONNX)

    standin_sha = _sha256_files(sam2_standin.SOURCE_FILES)
    cores = cpu_cores if cpu_cores is not None else cpu_tuning.available_cores()
    precision = cpu_tuning.resolve_sam2_precision(sam2_precision, real_parts=sam2_onnx_dir is not None)
    tuning = repository_tuning(cores, instances=instances, intra_op_threads=intra_op_threads,
                               sam2_precision=precision)
    sam2_real = _real_sam2_parts(Path(sam2_onnx_dir).expanduser().absolute(), sam2_image_size) \
        if sam2_onnx_dir is not None else None
    fingerprint = {
        "builder_version": BUILDER_VERSION,
        # The builder's own code too: a config rule changed without a version bump still rebuilds.
        # The python backend model is copied into every model: a change to it rebuilds too.
        "builder_sha256": _sha256_files((Path(__file__), Path(cpu_tuning.__file__), PYTHON_MODEL_TEMPLATE)),
        "python_model_sha256": sha256_file(PYTHON_MODEL_TEMPLATE),
        "sam2_steps_sha256": sha256_file(Path(sam2_steps.__file__)),
        "onnx_wrap_sha256": sha256_file(Path(onnx_wrap.__file__)),
        "attention_fusion_sha256": sha256_file(Path(attention_fusion.__file__)),
        "value_fold_sha256": sha256_file(Path(value_fold.__file__)),
        "onnx_graph_sha256": sha256_file(Path(onnx_graph.__file__)),
        "softmax_axis_sha256": sha256_file(Path(softmax_axis.__file__)),
        "models": {
            "yolov8": {"source": yolo_onnx.name, "source_sha256": sha256_file(yolo_onnx)},
            **{part.name: ({"source": sam2_real[part.name].path.name, "source_sha256": sam2_real[part.name].sha256}
                           if sam2_real else {"source": "stand-in", "code_sha256": standin_sha})
               for part in sam2_standin.PARTS},
            MATTING: {"source": u2netp_onnx.name, "source_sha256": sha256_file(u2netp_onnx)},
        },
        "parameters": {
            "cpu_cores": cores,
            "max_batch_size": max_batch_size,
            "max_queue_delay_us": max_queue_delay_us,
            "sam2_image_size": sam2_image_size,
            "matting_max_batch_size": MATTING_MAX_BATCH_SIZE,
            # model name -> CpuTuning fields; a repository built on another machine rebuilds
            "tuning": {name: t.to_dict() for name, t in tuning.items()},
        },
    }
    existing = read_manifest(output)
    if existing is not None and not force and existing.get("fingerprint") == fingerprint \
            and _complete(output):
        log.info("CPU model repository %s is up to date", output)
        return output
    if output.exists() and existing is None and (not output.is_dir() or any(output.iterdir())):
        # Never replace a directory this builder did not write.
        raise FileExistsError(f"{output} exists and is not a repository this builder wrote (no {MANIFEST}); "
                              f"remove it or choose another --output")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; Triton may run as another user
        _write_yolov8(staging / "yolov8", yolo_onnx, fingerprint)
        for part in sam2_standin.PARTS:
            _write_sam2_part(staging / part.name, part, fingerprint, sam2_real[part.name] if sam2_real else None)
        _write_sam2_steps(staging, stand_in=sam2_real is None,
                          network=next(iter(sam2_real.values())).network if sam2_real else STAND_IN_NETWORK)
        _write_matting(staging / MATTING, u2netp_onnx, fingerprint)
        manifest = {
            "fingerprint": fingerprint,
            "build_id": uuid.uuid4().hex,
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source_paths": {"yolov8": str(yolo_onnx), MATTING: str(u2netp_onnx),
                             **({n: str(r.path) for n, r in sam2_real.items()} if sam2_real else {})},
            "models": [*MODEL_NAMES, *ENSEMBLE_MODELS],
            "stand_in_models": [m for m in STAND_IN_MODELS if not (sam2_real and m in sam2_real)],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote CPU model repository %s", output)
    return output


def repository_tuning(cores: int, *, instances: int | None = None, intra_op_threads: int | None = None,
                      sam2_precision: str = "f32") -> dict[str, CpuTuning]:
    """Every model's CpuTuning for a machine with ``cores`` cores (engines/cpu_tuning.py says why);
    ``instances`` overrides yolov8's instance count, ``intra_op_threads`` every model's threads,
    ``sam2_precision`` ("f32" or "bf16") sets the runtime of the SAM 2 parts that run in bf16 when
    asked (cpu_tuning.BF16_SAM2_PARTS); the others stay fp32."""
    heavy = cpu_tuning.heavy_part(cores)
    tuning = {"yolov8": cpu_tuning.per_request_model(cores), MATTING: cpu_tuning.per_request_model(cores),
              **{part.name: cpu_tuning.sam2_runtime(heavy, sam2_precision if part.name in cpu_tuning.BF16_SAM2_PARTS
                                                     else "f32", part.name)
                 for part in sam2_standin.PARTS}}
    if instances is not None:
        tuning["yolov8"] = cpu_tuning.per_request_model(cores, instances)
    if intra_op_threads is not None:
        # One thread count for every call: no narrow session, no spinning.
        tuning = {name: dataclasses.replace(t, intra_op_threads=intra_op_threads, contended_threads=0,
                                            allow_spinning=False)
                  for name, t in tuning.items()}
    return tuning


def _tuning(params: dict, name: str) -> CpuTuning:
    return CpuTuning(**params["tuning"][name])


def _write_yolov8(model_dir: Path, source: Path, fingerprint: dict) -> None:
    params = fingerprint["parameters"]
    model = onnx.load(str(source))
    class_names = _class_names(model)
    wrapped = prepend_uint8_nhwc_preprocessing(model)
    onnx.checker.check_model(wrapped, full_check=True)
    served, rewrite = _yolo_graph(wrapped, source)

    (in_name, in_type, in_dims), = _tensors(wrapped.graph.input, wrapped.graph.initializer)
    outputs = _tensors(wrapped.graph.output)
    if len(outputs) != 1 or outputs[0][2][0] - 4 != len(class_names):
        raise ValueError(f"{source}: expected one output [N, 4 + {len(class_names)}, anchors], "
                         f"got {outputs}")
    out_name, out_type, out_dims = outputs[0]

    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    onnx.save(served, str(version_dir / ONNX_FILE))
    shutil.copyfile(PYTHON_MODEL_TEMPLATE, version_dir / "model.py")

    sha = fingerprint["models"]["yolov8"]["source_sha256"]
    parameters = {
        "onnx_file": ONNX_FILE,
        **_tuning(params, "yolov8").parameters(),
        "stand_in": "false",
        "source": f"{source.name} sha256:{sha}",
        "network": _yolo_network(model),
        "graph_rewrite": rewrite,
        # One image per ORT call: see engines/python_backend/onnx_model.py.
        "per_item_execution": "true",
        "class_names": json.dumps(class_names),
        "letterbox_pad_value": str(LETTERBOX_PAD_VALUE),
        "input_layout": INPUT_LAYOUT,
    }
    text = _config_pbtxt(
        name="yolov8",
        max_batch_size=params["max_batch_size"],
        inputs=[(in_name, in_type, in_dims)],
        outputs=[(out_name, out_type, out_dims)],
        instances=_tuning(params, "yolov8").instances,
        max_queue_delay_us=params["max_queue_delay_us"],
        parameters=parameters,
    )
    _check_config(text, parameters)
    (model_dir / "config.pbtxt").write_text(text)


def _write_sam2_part(model_dir: Path, part: sam2_standin.StandInPart, fingerprint: dict,
                     real: _RealSam2Part | None = None) -> None:
    params = fingerprint["parameters"]
    size = params["sam2_image_size"]
    batched = part.max_batch_size > 0

    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    if real is None:
        model = part.build(size)  # checked by onnx.checker (full_check) while building
        onnx.save(model, str(version_dir / ONNX_FILE))
    else:
        model = real.model  # contract checked by _real_sam2_parts
        rewrite = _write_real_sam2_graph(part.name, real.path, version_dir / ONNX_FILE,
                                         runtime=_tuning(params, part.name).runtime)
    shutil.copyfile(PYTHON_MODEL_TEMPLATE, version_dir / "model.py")

    parameters = {
        "onnx_file": ONNX_FILE,
        **_tuning(params, part.name).parameters(),
        "stand_in": "true" if real is None else "false",
        "source": SAM2_STAND_IN_SOURCE if real is None else real.source,
        "network": STAND_IN_NETWORK if real is None else real.network,
        "image_size": str(size),
        # The stand-ins treat every batch item on its own, so a whole batch is one ORT call. The
        # real memory attention runs its rows (objects) one after another: on a CPU each object's
        # attention is its own 4096 x ~28,700 product, so a batch shares no arithmetic, and a batch
        # of K holds K objects' activations at once (measured at 3 objects, OpenVINO bf16: 4.3x one
        # object's time, not 3x, and +0.8 GiB of peak: bench/README.md).
        "per_item_execution": "true" if real is not None and part.name == "sam2_memory_attention" else "false",
        **part.extra_parameters,
        **({"graph_rewrite": rewrite} if real is not None else {}),
    }
    text = _config_pbtxt(
        name=part.name,
        max_batch_size=part.max_batch_size,
        inputs=_tensors(model.graph.input, model.graph.initializer, batched=batched),
        outputs=_tensors(model.graph.output, batched=batched),
        instances=_tuning(params, part.name).instances,
        max_queue_delay_us=params["max_queue_delay_us"] if batched else None,
        parameters=parameters,
    )
    _check_config(text, parameters)
    (model_dir / "config.pbtxt").write_text(text)


def _write_real_sam2_graph(name: str, source: Path, target: Path, *, runtime: str) -> str:
    """Copy an exported part; the memory attention rewritten for the runtime that serves it:

    - its cross-attentions' value projections folded behind the attention weights
      (engines/value_fold.py: the weighted sum over ~28,700 keys runs on the 64-wide memories, not
      the 256-wide values: a quarter of its arithmetic), for either runtime;
    - on ONNX Runtime, its attentions fused into ONNX Runtime's MultiHeadAttention as well
      (engines/attention_fusion.py: no materialised 4096 x ~28,700 score matrix, ~1 GB less peak
      memory per call at a full memory bank). OpenVINO does not get that op (it is ONNX Runtime's
      own, com.microsoft); it fuses the attention pattern itself.

    A rewrite is served only if it gives the original's outputs on the same inputs; else the next
    simpler one, down to the export as it is. Returns what was done, for the config's
    ``graph_rewrite`` parameter."""
    if name != "sam2_memory_attention":
        shutil.copyfile(source, target)
        return "none"
    original = onnx.load(str(source))
    folded, folds = value_fold.fold_value_projection(original, SAM2_MEMORY_ATTENTION_HEADS)
    fold_text = f"{folds} value projections folded behind their attention (engines/value_fold.py)"
    candidates: list[tuple[onnx.ModelProto, str]] = []
    if runtime == "onnxruntime":
        for base, done in ([(folded, [fold_text])] if folds else []) + [(original, [])]:
            fused, count = attention_fusion.fuse_attention(base, SAM2_MEMORY_ATTENTION_HEADS)
            if count:
                candidates.append((fused, "; ".join(done + [f"{count} attentions fused into com.microsoft "
                                                            "MultiHeadAttention (engines/attention_fusion.py)"])))
    elif folds:
        candidates.append((folded, fold_text))
    problems = []
    for rewritten, text in candidates:
        problem = _same_outputs(original, rewritten)
        if problem is None:
            onnx.save(rewritten, str(target))
            return text
        problems.append(f"{text}: {problem}")
    problem = "; ".join(problems) or "no attention pattern found"
    log.warning("%s: serving the export as it is (%s)", source, problem)
    shutil.copyfile(source, target)
    return f"none ({problem})"


def _yolo_graph(wrapped: onnx.ModelProto, source: Path) -> tuple[onnx.ModelProto, str]:
    """The detector as served, and what was rewritten (the config's ``graph_rewrite``): its inner-
    axis Softmax (the box head's) moved to the last axis (engines/softmax_axis.py), served only if
    the outputs stay bit for bit the same on a seeded image; else the graph as it is."""
    import numpy as np

    rewritten, count = softmax_axis.softmax_on_last_axis(wrapped)
    if not count:
        return wrapped, "none"
    (image,) = [i for i in wrapped.graph.input if i.name not in {init.name for init in wrapped.graph.initializer}]
    height, width = (d.dim_value for d in image.type.tensor_type.shape.dim[1:3])
    feeds = {image.name: np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)}
    problem = _same_outputs(wrapped, rewritten, feeds=feeds, exact=True)
    if problem is not None:
        log.warning("%s: serving the detector without its Softmax rewrite (%s)", source, problem)
        return wrapped, f"none ({problem})"
    return rewritten, f"{count} inner-axis Softmax moved to the last axis (engines/softmax_axis.py)"


def _same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, seed: int = 0, *,
                  feeds: dict | None = None, exact: bool = False) -> str | None:
    """None when both graphs give the same outputs (bit for bit if ``exact``, else rtol 1e-3, atol
    1e-4) on ``feeds``, by default seeded inputs: a batch of 2 rows (the dimension named "batch"; a
    rewrite must keep rows apart), other dynamic dimensions 1, floats standard normal, integers 0 (a
    valid index for every SAM 2 integer input)."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    try:
        sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                    for m in (original, rewritten)]
    except Exception as exc:  # noqa: BLE001 - a rewrite ONNX Runtime cannot load is one not to serve
        return f"the rewritten graph does not load ({type(exc).__name__}: {str(exc)[:200]})"
    if feeds is None:
        feeds = {}
        for value in sessions[0].get_inputs():
            shape = [d if isinstance(d, int) else 2 if d == "batch" else 1 for d in value.shape]
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(value.type)
            feeds[value.name] = rng.standard_normal(shape).astype(dtype) if dtype else \
                np.zeros(shape, np.int64 if "int64" in value.type else np.int32)
    want = sessions[0].run(None, feeds)
    try:
        got = sessions[1].run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - a rewrite ONNX Runtime refuses is one not to serve
        return f"the rewritten graph does not run ({type(exc).__name__}: {str(exc)[:200]})"
    for output, a, b in zip(sessions[0].get_outputs(), want, got):
        same = np.array_equal(a, b) if exact else a.shape == b.shape and np.allclose(a, b, rtol=1e-3, atol=1e-4)
        if not same:
            return f"output {output.name} differs after the rewrite"
    return None


def _write_sam2_steps(repository: Path, *, stand_in: bool, network: str) -> None:
    """The step ensembles, from the part configs just written (the same generator builds the GPU
    repository's, so both chain the parts identically)."""
    parts = {
        name: sam2_steps.parse_config((repository / name / "config.pbtxt").read_text())
        for name in (sam2_steps.IMAGE_ENCODER, sam2_steps.MEMORY_ATTENTION, sam2_steps.MASK_DECODER)
    }
    parameters = {
        "stand_in": "true" if stand_in else "false",
        "source": "Triton ensemble of the SAM 2 parts" + (" (stand-in parts)" if stand_in else ""),
        "network": network,
    }
    for name, text in sam2_steps.step_configs(parts, parameters).items():
        (repository / name / "1").mkdir(parents=True)  # an ensemble still needs a version folder
        (repository / name / "config.pbtxt").write_text(text)


@dataclass(frozen=True)
class _RealSam2Part:
    path: Path
    sha256: str
    source: str  # for the config's "source" parameter
    network: str  # for the config's "network" parameter, e.g. "SAM 2.1 hiera-tiny"
    model: onnx.ModelProto  # graph only (no weights loaded)


def _real_sam2_parts(folder: Path, image_size: int) -> dict[str, _RealSam2Part]:
    """The exported SAM 2 parts in ``folder``, each checked to have exactly the stand-in contract
    (tensor names, dtypes, ranks and Triton dims) at model size ``image_size``."""
    described = {}
    try:  # written by engines/export/sam2_parts.py: which weights these are
        described = json.loads((folder / "sam2_export.json").read_text())
    except (OSError, ValueError):
        pass
    parts = {}
    for part in sam2_standin.PARTS:
        path = folder / f"{part.name}.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"SAM 2 export {path} not found (engines/export/sam2_parts.py writes "
                                    f"{', '.join(p.name + '.onnx' for p in sam2_standin.PARTS)})")
        model = onnx.load(str(path), load_external_data=False)
        reference = part.build(image_size)
        batched = part.max_batch_size > 0
        got = (_tensors(model.graph.input, model.graph.initializer, batched=batched),
               _tensors(model.graph.output, batched=batched))
        want = (_tensors(reference.graph.input, reference.graph.initializer, batched=batched),
                _tensors(reference.graph.output, batched=batched))
        if got != want:
            raise ValueError(f"{path} does not have the {part.name} contract at SAM 2 size {image_size} "
                             f"(--sam2-image-size): inputs/outputs {got}, expected {want}")
        sha = sha256_file(path)
        origin = described.get("source", "SAM 2 export")
        parts[part.name] = _RealSam2Part(path, sha, f"{path.name} sha256:{sha} ({origin})",
                                         _sam2_network(described.get("source")), model)
    return parts


def _sam2_network(source: object) -> str:
    """The network the export's description names (engines/export/sam2_parts.source_description:
    "hiera tiny checkpoint ..." or "hiera tiny RANDOM weights ..."), else plain "SAM 2"."""
    words = source.split() if isinstance(source, str) else []
    if len(words) < 2 or words[0] != "hiera":
        return "SAM 2"
    network = f"SAM 2.1 hiera-{words[1].replace('_', '-')}"
    return network + (" (random weights)" if "RANDOM" in words else "")


def _yolo_network(model: onnx.ModelProto) -> str:
    """"YOLOv8n" from Ultralytics' metadata ("Ultralytics YOLOv8n model trained on coco.yaml")."""
    description = {p.key: p.value for p in model.metadata_props}.get("description", "")
    words = description.split()
    if len(words) >= 2 and words[0] == "Ultralytics" and words[1].upper().startswith("YOLO"):
        return words[1]
    return "YOLOv8 (variant not recorded in the ONNX metadata)"


def _write_matting(model_dir: Path, source: Path, fingerprint: dict) -> None:
    """U^2-Netp behind the matting contract (engines/onnx_wrap.wrap_u2net_matting): uint8 in, the
    per-image normalisation and the min-max scaling inside the graph, S from the graph."""
    params = fingerprint["parameters"]
    wrapped = wrap_u2net_matting(onnx.load(str(source)))
    onnx.checker.check_model(wrapped, full_check=True)
    inputs, outputs = _tensors(wrapped.graph.input, wrapped.graph.initializer), _tensors(wrapped.graph.output)
    size = inputs[0][2][0] if len(inputs) == 1 and len(inputs[0][2]) == 3 else -1
    if size < 1 or inputs != [("image", "TYPE_UINT8", [size, size, 3])] \
            or outputs != [("alpha", "TYPE_FP32", [1, size, size])]:
        raise ValueError(f"{source}: the wrapped graph is not image [B,S,S,3] -> alpha [B,1,S,S]: {inputs} -> {outputs}")

    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    onnx.save(wrapped, str(version_dir / ONNX_FILE))
    shutil.copyfile(PYTHON_MODEL_TEMPLATE, version_dir / "model.py")

    sha = fingerprint["models"][MATTING]["source_sha256"]
    parameters = {
        "onnx_file": ONNX_FILE,
        **_tuning(params, MATTING).parameters(),
        "stand_in": "false",
        "source": f"{source.name} sha256:{sha}",
        "network": U2NET_NETWORKS.get(source.stem, f"U2-Net family ({source.name})"),
        "image_size": str(size),
        # The normalisation and the min-max are per batch item, so a whole batch is one ORT call.
        "per_item_execution": "false",
        "input_layout": INPUT_LAYOUT,
        # What the graph ends with; the matte is 0..1 either way (BiRefNet on the GPU: "sigmoid").
        "output_activation": "sigmoid, min-max per image",
    }
    text = _config_pbtxt(
        name=MATTING,
        max_batch_size=params["matting_max_batch_size"],
        inputs=inputs,
        outputs=outputs,
        instances=_tuning(params, MATTING).instances,
        max_queue_delay_us=params["max_queue_delay_us"],
        parameters=parameters,
    )
    _check_config(text, parameters)
    (model_dir / "config.pbtxt").write_text(text)


def _class_names(model: onnx.ModelProto) -> list[str]:
    meta = {p.key: p.value for p in model.metadata_props}
    if "names" not in meta:
        raise ValueError("the ONNX model has no 'names' metadata_props entry (class names)")
    names = ast.literal_eval(meta["names"])
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class ids in 'names' metadata are not 0..N-1: {sorted(names)}")
    return [str(names[i]) for i in range(len(names))]


def _tensors(values, initializers=(), *, batched: bool = True) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims) for graph inputs or outputs; -1 for a dynamic dimension.

    ``batched``: the model has max_batch_size > 0, so the first (batch) dimension is left out.
    """
    skip = {i.name for i in initializers}
    result = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise ValueError(f"tensor {v.name!r} has unsupported type "
                             f"{onnx.TensorProto.DataType.Name(t.elem_type)}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        result.append((v.name, _ONNX_TO_TRITON[t.elem_type], dims[1:] if batched else dims))
    return result


def _pbtxt_str(value: str) -> str:
    """A protobuf text-format string literal (C escapes; UTF-8 kept as is)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _config_pbtxt(*, name, max_batch_size, inputs, outputs, instances, max_queue_delay_us,
                  parameters) -> str:
    """``max_queue_delay_us`` None: no dynamic_batching (required when max_batch_size is 0)."""

    def tensor_list(tensors):
        return ",\n".join(
            f"  {{\n    name: {_pbtxt_str(n)}\n    data_type: {t}\n"
            f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
            for n, t, dims in tensors
        )

    lines = [
        "# Generated by build_engines.py --target cpu (engines/cpu_repository.py). Do not edit:",
        "# rebuild instead. Triton python backend running ONNX Runtime on CPU.",
        f"name: {_pbtxt_str(name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + tensor_list(inputs) + "\n]",
        "output [\n" + tensor_list(outputs) + "\n]",
        f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]",
    ]
    if max_queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}")
    lines += [
        f"parameters {{ key: {_pbtxt_str(k)} value {{ string_value: {_pbtxt_str(v)} }} }}"
        for k, v in parameters.items()
    ]
    return "\n".join(lines) + "\n"


def _check_config(text: str, parameters: dict[str, str]) -> None:
    """Parse the generated text as Triton's ModelConfig; every parameter must round-trip."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    parsed = {k: v.string_value for k, v in config.parameters.items()}
    if parsed != parameters:
        raise AssertionError(f"config.pbtxt parameters do not round-trip: {parsed} != {parameters}")


def _complete(output: Path) -> bool:
    return all(p.is_file() for name in MODEL_NAMES
               for p in (output / name / "config.pbtxt", output / name / "1" / ONNX_FILE,
                         output / name / "1" / "model.py")) \
        and all((output / name / "config.pbtxt").is_file() for name in ENSEMBLE_MODELS)


def _swap_into_place(staging: Path, output: Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sha256_files(paths) -> str:
    """One digest over several files (names and contents), in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + sha256_file(path).encode() + b"\0")
    return digest.hexdigest()

