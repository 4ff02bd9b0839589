"""Triton python-backend model: one ONNX file run on CPU by ONNX Runtime or OpenVINO.

Generic: the ONNX file, the runtime, the session options and the tensor names all come from the
model's config.pbtxt (parameters ``onnx_file``, ``runtime`` ("onnxruntime", the default, or
"openvino"), ``inference_precision`` (OpenVINO: "f32" or "bf16"), ``intra_op_threads``,
``allow_spinning``, ``graph_optimization_level``, ``cpu_mem_arena`` (these three ONNX Runtime's),
``arena_shrinkage`` (give a call's working memory back after it: ONNX Runtime's arena shrinkage,
or OpenVINO's release_memory), ``contended_intra_op_threads`` (ONNX Runtime: a second, narrower
session for the calls that run while another instance of the model is executing; see
``_ContentionAwareSession``), ``openvino_fixed_batch`` (compile for one row; a batched request
then runs row by row), ``openvino_snippets`` (OpenVINO's JIT fusion, "SNIPPETS_MODE") and
``per_item_execution``; input and output lists). OpenVINO is there for
one reason: bf16 on CPUs that compute it natively (AMX), which ONNX Runtime's CPU provider lacks
(engines/cpu_tuning.py). ``per_item_execution`` "true" (the default) runs a batched request one item
at a time, "false" runs the whole batch in one call, and joins the requests Triton's dynamic
batcher hands over together into one call when their shapes allow. Models whose ``stand_in`` parameter is
"true" say so loudly in the startup log.
The CPU model repository builder (engines/cpu_repository.py) copies this file to
``<model>/<version>/model.py``.
"""

import os
import sys

