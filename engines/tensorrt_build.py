"""TensorRT FP16 plans for the GPU model repository (build_engines.py --target tensorrt).

Reads the ONNX files of ``build_engines.py --target onnx`` (``<model>.onnx``), builds one
serialized engine per model with the TensorRT Python API (never Ultralytics ``.engine`` files:
they start with a metadata header Triton's TensorRT backend rejects), and writes it as
``model_repository/<model>/1/model.sm<major><minor>.plan``, the file name the committed
``config.pbtxt`` maps to that compute capability with ``cc_model_filenames`` ("7.5" ->
``model.sm75.plan`` on a T4).

Optimization profiles follow the committed configs: dim 0 is the batch (1..max_batch_size) for
batching models; the other dynamic dims have the ranges of ``DYNAMIC_RANGES`` (memories 1..7,
object pointers 1..16, prompt points 1..64), bounded by the config's parameters where it has
them (``max_memories``, ``max_object_pointers``, ``max_prompt_points``).

A plan only loads in a Triton whose TensorRT is the one that built it, on the same GPU
architecture: build inside the pinned NGC TensorRT container on the T4 itself (README, "GPU
deployment (T4)"). Nothing here may import heavy packages at module level: the checks that stop
a build early (no TensorRT, no CUDA GPU, missing ONNX or config) run before anything is written.

Python 3.10 compatible: the NGC containers ship Python 3.10.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engines.hashing import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_ONNX_DIR = REPO_ROOT / ".cache" / "onnx"
MODELS = ("yolov8", "matting", "sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention",
          "sam2_memory_encoder")

# The container whose TensorRT builds the plans and whose Triton serves them (same release).
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
TENSORRT_IMAGE = "nvcr.io/nvidia/tensorrt:24.10-py3"
TENSORRT_VERSION = "10.5.0"  # TensorRT 10.5.0.18 in both 24.10 containers (CUDA 12.6.2)

# (min, opt, max) of the non-batch dynamic dims: {model: {input: {axis: range}}}. ``max`` is
# replaced by the config parameter named in ``RANGE_PARAMETERS`` when the config has it.
DYNAMIC_RANGES: dict[str, dict[str, dict[int, tuple[int, int, int]]]] = {
    # prompt points per object: a box is 2 points, a box with a few clicks 3..6
    "sam2_mask_decoder": {"point_coords": {1: (1, 2, 64)}, "point_labels": {1: (1, 2, 64)}},
    # SAMURAI: prompt memory + 6 recent frames; prompt pointer + 15 recent ones
    # (axis 0 is the batch: one tracked object per row)
    "sam2_memory_attention": {"memory_feats": {1: (1, 7, 7)}, "memory_tpos": {1: (1, 7, 7)},
                              "obj_ptrs": {1: (1, 16, 16)}, "obj_ptr_tdiff": {1: (1, 16, 16)}},
}
RANGE_PARAMETERS = {
    ("sam2_mask_decoder", "point_coords", 1): "max_prompt_points",
    ("sam2_mask_decoder", "point_labels", 1): "max_prompt_points",
    ("sam2_memory_attention", "memory_feats", 1): "max_memories",
    ("sam2_memory_attention", "memory_tpos", 1): "max_memories",
    ("sam2_memory_attention", "obj_ptrs", 1): "max_object_pointers",
    ("sam2_memory_attention", "obj_ptr_tdiff", 1): "max_object_pointers",
}
# Batch size the kernels are tuned for (the common case under load), per batching model.
# The SAM 2 per-object parts: a frame's objects, two in the common multi-object case.
OPT_BATCH = {"yolov8": 4, "matting": 1, "sam2_image_encoder": 1, "sam2_mask_decoder": 2, "sam2_memory_attention": 2,
             "sam2_memory_encoder": 2}
WORKSPACE_BYTES = 2 << 30  # builder scratch; the T4 has 16 GB and the build runs alone

_TRT_DTYPES = {"TYPE_FP32": "FLOAT", "TYPE_FP16": "HALF", "TYPE_UINT8": "UINT8", "TYPE_INT32": "INT32",
               "TYPE_INT64": "INT64", "TYPE_BOOL": "BOOL"}


class BuildError(RuntimeError):
    """The plans cannot be built here; the message says why and what to do."""


@dataclass
class Tensor:
    name: str
    data_type: str
    dims: list[int]


@dataclass
class ModelConfig:
    """The parts of a committed config.pbtxt the builder needs."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    parameters: dict[str, str]
    cc_model_filenames: dict[str, str]


