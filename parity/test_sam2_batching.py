"""The batching SAM 2 parts as exported (memory attention, memory encoder): dim 0 is the batch,
one row per tracked object, and row b equals the single-object computation on row b. Needs torch
and the SAM 2 package: the export environment (`make parity`), never `make test`.

S = 256 keeps it to seconds: the real SAM 2.1 hiera-tiny architecture with seeded random weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from parity import batching

SIZE = 256


@pytest.fixture(scope="module")
def model():
    import torch

    from engines.export import sam2_parts

    torch.set_grad_enabled(False)
    return sam2_parts.build_predictor("tiny", None, seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> tuple[Path, dict]:
    from engines.export import sam2_parts

    output = tmp_path_factory.mktemp("sam2_batching")
    parts = sam2_parts.export_model(model, output, source=sam2_parts.source_description("tiny", None, 0),
                                    parts=(batching.ATTENTION, batching.ENCODER), log=lambda _: None)
    return output, parts


def _dims(path: Path, kind: str) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in getattr(graph, kind)}


def test_batch_memories_and_pointers_are_dynamic(exported):
    folder, _ = exported
    f = SIZE // 16
    attention = folder / f"{batching.ATTENTION}.onnx"
    assert _dims(attention, "input") == {
        "vision_feat": ["batch", 256, f, f], "memory_feats": ["batch", "memories", 64, f, f],
        "memory_tpos": ["batch", "memories"], "obj_ptrs": ["batch", "pointers", 256],
        "obj_ptr_tdiff": ["batch", "pointers"]}
    assert _dims(attention, "output") == {"conditioned_feat": ["batch", 256, f, f]}
    encoder = folder / f"{batching.ENCODER}.onnx"
    assert _dims(encoder, "input") == {"vision_feat": ["batch", 256, f, f], "mask_logits": ["batch", 1, SIZE // 4,
                                                                                            SIZE // 4],
                                       "object_score_logits": ["batch", 1]}
    assert _dims(encoder, "output") == {"maskmem_feat": ["batch", 64, f, f]}


def test_export_checks_two_rows_against_the_single_object_reference(exported):
    _, parts = exported
    for name in (batching.ATTENTION, batching.ENCODER):
        report = parts[name].report
        assert report is not None and report.ok, str(report)
        assert report.inputs["vision_feat"][0][0] == 2, "the check must run a batch of 2 rows"


def test_each_row_equals_the_reference_on_its_own(model, exported):
    """ONNX Runtime at B = 3 with the memory count and pointer count of a young track (not the
    export check's full bank), against the unchanged single-object reference, row by row."""
    import onnxruntime as ort

    from engines.export import sam2_parts

    folder, _ = exported
    path = folder / f"{batching.ATTENTION}.onnx"
    feeds = batching.attention_inputs(onnx.load(str(path)), 3, 2, 5, seed=7)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = sam2_parts.reference_memory_attention_rows(model, *feeds.values()).numpy()
    rtol, atol = sam2_parts.TOLERANCES[batching.ATTENTION]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    # rows differ, so a graph that broadcast row 0 (or mixed rows) would fail above, not pass by luck
    assert np.abs(want[0] - want[1]).max() > 0.1


def test_rows_are_independent_on_every_runtime(exported):
    folder, _ = exported
    results = batching.check_folder(folder, batch=3, memories=3, pointers=4)
    assert all(r.ok for r in results), "\n".join(r.line() for r in results)
    runtimes = {(r.part, r.runtime.split(" (")[0]) for r in results}
    assert (batching.ATTENTION, "onnxruntime fused") in runtimes and (batching.ENCODER, "openvino f32") in runtimes
    # what the CPU repository serves: the 4 cross-attentions' value projections folded
    assert any(r.runtime == "onnxruntime 4 values folded, 8 MHA" for r in results), [r.runtime for r in results]
