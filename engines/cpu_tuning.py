"""ONNX Runtime settings of the CPU model repository, chosen for the machine it is built on.

The CPU repository (engines/cpu_repository.py) serves every model through the python backend, one
ONNX Runtime session per Triton instance, each instance its own process. How many instances and
how many intra-op threads each gets decides both regimes a user sees: one request alone (wants
every core inside one session) and many at once (wants instances to overlap). Fixed counts tuned
for 2 cores with 1 thread each made a real SAM 2.1 frame take 10.3 s where 2 threads took 5.6 s
(issue 15), and made a lone Detect 1.47x slower than the in-process session a user would write.

The rules (figures behind them: bench/README.md, "Tuning the CPU repository"):

- Heavy parts (the SAM 2 parts, one call = one frame's whole cost): every core in one session
  (up to ``HEAVY_MAX_THREADS``; past that ONNX Runtime's intra-op scaling flattens) and as many
  instances as fit the cores without oversubscribing. Several objects' calls then queue and each
  runs on every core instead of two sessions fighting over the same cores (three concurrent
  memory attentions took 6.1-7.2 s a call against ~3 s alone).
- Per-request models (YOLOv8 detection, matting): up to ``LIGHT_MAX_THREADS`` threads (a small
  graph stops scaling sooner) and at least two instances, so that under load one instance
  prepares or returns tensors while the other computes. Where those instances together hold more
  threads than there are cores, each instance also gets a narrow session (``contended_threads``:
  the cores shared out between the instances, spinning off) for the calls that run while another
  instance of the model executes, and its wide session spins (``allow_spinning``, stopped after
  each call): a lone request then runs as fast as the in-process session a user would write
  (a sleeping pool thread woken between every pair of YOLOv8's ~500 operators cost a lone call
  ~15 %), and concurrent requests never put two spinning pools on the same cores (which cost a
  third of the throughput at 16 concurrent requests: bench/README.md).
- Spinning off everywhere else: ONNX Runtime's pool threads busy-wait between operators by
  default; with several sessions (and the orchestrator, and Triton) on the same cores, a spinning
  thread burns the core another session needs.
- Graph optimisation level "all" (ORT's default, written down so a config says what runs) and
  the CPU arena on: turning it off raised the encoder's peak RSS and slowed it (bench/README.md).
- Reduced precision where the CPU computes it natively: on a CPU with bfloat16 arithmetic (Intel
  AMX or AVX512-BF16, ``cpu_has_bf16``) the real SAM 2 parts that are a frame's cost, the image
  encoder, the memory attention and the memory encoder (``BF16_SAM2_PARTS``), run on OpenVINO with
  bf16 inference precision (``sam2_runtime``): they are matrix products and convolutions, and AMX
  runs them in bf16 1.6-2.6x faster than ONNX Runtime's fp32 kernels (bench/README.md). ONNX
  Runtime's CPU provider has no bf16 kernels on x86, hence a second runtime for these parts only.
  The mask decoder stays fp32: it writes the masks themselves (with all four parts in bf16 the
  masks fell below the parity bound; with the decoder alone in fp32 they did not move), and on
  OpenVINO it is no faster. The masks stay within the bound (min IoU >= 0.99 per frame against the
  fp32 reference, ``make bench-real``). Elsewhere, and whenever fp32 is asked for, ONNX Runtime in
  fp32 as before.
- Heavy parts give their arena back after every call (ORT's run option
  ``memory.enable_memory_arena_shrinkage``; on OpenVINO ``CompiledModel.release_memory`` and
  glibc's ``malloc_trim``): a frame runs the parts one after another, and without it every part's
  process keeps its own peak activations for good (on ONNX Runtime the encoder ~0.8 GB, the memory
  attention ~1 GB at a full bank; on OpenVINO bf16 ~340 and ~120 MB), so the stack's memory is the
  sum of all the peaks rather than the largest one. Per-request models keep theirs: small, and
  reused at once under load.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HEAVY_MAX_THREADS = 8
LIGHT_MAX_THREADS = 4
LIGHT_MIN_INSTANCES = 2
GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CPUINFO = Path("/proc/cpuinfo")
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
# What build_engines.py --sam2-precision takes: "auto" is bf16 where the CPU has it (see above).
SAM2_PRECISION_CHOICES = ("auto", *PRECISIONS)
# The SAM 2 parts that run in bf16 when bf16 is chosen (see above).
BF16_SAM2_PARTS = ("sam2_image_encoder", "sam2_memory_attention", "sam2_memory_encoder")
# On OpenVINO, compiled for one row (CpuTuning.fixed_batch): the image encoder gets one frame per
# call (a session's frames come one at a time, and on a CPU a batch of other sessions' frames shares
# no arithmetic). The batching parts keep their dynamic rows (objects), memory count and pointers.
FIXED_BATCH_SAM2_PARTS = ("sam2_image_encoder",)
# /proc/cpuinfo flags of native bfloat16 matrix arithmetic (Sapphire Rapids and later: amx_bf16;
# Cooper Lake, Zen 4: avx512_bf16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuTuning:
    """One Triton model's instance count and ONNX Runtime session options."""

    instances: int
    intra_op_threads: int
    allow_spinning: bool = False
    graph_optimization_level: str = "all"
    cpu_mem_arena: bool = True
    arena_shrinkage: bool = False
    # Which library runs the ONNX file, and (OpenVINO only) in which precision.
    runtime: str = "onnxruntime"
    inference_precision: str = "f32"
    # OpenVINO only. fixed_batch: compile for one row (batch dimension 1) and run a request's rows
    # one at a time; with every dimension fixed OpenVINO plans a call's buffers once, ahead, instead
    # of allocating them node by node as it must for a dynamic batch (the real image encoder at
    # S = 1024: ~200 MiB less peak, ~10x fewer page faults, the same time: bench/README.md).
    # snippets: OpenVINO's JIT fusion of element-wise chains and attentions ("SNIPPETS_MODE");
    # with fixed shapes it fuses the encoder's element-wise chains into kernels that round its
    # features 3.5x further from fp32's, so the encoder runs with it off.
    fixed_batch: bool = False
    snippets: bool = True
    # ONNX Runtime only. > 0: each instance also holds a session with this many threads, spinning
    # off, for the calls that run while another instance of the model is executing; the configured
    # session (intra_op_threads, allow_spinning) then serves the calls that run alone.
    contended_threads: int = 0

    def __post_init__(self) -> None:
        if self.instances < 1 or self.intra_op_threads < 1:
            raise ValueError(f"instances and intra_op_threads must be >= 1: {self}")
        if self.graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}: {self}")
        if self.runtime not in RUNTIMES or self.inference_precision not in PRECISIONS:
            raise ValueError(f"runtime must be one of {RUNTIMES} and inference_precision one of {PRECISIONS}: {self}")
        if self.inference_precision != "f32" and self.runtime != "openvino":
            raise ValueError(f"ONNX Runtime's CPU provider runs fp32 only; bf16 needs runtime openvino: {self}")
        if (self.fixed_batch or not self.snippets) and self.runtime != "openvino":
            raise ValueError(f"fixed_batch and snippets are OpenVINO settings; this runtime is {self.runtime}: {self}")
        if not 0 <= self.contended_threads <= self.intra_op_threads:
            raise ValueError(f"contended_threads must be between 0 and intra_op_threads: {self}")
        if self.contended_threads and self.runtime != "onnxruntime":
            raise ValueError(f"contended_threads is an ONNX Runtime setting; this runtime is {self.runtime}: {self}")

    def parameters(self) -> dict[str, str]:
        """The config.pbtxt parameters engines/python_backend/onnx_model.py reads."""
        return {
            "intra_op_threads": str(self.intra_op_threads),
            "allow_spinning": "true" if self.allow_spinning else "false",
            "graph_optimization_level": self.graph_optimization_level,
            "cpu_mem_arena": "true" if self.cpu_mem_arena else "false",
            "arena_shrinkage": "true" if self.arena_shrinkage else "false",
            "runtime": self.runtime,
            "inference_precision": self.inference_precision,
            **({"openvino_fixed_batch": "true" if self.fixed_batch else "false",
                "openvino_snippets": "true" if self.snippets else "false"} if self.runtime == "openvino" else
               {"contended_intra_op_threads": str(self.contended_threads)}),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def heavy_part(cores: int) -> CpuTuning:
    """A model whose one call is a frame's whole cost (the SAM 2 parts)."""
    _check_cores(cores)
    threads = min(cores, HEAVY_MAX_THREADS)
    return CpuTuning(instances=max(1, cores // threads), intra_op_threads=threads, arena_shrinkage=True)


def sam2_runtime(tuning: CpuTuning, precision: str, part: str = "") -> CpuTuning:
    """``tuning`` (the SAM 2 part ``part``'s) running in ``precision``: "f32" on ONNX Runtime,
    "bf16" on OpenVINO, where the parts of ``FIXED_BATCH_SAM2_PARTS`` are compiled for one row with
    snippets off (``CpuTuning.fixed_batch``). Resolve "auto" with ``resolve_sam2_precision`` first."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "f32":
        return replace(tuning, runtime="onnxruntime", inference_precision="f32")
    # arena_shrinkage stays as the part has it: on OpenVINO it means release_memory after each call.
    fixed = part in FIXED_BATCH_SAM2_PARTS
    return replace(tuning, runtime="openvino", inference_precision="bf16", fixed_batch=fixed, snippets=not fixed)


def resolve_sam2_precision(asked: str, *, real_parts: bool, cpuinfo: Path = CPUINFO,
                           openvino_installed: bool | None = None) -> str:
    """The SAM 2 parts' precision for ``asked`` ("auto", "f32" or "bf16"). "auto": bf16 for real
    parts on a CPU with native bf16 when OpenVINO is installed; fp32 otherwise (the stand-ins cost
    nothing, so they keep the runtime the tests exercise most). "bf16" asked for without OpenVINO
    is an error, not a silent fp32."""
    if asked not in SAM2_PRECISION_CHOICES:
        raise ValueError(f"SAM 2 precision must be one of {SAM2_PRECISION_CHOICES}, got {asked!r}")
    installed = openvino_available() if openvino_installed is None else openvino_installed
    if asked == "bf16" and not installed:
        raise RuntimeError("--sam2-precision bf16 runs the SAM 2 parts on OpenVINO, which is not installed "
                           "(pip install '.[embedded]')")
    if asked != "auto":
        return asked
    return "bf16" if real_parts and installed and cpu_has_bf16(cpuinfo) else "f32"


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether every CPU listed in ``cpuinfo`` computes bfloat16 natively (see BF16_CPU_FLAGS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flag_lines = [line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")]
    return bool(flag_lines) and all(any(flag in flags for flag in BF16_CPU_FLAGS) for flags in flag_lines)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def per_request_model(cores: int, instances: int | None = None) -> CpuTuning:
    """A model that serves independent requests (YOLOv8 detection, matting); ``instances``
    overrides the instance count (the narrow session follows it)."""
    _check_cores(cores)
    threads = min(cores, LIGHT_MAX_THREADS)
    if instances is None:
        instances = max(LIGHT_MIN_INSTANCES, cores // threads)
    elif instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    contended = cores // instances if instances > 1 and instances * threads > cores else 0
    if contended == 0:
        return CpuTuning(instances=instances, intra_op_threads=threads)
    return CpuTuning(instances=instances, intra_op_threads=threads, allow_spinning=True, contended_threads=contended)


def available_cores(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: the CPU affinity, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host must not start 64 threads per session)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_cpu_max)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_quota(path: Path) -> int | None:
    """``cpu.max`` is "max 100000" (no limit) or "<quota> <period>"; the quota rounded up to cores."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def _check_cores(cores: int) -> None:
    if not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be an integer >= 1, got {cores!r}")
