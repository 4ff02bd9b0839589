"""engines/cpu_tuning.py: instances and ONNX Runtime threads chosen from the core count, and the
repository builder writing them into every config (engines/cpu_repository.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from engines import cpu_tuning
from engines.cpu_repository import MATTING, build_cpu_repository, default_yolo_onnx, repository_tuning
from engines.cpu_tuning import CpuTuning, available_cores, heavy_part, per_request_model

SAM2_PARTS = ("sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder")


@pytest.mark.parametrize(("cores", "instances", "threads"), [(1, 1, 1), (2, 1, 2), (4, 1, 4), (8, 1, 8),
                                                              (16, 2, 8), (24, 3, 8)])
def test_heavy_part_puts_every_core_in_one_session_without_oversubscribing(cores, instances, threads):
    tuning = heavy_part(cores)
    assert (tuning.instances, tuning.intra_op_threads) == (instances, threads)
    assert tuning.instances * tuning.intra_op_threads <= cores


@pytest.mark.parametrize(("cores", "instances", "threads", "contended"),
                         [(1, 2, 1, 0), (2, 2, 2, 1), (4, 2, 4, 2), (8, 2, 4, 0), (16, 4, 4, 0)])
def test_per_request_model_has_threads_for_one_request_and_instances_for_load(cores, instances, threads, contended):
    tuning = per_request_model(cores)
    assert (tuning.instances, tuning.intra_op_threads, tuning.contended_threads) == (instances, threads, contended)
    # Concurrent calls on the narrow sessions never hold more threads than the cores; the wide
    # session spins only where a narrow one takes over under contention.
    assert tuning.instances * (tuning.contended_threads or tuning.intra_op_threads) <= max(cores, tuning.instances)
    assert tuning.allow_spinning == (contended > 0)


@pytest.mark.parametrize(("cores", "instances", "contended"), [(2, 1, 0), (2, 3, 0), (4, 3, 1), (8, 4, 2)])
def test_per_request_model_narrow_session_follows_the_instance_count(cores, instances, contended):
    tuning = per_request_model(cores, instances)
    assert (tuning.instances, tuning.contended_threads) == (instances, contended)


def test_spinning_off_arena_on_and_full_graph_optimisation_by_default():
    common = {"intra_op_threads": "2", "graph_optimization_level": "all", "cpu_mem_arena": "true",
              "runtime": "onnxruntime", "inference_precision": "f32"}
    assert heavy_part(2).parameters() == {**common, "allow_spinning": "false", "arena_shrinkage": "true",
                                          "contended_intra_op_threads": "0"}
    # On 2 cores two 2-thread YOLOv8 instances would hold 4 threads: a 1-thread session for the
    # calls that run beside another instance's, and the 2-thread one spins for the calls alone.
    assert per_request_model(2).parameters() == {**common, "allow_spinning": "true", "arena_shrinkage": "false",
                                                 "contended_intra_op_threads": "1"}


@pytest.mark.parametrize("cores", [0, -1, 1.5, None])
def test_bad_core_counts_are_refused(cores):
    with pytest.raises(ValueError, match="cores"):
        heavy_part(cores)  # type: ignore[arg-type]


def test_tuning_validates_its_fields():
    with pytest.raises(ValueError):
        CpuTuning(instances=0, intra_op_threads=1)
    with pytest.raises(ValueError, match="graph_optimization_level"):
        CpuTuning(instances=1, intra_op_threads=1, graph_optimization_level="fast")
    with pytest.raises(ValueError, match="runtime"):
        CpuTuning(instances=1, intra_op_threads=1, runtime="tensorrt")
    with pytest.raises(ValueError, match="bf16 needs runtime openvino"):
        CpuTuning(instances=1, intra_op_threads=1, inference_precision="bf16")
    with pytest.raises(ValueError, match="OpenVINO settings"):
        CpuTuning(instances=1, intra_op_threads=1, fixed_batch=True)
    with pytest.raises(ValueError, match="OpenVINO settings"):
        CpuTuning(instances=1, intra_op_threads=1, snippets=False)
    with pytest.raises(ValueError, match="contended_threads must be between"):
        CpuTuning(instances=2, intra_op_threads=1, contended_threads=2)
    with pytest.raises(ValueError, match="contended_threads is an ONNX Runtime setting"):
        CpuTuning(instances=2, intra_op_threads=2, contended_threads=1, runtime="openvino")
    with pytest.raises(ValueError, match="instances must be >= 1"):
        per_request_model(2, 0)


AMX_CPU = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu avx512f amx_bf16\n"
ZEN4_CPU = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n"
OLD_CPU = "processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2 fma\n"
# A hybrid or misreported machine: one CPU without bf16 must not get bf16 threads scheduled on it.
MIXED_CPU = "processor\t: 0\nflags\t\t: fpu amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"


@pytest.mark.parametrize(("text", "expected"), [(AMX_CPU, True), (ZEN4_CPU, True), (OLD_CPU, False),
                                                 (MIXED_CPU, False), ("", False)])
def test_cpu_has_bf16_reads_every_cpus_flags(tmp_path, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_tuning.cpu_has_bf16(cpuinfo) is expected
    assert cpu_tuning.cpu_has_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize(("asked", "real", "cpu", "installed", "expected"), [
    ("auto", True, AMX_CPU, True, "bf16"),
    ("auto", True, OLD_CPU, True, "f32"),  # no native bf16: emulating it would be slower than fp32
    ("auto", True, AMX_CPU, False, "f32"),  # OpenVINO missing (an orchestrator-only install)
    ("auto", False, AMX_CPU, True, "f32"),  # stand-ins keep ONNX Runtime
    ("f32", True, AMX_CPU, True, "f32"),
    ("bf16", False, OLD_CPU, True, "bf16"),  # asked for: given, whatever the CPU
])
def test_sam2_precision_auto_is_bf16_only_for_real_parts_on_a_bf16_cpu(tmp_path, asked, real, cpu, installed, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(cpu)
    got = cpu_tuning.resolve_sam2_precision(asked, real_parts=real, cpuinfo=cpuinfo, openvino_installed=installed)
    assert got == expected


def test_sam2_precision_bf16_without_openvino_or_unknown_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="OpenVINO, which is not installed"):
        cpu_tuning.resolve_sam2_precision("bf16", real_parts=True, openvino_installed=False)
    with pytest.raises(ValueError, match="auto"):
        cpu_tuning.resolve_sam2_precision("fp16", real_parts=True, openvino_installed=True)


def test_sam2_runtime_bf16_is_openvino_and_f32_is_onnx_runtime():
    bf16 = cpu_tuning.sam2_runtime(heavy_part(2), "bf16")
    assert (bf16.runtime, bf16.inference_precision) == ("openvino", "bf16")
    assert (bf16.instances, bf16.intra_op_threads) == (1, 2)  # the cores, as before
    assert bf16.arena_shrinkage  # on OpenVINO: release_memory after each call
    assert cpu_tuning.sam2_runtime(heavy_part(2), "f32") == heavy_part(2)
    # only the image encoder is compiled for one row, with OpenVINO's snippets off
    assert (bf16.fixed_batch, bf16.snippets) == (False, True)
    encoder = cpu_tuning.sam2_runtime(heavy_part(2), "bf16", "sam2_image_encoder")
    assert (encoder.fixed_batch, encoder.snippets) == (True, False)
    assert encoder.parameters()["openvino_fixed_batch"] == "true" and encoder.parameters()["openvino_snippets"] == "false"
    for part in ("sam2_memory_attention", "sam2_memory_encoder"):
        assert not cpu_tuning.sam2_runtime(heavy_part(2), "bf16", part).fixed_batch
    assert cpu_tuning.sam2_runtime(heavy_part(2), "f32", "sam2_image_encoder") == heavy_part(2)


@pytest.mark.parametrize(("text", "expected"), [("max 100000\n", 64), ("200000 100000\n", 2),
                                                 ("150000 100000\n", 2), ("50000 100000\n", 1)])
def test_available_cores_respects_the_cgroup_quota(tmp_path, monkeypatch, text, expected):
    monkeypatch.setattr(cpu_tuning.os, "sched_getaffinity", lambda pid: set(range(64)))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text)
    assert available_cores(cpu_max) == expected


def test_available_cores_without_a_cgroup_file_is_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_tuning.os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert available_cores(tmp_path / "absent") == 3


def test_repository_tuning_overrides():
    tuned = repository_tuning(2)
    assert tuned["yolov8"] == per_request_model(2) and tuned[MATTING] == per_request_model(2)
    assert all(tuned[part] == heavy_part(2) for part in SAM2_PARTS)
    explicit = repository_tuning(2, instances=5, intra_op_threads=1)
    assert explicit["yolov8"].instances == 5 and explicit["sam2_image_encoder"].instances == 1
    assert {t.intra_op_threads for t in explicit.values()} == {1}
    # An explicit thread count is one count for every call: no narrow session, no spinning.
    assert {(t.contended_threads, t.allow_spinning) for t in explicit.values()} == {(0, False)}
    assert repository_tuning(2, instances=1)["yolov8"] == per_request_model(2, 1)
    bf16 = repository_tuning(2, sam2_precision="bf16")
    assert {part for part in SAM2_PARTS if bf16[part].runtime == "openvino"} == {
        "sam2_image_encoder", "sam2_memory_attention", "sam2_memory_encoder"}
    # The decoder writes the masks: it stays in fp32 on ONNX Runtime.
    assert bf16["sam2_mask_decoder"] == heavy_part(2)
    assert bf16["yolov8"].runtime == "onnxruntime" and bf16[MATTING].runtime == "onnxruntime"


def _config(repo: Path, name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.skipif(not default_yolo_onnx().is_file(), reason="no YOLOv8 weights in ../shared/assets")
def test_repository_written_for_the_given_cores_and_rebuilt_on_another_machine(tmp_path):
    out = tmp_path / "repo"
    build_cpu_repository(out, default_yolo_onnx(), cpu_cores=16, sam2_image_size=256)
    for name in (*SAM2_PARTS, "yolov8", MATTING):
        config = _config(out, name)
        expected = heavy_part(16) if name in SAM2_PARTS else per_request_model(16)
        assert config.instance_group[0].count == expected.instances, name
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert {k: params[k] for k in expected.parameters()} == expected.parameters(), name
    built = (out / "MANIFEST.json").stat().st_mtime_ns
    build_cpu_repository(out, default_yolo_onnx(), cpu_cores=16, sam2_image_size=256)
    assert (out / "MANIFEST.json").stat().st_mtime_ns == built  # same machine: up to date
    build_cpu_repository(out, default_yolo_onnx(), cpu_cores=2, sam2_image_size=256)
    assert _config(out, "sam2_memory_attention").parameters["intra_op_threads"].string_value == "2"
    assert _config(out, "yolov8").instance_group[0].count == 2
