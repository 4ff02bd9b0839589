"""The SAM 2 parts' contract as Triton serves them (server/sam2/contract.py): sizes read from the
model specs, never assumed, and the shared-memory limits of the dynamic dimensions. The specs
are written by hand here; the CPU repository's own SAM 2 models are checked against the same
names in tests/unit/test_sam2_contract.py."""

from __future__ import annotations

import grpc
import pytest

from server.errors import ServiceError
from server.sam2 import contract as sam2
from server.sam2.contract import Sam2Contract
from server.triton.model_spec import ModelSpec, TensorSpec

S = 512  # not SAM 2.1's 1024: nothing may be hard-coded
F = S // 16


Shapes = dict[str, tuple[int, ...]]


def spec(name: str, inputs: Shapes, outputs: Shapes, max_batch_size: int = 0, **parameters: str) -> ModelSpec:
    return ModelSpec(
        name,
        "1",
        "python",
        max_batch_size,
        tuple(TensorSpec(n, "FP32", shape) for n, shape in inputs.items()),
        tuple(TensorSpec(n, "FP32", shape) for n, shape in outputs.items()),
        dict(parameters),
    )


CANDIDATES = {"masks": (-1, 4, S // 4, S // 4), "iou_scores": (-1, 4), "obj_ptrs": (-1, 4, 256),
              "object_score_logits": (-1, 1)}
FEATURES = {"vision_feat": (-1, 256, F, F), "high_res_feat0": (-1, 32, S // 4, S // 4),
            "high_res_feat1": (-1, 64, S // 8, S // 8)}
PROMPT = {"point_coords": (-1, -1, 2), "point_labels": (-1, -1)}


def specs(batch: int = 16, **attention_parameters: str) -> dict[str, ModelSpec]:
    """Triton's view of the parts (metadata shapes: the batch dimension is -1 on batching models)."""
    memory = {"memory_feats": (-1, -1, 64, F, F), "memory_tpos": (-1, -1), "obj_ptr_tdiff": (-1, -1)}
    return {
        sam2.IMAGE_ENCODER: spec(sam2.IMAGE_ENCODER, {"image": (-1, S, S, 3)}, FEATURES, 4),
        sam2.MASK_DECODER: spec(sam2.MASK_DECODER, {"image_embed": FEATURES["vision_feat"], **PROMPT}, CANDIDATES, 16),
        sam2.MEMORY_ATTENTION: spec(
            sam2.MEMORY_ATTENTION,
            {"vision_feat": (-1, 256, F, F), **memory, "obj_ptrs": (-1, -1, 256)},
            {"conditioned_feat": (-1, 256, F, F)},
            batch,
            **attention_parameters,
        ),
        sam2.MEMORY_ENCODER: spec(
            sam2.MEMORY_ENCODER,
            {"vision_feat": (-1, 256, F, F), "mask_logits": (-1, 1, S // 4, S // 4), "object_score_logits": (-1, 1)},
            {"maskmem_feat": (-1, 64, F, F)},
            batch,
        ),
        sam2.FRAME_STEP: spec(
            sam2.FRAME_STEP,
            {"image": (1, S, S, 3), "memory_feats": (1, -1, 64, F, F), "memory_tpos": (1, -1),
             "memory_obj_ptrs": (1, -1, 256), "obj_ptr_tdiff": (1, -1), "point_coords": (1, -1, 2),
             "point_labels": (1, -1)},
            {"vision_feat": (1, 256, F, F), **{n: (1, *d[1:]) for n, d in CANDIDATES.items()}},
        ),
        sam2.TRACK_STEP: spec(
            sam2.TRACK_STEP,
            {**FEATURES, **memory, "memory_obj_ptrs": (-1, -1, 256), **PROMPT},
            CANDIDATES,
            min(batch, 16),
        ),
    }


def test_sizes_come_from_the_specs() -> None:
    contract = Sam2Contract.from_specs(specs())
    assert (contract.image_size, contract.mask_size) == (S, S // 4)
    assert not contract.stand_in


def test_a_stand_in_part_makes_the_contract_a_stand_in() -> None:
    parts = specs()
    encoder = parts[sam2.IMAGE_ENCODER]
    parts[sam2.IMAGE_ENCODER] = spec(encoder.name, {"image": (-1, S, S, 3)}, FEATURES, 4, stand_in="true")
    assert Sam2Contract.from_specs(parts).stand_in


def test_a_repository_whose_per_object_parts_do_not_batch_is_refused_with_what_to_do() -> None:
    parts = specs()
    attention = parts[sam2.MEMORY_ATTENTION]
    parts[sam2.MEMORY_ATTENTION] = spec(attention.name, {"memory_feats": (-1, 64, F, F)}, {"conditioned_feat": (1, 256, F, F)})
    with pytest.raises(ServiceError) as raised:
        Sam2Contract.from_specs(parts)
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "sam2_memory_attention" in raised.value.message and "build_engines.py" in raised.value.message


def test_per_object_parts_take_up_to_max_objects_per_call_rows() -> None:
    rows = sam2.MAX_OBJECTS_PER_CALL
    contract = Sam2Contract.from_specs(specs())
    for model in (sam2.MASK_DECODER, sam2.MEMORY_ATTENTION, sam2.MEMORY_ENCODER, sam2.TRACK_STEP):
        assert contract.rows_per_call(model) == rows, model
    # One frame per encoder call, and the frame step is one object by definition.
    assert contract.rows_per_call(sam2.IMAGE_ENCODER) == 1
    assert contract.rows_per_call(sam2.FRAME_STEP) == 1
    # A model that batches less than that bounds it.
    assert Sam2Contract.from_specs(specs(batch=2)).rows_per_call(sam2.MEMORY_ATTENTION) == 2


def test_shared_memory_slots_hold_a_call_of_rows_at_the_attention_configs_limits() -> None:
    contract = Sam2Contract.from_specs(specs(max_memories="5", max_object_pointers="12"))
    rows, points = sam2.MAX_OBJECTS_PER_CALL, sam2.MAX_SHM_PROMPT_POINTS
    assert contract.shm_max_shapes(sam2.MEMORY_ATTENTION) == {
        "vision_feat": (rows, 256, F, F),
        "memory_feats": (rows, 5, 64, F, F),
        "memory_tpos": (rows, 5),
        "obj_ptrs": (rows, 12, 256),
        "obj_ptr_tdiff": (rows, 12),
        "conditioned_feat": (rows, 256, F, F),
    }
    decoder = contract.shm_max_shapes(sam2.MASK_DECODER)
    assert decoder["point_coords"] == (rows, points, 2) and decoder["masks"] == (rows, 4, S // 4, S // 4)
    # The step ensembles name the pointers input memory_obj_ptrs; the frame step is one object.
    track = contract.shm_max_shapes(sam2.TRACK_STEP)
    assert track["memory_obj_ptrs"] == (rows, 12, 256) and track["high_res_feat0"] == (rows, 32, S // 4, S // 4)
    frame = contract.shm_max_shapes(sam2.FRAME_STEP)
    assert frame["memory_feats"] == (1, 5, 64, F, F) and frame["point_coords"] == (1, points, 2)
    assert contract.shm_max_shapes(sam2.IMAGE_ENCODER)["image"] == (1, S, S, 3)


def test_attention_limits_default_to_sam2s_own() -> None:
    # 7 memories (the prompt frame + 6 recent) and 16 object pointers when the config says nothing.
    limits = Sam2Contract.from_specs(specs()).shm_max_shapes(sam2.MEMORY_ATTENTION)
    assert limits["memory_feats"][1] == 7 and limits["obj_ptrs"][1] == 16
