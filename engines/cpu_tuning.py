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
  prepares or returns tensors while the other computes.
- Spinning off everywhere: ONNX Runtime's pool threads busy-wait between operators by default;
  with several sessions (and the orchestrator, and Triton) on the same cores, a spinning thread
  burns the core another session needs.
- Graph optimisation level "all" (ORT's default, written down so a config says what runs) and
  the CPU arena on: turning it off raised the encoder's peak RSS and slowed it (bench/README.md).
- Heavy parts give their arena back after every call (ORT's run option
  ``memory.enable_memory_arena_shrinkage``): a frame runs the parts one after another, and without
  it every part's process keeps its own peak activations for good (the encoder ~0.8 GB, the memory
  attention ~1 GB at a full bank), so the stack's memory is the sum of all the peaks rather than
  the largest one. Per-request models keep theirs: small, and reused at once under load.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

HEAVY_MAX_THREADS = 8
LIGHT_MAX_THREADS = 4
LIGHT_MIN_INSTANCES = 2
GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class CpuTuning:
    """One Triton model's instance count and ONNX Runtime session options."""

    instances: int
    intra_op_threads: int
    allow_spinning: bool = False
    graph_optimization_level: str = "all"
    cpu_mem_arena: bool = True
    arena_shrinkage: bool = False

    def __post_init__(self) -> None:
        if self.instances < 1 or self.intra_op_threads < 1:
            raise ValueError(f"instances and intra_op_threads must be >= 1: {self}")
        if self.graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}: {self}")

    def parameters(self) -> dict[str, str]:
        """The config.pbtxt parameters engines/python_backend/onnx_model.py reads."""
        return {
            "intra_op_threads": str(self.intra_op_threads),
            "allow_spinning": "true" if self.allow_spinning else "false",
            "graph_optimization_level": self.graph_optimization_level,
            "cpu_mem_arena": "true" if self.cpu_mem_arena else "false",
            "arena_shrinkage": "true" if self.arena_shrinkage else "false",
        }

    def to_dict(self) -> dict:
        return asdict(self)


def heavy_part(cores: int) -> CpuTuning:
    """A model whose one call is a frame's whole cost (the SAM 2 parts)."""
    _check_cores(cores)
    threads = min(cores, HEAVY_MAX_THREADS)
    return CpuTuning(instances=max(1, cores // threads), intra_op_threads=threads, arena_shrinkage=True)


def per_request_model(cores: int) -> CpuTuning:
    """A model that serves independent requests (YOLOv8 detection, matting)."""
    _check_cores(cores)
    threads = min(cores, LIGHT_MAX_THREADS)
    return CpuTuning(instances=max(LIGHT_MIN_INSTANCES, cores // threads), intra_op_threads=threads)


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