@dataclass
class Gpu:
    name: str
    major: int
    minor: int
    total_bytes: int

    @property
    def cc(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass
class Plan:
    model: str
    path: Path
    bytes: int
    seconds: float
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


# --- config.pbtxt reading (no protobuf needed in the TensorRT container) ---------------------------

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def _tokens(text: str) -> list[str]:
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return _TOKEN.findall(text)


def _parse_message(tokens: list[str], i: int, end: str | None) -> tuple[dict[str, list], int]:
    fields: dict[str, list] = {}
    while i < len(tokens):
        tok = tokens[i]
        if tok == end:
            return fields, i + 1
        if tok == ",":
            i += 1
            continue
        key = tok
        i += 1
        if i < len(tokens) and tokens[i] == ":":
            i += 1
        values: list = []
        if tokens[i] == "[":
            i += 1
            while tokens[i] != "]":
                if tokens[i] == ",":
                    i += 1
                    continue
                if tokens[i] == "{":
                    msg, i = _parse_message(tokens, i + 1, "}")
                    values.append(msg)
                else:
                    values.append(_scalar(tokens[i]))
                    i += 1
            i += 1
        elif tokens[i] == "{":
            msg, i = _parse_message(tokens, i + 1, "}")
            values.append(msg)
        else:
            values.append(_scalar(tokens[i]))
            i += 1
        fields.setdefault(key, []).extend(values)
    if end is not None:
        raise ValueError("unbalanced braces in config.pbtxt")
    return fields, i


def _scalar(tok: str):
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    try:
        return int(tok)
    except ValueError:
        return tok


def read_config(path: Path) -> ModelConfig:
    """Parse a committed config.pbtxt (protobuf text format, the subset the repository uses)."""
    fields, _ = _parse_message(_tokens(Path(path).read_text()), 0, None)

    def one(msg: dict[str, list], key: str, default=None):
        return msg.get(key, [default])[0]

    def tensors(key: str) -> list[Tensor]:
        return [Tensor(one(t, "name"), one(t, "data_type"), [int(d) for d in t.get("dims", [])])
                for t in fields.get(key, [])]

    parameters = {one(p, "key"): one(one(p, "value", {}), "string_value", "") for p in fields.get("parameters", [])}
    cc = {one(p, "key"): one(p, "value") for p in fields.get("cc_model_filenames", [])}
    return ModelConfig(one(fields, "name"), one(fields, "platform", ""), int(one(fields, "max_batch_size", 0)),
                       tensors("input"), tensors("output"), parameters, cc)


# --- preflight: everything that can stop a build, before anything is written -------------------

def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install failing to load its libraries
        raise BuildError(
            f"TensorRT's Python package cannot be imported ({type(exc).__name__}: {exc}). Build the plans "
            f"inside {TENSORRT_IMAGE} (TensorRT {TENSORRT_VERSION}, the one {TRITON_IMAGE} serves with) on the "
            f"GPU that will serve them; see README, 'GPU deployment (T4)'."
        ) from exc
    return trt


def probe_gpu() -> Gpu:
    """The first CUDA device, through the driver API (libcuda), without torch or cuda-python."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise BuildError(f"no NVIDIA driver here (libcuda.so.1: {exc}); TensorRT plans are built on the GPU "
                         f"that serves them (a T4: compute capability 7.5)") from exc
    status = cuda.cuInit(0)
    count = ctypes.c_int(0)
    if status != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise BuildError(f"no usable CUDA device (cuInit returned {status}, {count.value} devices); TensorRT "
                         f"plans are built on the GPU that serves them")
    device = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(device), 0)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    total = ctypes.c_size_t(0)
    cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device)
    return Gpu(name.value.decode(errors="replace"), major.value, minor.value, total.value)


def plan_filename(config: ModelConfig, gpu: Gpu) -> str:
    name = config.cc_model_filenames.get(gpu.cc)
    if name is None:
        known = ", ".join(sorted(config.cc_model_filenames)) or "none"
        raise BuildError(f"{config.name}/config.pbtxt has no cc_model_filenames entry for compute capability "
                         f"{gpu.cc} ({gpu.name}); it maps {known}. Add one (\"{gpu.cc}\" -> "
                         f"\"model.sm{gpu.major}{gpu.minor}.plan\") to serve on this GPU")
    return name


@dataclass
class Preflight:
    trt: object
    gpu: Gpu
    configs: dict[str, ModelConfig]
    onnx: dict[str, Path]


def preflight(onnx_dir: Path, repository: Path, models: tuple[str, ...] = MODELS, *,
              allow_version_mismatch: bool = False,
              import_trt: Callable[[], object] | None = None,
              gpu_probe: Callable[[], Gpu] | None = None) -> Preflight:
    """Every check that can refuse the build, in this order: TensorRT importable (and the pinned
    version), a CUDA GPU, then every model's committed config and ONNX file. Raises BuildError
    and writes nothing."""
    trt = (import_trt or import_tensorrt)()
    version = getattr(trt, "__version__", "?")
    if not str(version).startswith(TENSORRT_VERSION) and not allow_version_mismatch:
        raise BuildError(f"this is TensorRT {version}, but {TRITON_IMAGE} serves plans of TensorRT {TENSORRT_VERSION} "
                         f"and rejects plans of any other version; build inside {TENSORRT_IMAGE}, or pass "
                         f"--allow-trt-mismatch if your Triton image has TensorRT {version}")
    gpu = (gpu_probe or probe_gpu)()
    configs: dict[str, ModelConfig] = {}
    onnx: dict[str, Path] = {}
    problems = []
    for model in models:
        config_path = Path(repository) / model / "config.pbtxt"
        if not config_path.is_file():
            problems.append(f"{config_path} is missing (the committed GPU configs live in model_repository/)")
            continue
        config = read_config(config_path)
        if config.platform != "tensorrt_plan":
            problems.append(f"{config_path}: platform is {config.platform!r}, not \"tensorrt_plan\"")
        try:
            plan_filename(config, gpu)
        except BuildError as exc:
            problems.append(str(exc))
        configs[model] = config
        source = Path(onnx_dir) / f"{model}.onnx"
        if not source.is_file():
            problems.append(f"{source} is missing: export it first with `python build_engines.py --target onnx "
                            f"--output {onnx_dir}`")
        onnx[model] = source
    if problems:
        raise BuildError("cannot build the TensorRT plans:\n  - " + "\n  - ".join(problems))
    return Preflight(trt, gpu, configs, onnx)


def contract_mismatches(onnx_path: Path, config: ModelConfig) -> list[str]:
    """How an exported ONNX graph differs from the committed config (names, order, dtypes, ranks,
    concrete dims). Needs the onnx package (the export side)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    types = {1: "TYPE_FP32", 10: "TYPE_FP16", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}
    batched = config.max_batch_size > 0
    problems = []
    for kind, values, declared in (("input", [v for v in graph.input if v.name not in initializers], config.inputs),
                                   ("output", list(graph.output), config.outputs)):
        got = {v.name: v for v in values}
        if list(got) != [t.name for t in declared]:
            problems.append(f"{kind}s {list(got)} != config {[t.name for t in declared]}")
            continue
        for t in declared:
            tensor = got[t.name].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            want = ([-1] if batched else []) + t.dims
            dtype = types.get(tensor.elem_type, str(tensor.elem_type))
            if dtype != t.data_type:
                problems.append(f"{kind} {t.name}: {dtype} != config {t.data_type}")
            # A dim left symbolic in the ONNX is fine: the profile (inputs) or TensorRT's shape
            # inference (outputs) makes it concrete; two different concrete dims are not.
            if len(dims) != len(want) or any(-1 not in (d, w) and d != w for d, w in zip(dims, want)):
                problems.append(f"{kind} {t.name}: dims {dims} != config {want}")
    return problems


# --- profiles and the build ---------------------------------------------------------------------

def profile_shapes(config: ModelConfig, network_inputs: dict[str, tuple[int, ...]]
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per network input. ``network_inputs``: name -> shape with -1 for dynamic dims
    (batch included for batching models). Checks names and static dims against the config."""
    declared = {t.name: t for t in config.inputs}
    if set(declared) != set(network_inputs):
        raise BuildError(f"{config.name}: the ONNX inputs {sorted(network_inputs)} are not the config's "
                         f"{sorted(declared)}")
    batched = config.max_batch_size > 0
    shapes = {}
    for name, shape in network_inputs.items():
        dims = ([-1] if batched else []) + list(declared[name].dims)
        if len(dims) != len(shape):
            raise BuildError(f"{config.name}.{name}: ONNX rank {len(shape)} {list(shape)}, config {dims}")
        lo, opt, hi = [], [], []
        for axis, (onnx_dim, config_dim) in enumerate(zip(shape, dims)):
            if batched and axis == 0:
                rng = (1, min(OPT_BATCH.get(config.name, 1), config.max_batch_size), config.max_batch_size)
            elif config_dim > 0:
                if onnx_dim not in (-1, config_dim):
                    raise BuildError(f"{config.name}.{name} axis {axis}: ONNX has {onnx_dim}, config {config_dim}")
                rng = (config_dim, config_dim, config_dim)
            else:
                rng = DYNAMIC_RANGES.get(config.name, {}).get(name, {}).get(axis)
                if rng is None:
                    raise BuildError(f"{config.name}.{name} axis {axis} is dynamic and has no range in "
                                     f"engines/tensorrt_build.py DYNAMIC_RANGES")
                key = RANGE_PARAMETERS.get((config.name, name, axis))
                if key and key in config.parameters:
                    top = int(config.parameters[key])
                    rng = (rng[0], min(rng[1], top), top)
            lo.append(rng[0])
            opt.append(rng[1])
            hi.append(rng[2])
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def build_plan(trt, onnx_path: Path, config: ModelConfig, *, workspace_bytes: int = WORKSPACE_BYTES,
               fp16: bool = True, log: Callable[[str], None] = print) -> tuple[bytes, dict]:
    """Parse the ONNX, set the profile, build an FP16 engine; returns (serialized plan, profile)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}:\n  {errors}")

    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    _check_dtypes(trt, config, network)
    if set(outputs) != {t.name for t in config.outputs}:
        raise BuildError(f"{config.name}: ONNX outputs {sorted(outputs)} differ from the config's "
                         f"{sorted(t.name for t in config.outputs)}")

    shapes = profile_shapes(config, inputs)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        builder_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    builder_config.add_optimization_profile(profile)
    log("  profile: " + "; ".join(f"{n} min {list(a)} opt {list(b)} max {list(c)}" for n, (a, b, c) in shapes.items()))
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {config.name} (see the TensorRT log above)")
    return bytes(serialized), shapes


def _check_dtypes(trt, config: ModelConfig, network) -> None:
    want = {t.name: t.data_type for t in [*config.inputs, *config.outputs]}
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    for tensor in tensors:
        expected = want.get(tensor.name)
        if expected is None:
            continue
        if getattr(trt.DataType, _TRT_DTYPES[expected]) != tensor.dtype:
            raise BuildError(f"{config.name}.{tensor.name}: ONNX/TensorRT dtype {tensor.dtype}, config {expected}")


def build_repository(onnx_dir: Path = DEFAULT_ONNX_DIR, repository: Path = MODEL_REPOSITORY,
                     models: tuple[str, ...] = MODELS, *, workspace_bytes: int = WORKSPACE_BYTES,
                     allow_version_mismatch: bool = False, log: Callable[[str], None] = print,
                     checked: Preflight | None = None) -> list[Plan]:
    """Build every plan into ``repository/<model>/1/``. Each plan is written to a temporary file
    and renamed into place, so a failed build leaves the previous plan untouched."""
    import time

    pre = checked or preflight(onnx_dir, repository, models, allow_version_mismatch=allow_version_mismatch)
    trt = pre.trt
    log(f"TensorRT {trt.__version__} on {pre.gpu.name} (compute capability {pre.gpu.cc}, "
        f"{pre.gpu.total_bytes / 2**30:.1f} GiB)")
    plans = []
    for model in models:
        config = pre.configs[model]
        target = Path(repository) / model / "1" / plan_filename(config, pre.gpu)
        log(f"[{model}] {pre.onnx[model]} -> {target}")
        started = time.perf_counter()
        data, shapes = build_plan(trt, pre.onnx[model], config, workspace_bytes=workspace_bytes, log=log)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        info = {
            "model": model, "plan": target.name, "bytes": len(data),
            "tensorrt": trt.__version__, "gpu": pre.gpu.name, "compute_capability": pre.gpu.cc,
            "onnx": pre.onnx[model].name, "onnx_sha256": sha256_file(pre.onnx[model]),
            "profile": {n: {"min": a, "opt": b, "max": c} for n, (a, b, c) in shapes.items()},
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        activations = _activation_bytes(trt, data)
        if activations is not None:
            info["activation_bytes_per_instance"] = activations  # execution context at the profile's max
        target.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
        seconds = time.perf_counter() - started
        log(f"  wrote {target.name}: {len(data) / 2**20:.1f} MiB plan, "
            f"{(activations or 0) / 2**20:.0f} MiB activations per instance, in {seconds:.0f} s")
        plans.append(Plan(model, target, len(data), seconds, shapes))
    return plans


def _activation_bytes(trt, data: bytes) -> int | None:
    """Device memory one execution context of this plan needs (the VRAM budget's per-instance
    figure), read back from the deserialized engine."""
    try:
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(data)
        size = getattr(engine, "device_memory_size_v2", None)
        return int(size if size is not None else engine.device_memory_size)
    except Exception:  # noqa: BLE001 - informative only
        return None