# Must run before numpy is imported (triton_python_backend_utils imports numpy too): the
# python backend stub embeds the system libpython with an isolated configuration that
# ignores PYTHONPATH, so it cannot see the virtualenv that holds numpy and onnxruntime.
# The Triton launcher passes that environment's site-packages in FRAMEWISE_TRITON_PYTHONPATH.
for _entry in reversed(os.environ.get("FRAMEWISE_TRITON_PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

_OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model_name = config["name"]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.per_item = _flag(params, "per_item_execution", True)
        stand_in = params.get("stand_in", "unknown").strip().lower()
        self.input_names = [i["name"] for i in config["input"]]
        self.outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
        ]

        onnx_path = os.path.join(args["model_repository"], args["model_version"], params["onnx_file"])
        threads = int(params.get("intra_op_threads", "1"))
        runtime = params.get("runtime", "onnxruntime").strip().lower()
        if runtime == "openvino":
            self.session = _OpenVinoSession(onnx_path, threads, params.get("inference_precision", "f32").strip().lower(),
                                            release_memory=_flag(params, "arena_shrinkage", False),
                                            fixed_batch=self.batched and _flag(params, "openvino_fixed_batch", False),
                                            snippets=_flag(params, "openvino_snippets", True))
            # compiled for one row: a batched request runs row by row whatever the config says
            self.per_item = self.per_item or self.session.fixed_batch
        elif runtime == "onnxruntime":
            contended = int(params.get("contended_intra_op_threads", "0"))
            if contended > 0:
                self.session = _ContentionAwareSession(onnx_path, threads, contended, params, self.model_name)
            else:
                self.session = _OrtSession(onnx_path, threads, params)
        else:
            raise ValueError(f"{self.model_name}: unknown runtime {runtime!r} (onnxruntime or openvino)")

        missing = [n for n in self.input_names if n not in self.session.input_names]
        missing += [n for n, _ in self.outputs if n not in self.session.output_names]
        if missing:
            raise ValueError(f"{onnx_path} has no tensors named {missing}")
        pb_utils.Logger.log_info(
            f"{self.model_name} instance {args['model_instance_name']}: {onnx_path} on {self.session.describe()}, "
            f"per_item_execution={self.per_item}, stand_in={stand_in}"
        )
        if stand_in == "true":
            _log_warn(
                f"{self.model_name} is a STAND-IN, not the real network: right tensor names, shapes "
                f"and dtypes, no learned meaning (source: {params.get('source', 'not given')})"
            )

    def execute(self, requests):
        # Triton's dynamic batcher hands over the requests that queued while this instance was
        # busy. A model that runs a batch in one call (per_item_execution "false": the SAM 2 parts,
        # one tracked object per row, maybe of different sessions) runs requests whose non-batch
        # shapes agree as ONE call and splits the result: one pass over the weights for all of
        # them. Anything else, or a joined call that fails, goes request by request, so one bad
        # request fails only itself.
        responses = [None] * len(requests)
        groups = {}
        for position, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except Exception as exc:  # noqa: BLE001 - reported on that request only
                responses[position] = self._error(exc)
                continue
            key = _join_key(feeds) if self.batched and not self.per_item else ("alone", position)
            groups.setdefault(key, []).append((position, feeds))
        try:
            with self.session.executing():
                self._execute_groups(groups, responses)
        finally:
            # Once per execute, not per row: a heavy part gives its working memory back here. The
            # responses are made already: a failure here is logged, never theirs.
            try:
                self.session.after_execute()
            except Exception as exc:  # noqa: BLE001
                _log_warn(f"{self.model_name}: giving the working memory back failed: {type(exc).__name__}: {exc}")
        return responses

    def _execute_groups(self, groups, responses):
        for members in groups.values():
            if len(members) > 1:
                try:
                    joined = {name: np.concatenate([feeds[name] for _, feeds in members]) for name in self.input_names}
                    results = self._run(joined)
                except Exception:  # noqa: BLE001 - retried one by one below, each reporting its own error
                    pass
                else:
                    start = 0
                    for position, feeds in members:
                        rows = next(iter(feeds.values())).shape[0]
                        responses[position] = self._response([r[start:start + rows] for r in results])
                        start += rows
                    continue
            for position, feeds in members:
                try:
                    responses[position] = self._response(self._run(feeds))
                except Exception as exc:  # one bad request must not fail the rest of the batch
                    responses[position] = self._error(exc)

    def _feeds(self, request):
        feeds = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            feeds[name] = tensor.as_numpy()
        if self.batched:
            sizes = {a.shape[0] for a in feeds.values()}
            if len(sizes) != 1:
                raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
            if sizes == {0}:
                raise ValueError("empty batch")
        return feeds

    def _run(self, feeds):
        output_names = [name for name, _ in self.outputs]
        batch = next(iter(feeds.values())).shape[0] if self.batched else 1
        if not self.batched or not self.per_item or batch == 1:
            return self.session.run(output_names, feeds)
        # per_item_execution (yolov8), one image at a time, on purpose: the int8 weights are
        # dynamically quantised per tensor (DynamicQuantizeLinear picks the activation scale
        # and zero point from the min/max of the whole tensor), so running several images as
        # one batch would make each image's result depend on the other images in the batch.
        per_image = [
            self.session.run(output_names, {n: a[i:i + 1] for n, a in feeds.items()})
            for i in range(batch)
        ]
        return [np.concatenate([r[k] for r in per_image], axis=0) for k in range(len(output_names))]

    def _response(self, results):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
            for (name, dtype), value in zip(self.outputs, results)
        ])

    def _error(self, exc):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {type(exc).__name__}: {exc}"))

    def finalize(self):
        self.session = None


def _flag(params, key, default):
    """A "true"/"false" config parameter; ``default`` where the config does not set it."""
    return params.get(key, "true" if default else "false").strip().lower() == "true"


def _log_warn(message):
    # Older python backends have no log_warn.
    getattr(pb_utils.Logger, "log_warn", pb_utils.Logger.log_info)(message)


def _join_key(feeds):
    """Requests with equal keys can run as one batch: every input's dtype and non-batch shape."""
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))


class _OrtSession:
    """An ONNX Runtime CPU session with the config's options."""

    def __init__(self, onnx_path, threads, params, *, spinning=None, env_arena=False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Set by engines/cpu_tuning.py for the machine the repository was built on; absent: ORT's
        # defaults. Spinning off where other instances and Triton share these cores: a pool thread
        # busy-waiting between operators burns the core they need.
        if spinning is None:
            spinning = _flag(params, "allow_spinning", True)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if spinning:
            # The pool spins between a call's operators (a sleeping thread woken ~500 times a call
            # is what made a lone YOLOv8 call ~15 % slower than with spinning) and stops when the
            # call ends, so an idle instance burns nothing.
            options.add_session_config_entry("session.force_spinning_stop", "1")
        if env_arena:
            options.add_session_config_entry("session.use_env_allocators", "1")
        level = params.get("graph_optimization_level", "all").strip().lower()
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[level]
        options.enable_cpu_mem_arena = _flag(params, "cpu_mem_arena", True)
        # Heavy parts hand their arena back after each call, so this process does not hold its peak
        # activations while the other parts of the frame run theirs.
        self.run_options = ort.RunOptions()
        shrink = _flag(params, "arena_shrinkage", False)
        if shrink:
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = {o.name for o in self.session.get_outputs()}
        self._described = (
            f"onnxruntime {ort.__version__} CPU fp32, intra_op_threads={threads}, allow_spinning={spinning}, "
            f"graph_optimization_level={level}, cpu_mem_arena={options.enable_cpu_mem_arena}, arena_shrinkage={shrink}"
            + (", arena shared with the instance's other session" if env_arena else "")
        )

    def describe(self):
        return self._described

    def executing(self):
        return contextlib.nullcontext()

    def run(self, output_names, feeds):
        return self.session.run(output_names, feeds, self.run_options)

    def after_execute(self):
        pass  # arena shrinkage, when asked for, is a run option (above)


class _ContentionAwareSession:
    """Two ONNX Runtime sessions of one model, chosen call by call by whether another instance of
    the model is executing at that moment.

    Alone, a call runs on the wide session: every thread and, as engines/cpu_tuning.py configures
    it (``allow_spinning``), spinning between operators while the call runs (stopped after it), as
    fast as the in-process session a user would write. While another instance executes, it runs on
    the narrow one: fewer threads, no spinning, so that the instances together do not put more
    busy threads than cores on the machine (two wide spinning sessions at once cost a third of the
    throughput under load). Who is executing is known across
    the instance processes through ``_InstancePresence``. The two sessions take turns (one call at
    a time per instance), so they draw on one arena: ONNX Runtime's environment allocator."""

    def __init__(self, onnx_path, threads, contended_threads, params, model_name):
        shared = _register_env_arena(model_name)
        self.alone = _OrtSession(onnx_path, threads, params, env_arena=shared)
        self.contended = _OrtSession(onnx_path, contended_threads, params, spinning=False, env_arena=shared)
        self.input_names = self.alone.input_names
        self.output_names = self.alone.output_names
        path = _presence_path(model_name)
        try:
            self.presence = _InstancePresence(path)
        except OSError as exc:
            # Without it every call takes the narrow session: slower alone, never oversubscribed.
            _log_warn(f"{model_name}: cannot open {path} ({exc}); every call runs on the "
                      f"{contended_threads}-thread session")
            self.presence = None
        self.calls = {"alone": 0, "contended": 0}
        self._described = (f"alone: {self.alone.describe()}; while another instance executes: "
                           f"{self.contended.describe()}; instances seen through {path}")

    def describe(self):
        return self._described

    def executing(self):
        return self.presence.executing() if self.presence is not None else contextlib.nullcontext()

    def run(self, output_names, feeds):
        alone = self.presence is not None and not self.presence.others_executing()
        self.calls["alone" if alone else "contended"] += 1
        return (self.alone if alone else self.contended).run(output_names, feeds)

    def after_execute(self):
        pass


def _register_env_arena(model_name):
    """Registers an arena allocator on ONNX Runtime's process-wide environment, which sessions
    with ``session.use_env_allocators`` then share; False (each session its own arena) if
    this ONNX Runtime refuses."""
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
    except Exception as exc:  # noqa: BLE001 - only memory is at stake
        _log_warn(f"{model_name}: no shared arena ({type(exc).__name__}: {exc}); each session keeps its own")
        return False
    return True


def _presence_path(model_name):
    """One file per model per Triton server: the Triton launcher's run directory
    (``FRAMEWISE_TRITON_RUN_DIR``, emptied whenever it starts Triton) or the system's temporary
    directory, named after the server's pid (the stub's parent) so two servers never share it."""
    folder = os.environ.get("FRAMEWISE_TRITON_RUN_DIR") or tempfile.gettempdir()
    return os.path.join(folder, f"framewise-{model_name}-{os.getppid()}.instances")


class _InstancePresence:
    """Whether another instance of this model, another stub process, is executing right now.

    Every instance opens the same file. While it executes, an instance holds a POSIX record lock
    on the byte at its own pid; ``F_GETLK`` over the whole file then reports a lock held by any
    other process and never one of this process's own, so one system call answers. A lock dies
    with its process: an instance that crashed mid-call never reads as busy."""

    # struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid
    # (pid_t), padded to 32 bytes.
    _FLOCK = "@hhqqi4x"

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._pid = os.getpid()

    @contextlib.contextmanager
    def executing(self):
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._pid)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._pid)

    def others_executing(self):
        query = struct.pack(self._FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(self._fd, fcntl.F_GETLK, query)
        return struct.unpack(self._FLOCK, answer)[0] != fcntl.F_UNLCK


class _OpenVinoSession:
    """An OpenVINO CPU model compiled for latency (one stream: Triton's instances are the
    parallelism) in the config's inference precision. ``release_memory``: after each execute the
    compiled model frees its intermediate buffers (``CompiledModel.release_memory``) and glibc
    returns the freed heap to the system (``malloc_trim``): OpenVINO's counterpart of ONNX
    Runtime's arena shrinkage. Without it the image encoder keeps ~340 MB and the memory attention
    ~120 MB of a call's activations for good (S = 1024, measured in-process); with it a call costs
    ~10 % more (the buffers are mapped again: page faults, fewer with the huge pages the Triton
    launcher asks glibc for)."""

    def __init__(self, onnx_path, threads, precision, *, release_memory=False, fixed_batch=False, snippets=True):
        import openvino as ov  # only models that ask for it need it installed

        if precision not in ("f32", "bf16"):
            raise ValueError(f"inference_precision must be f32 or bf16, got {precision!r}")
        core = ov.Core()
        model = core.read_model(onnx_path)
        if fixed_batch:
            # Batch dimension 1, the others as the file has them: with every dimension fixed,
            # OpenVINO plans the call's buffers once instead of allocating them node by node.
            model.reshape({port.get_any_name(): ov.PartialShape([1, *list(port.get_partial_shape())[1:]])
                           for port in model.inputs})
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": precision,
        }
        if not snippets:
            config["SNIPPETS_MODE"] = "DISABLE"
        self.model = core.compile_model(model, "CPU", config)
        del model  # the compiled model keeps what it needs; the read graph's weights go
        self.fixed_batch = fixed_batch
        # What the plugin settled on (bf16 asked for on a CPU without it falls back to f32): logged.
        granted = self.model.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.request = self.model.create_infer_request()
        self.input_names = {name for port in self.model.inputs for name in port.get_names()}
        self.output_names = {name for port in self.model.outputs for name in port.get_names()}
        self._outputs = {name: port for port in self.model.outputs for name in port.get_names()}
        self.release_memory = release_memory
        # Looked up once, not on every call: glibc's malloc_trim, None elsewhere.
        self._malloc_trim = _malloc_trim() if release_memory else None
        self._described = (f"openvino {ov.__version__} CPU, inference precision {granted}, threads={threads}, "
                           f"release_memory={release_memory}, fixed_batch={fixed_batch}, snippets={snippets}")

    def describe(self):
        return self._described

    def executing(self):
        return contextlib.nullcontext()

    def run(self, output_names, feeds):
        # Copies: the request's output buffers are reused by the next call.
        results = self.request.infer(feeds)
        return [np.array(results[self._outputs[name]]) for name in output_names]

    def after_execute(self):
        if self.release_memory:
            self.model.release_memory()
            if self._malloc_trim is not None:
                self._malloc_trim(0)  # hands the heap's free memory back to the system


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    import ctypes

    return getattr(ctypes.CDLL(None), "malloc_trim", None)
