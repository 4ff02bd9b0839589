"""The SAM 2 parts' contract as Triton serves them (server/sam2/contract.py): sizes read from the
model specs, never assumed, and the shared-memory limits of the dynamic dimensions. The specs
are written by hand here; the CPU repository's own SAM 2 models are checked against the same
names in tests/unit/test_sam2_contract.py."""

from __future__ import annotations

from server.sam2 import contract as sam2
from server.sam2.contract import Sam2Contract
from server.triton.model_spec import ModelSpec, TensorSpec

S = 512  # not SAM 2.1's 1024: nothing may be hard-coded
F = S // 16


Shapes = dict[str, tuple[int, ...]]


def spec(name: str, inputs: Shapes, outputs: Shapes, **parameters: str) -> ModelSpec:
    return ModelSpec(
        name,
        "1",
        "python",
        0,
        tuple(TensorSpec(n, "FP32", shape) for n, shape in inputs.items()),
        tuple(TensorSpec(n, "FP32", shape) for n, shape in outputs.items()),
        dict(parameters),
    )


def specs(**attention_parameters: str) -> dict[str, ModelSpec]:
    return {
        sam2.IMAGE_ENCODER: spec(sam2.IMAGE_ENCODER, {"image": (1, S, S, 3)}, {"vision_feat": (1, 256, F, F)}),
        sam2.MASK_DECODER: spec(sam2.MASK_DECODER, {"image_embed": (1, 256, F, F)}, {"masks": (1, 4, S // 4, S // 4)}),
        sam2.MEMORY_ATTENTION: spec(
            sam2.MEMORY_ATTENTION,
            {"memory_feats": (-1, 64, F, F), "obj_ptrs": (-1, 256)},
            {"vision_feat": (1, 256, F, F)},
            **attention_parameters,
        ),
        sam2.MEMORY_ENCODER: spec(sam2.MEMORY_ENCODER, {"mask_logits": (1, 1, S, S)}, {"maskmem_feat": (1, 64, F, F)}),
    }


def test_sizes_come_from_the_specs() -> None:
    contract = Sam2Contract.from_specs(specs())
    assert (contract.image_size, contract.mask_size) == (S, S // 4)
    assert not contract.stand_in


def test_a_stand_in_part_makes_the_contract_a_stand_in() -> None:
    parts = specs()
    encoder = parts[sam2.IMAGE_ENCODER]
    parts[sam2.IMAGE_ENCODER] = spec(
        encoder.name, {"image": (1, S, S, 3)}, {"vision_feat": (1, 256, F, F)}, stand_in="true"
    )
    assert Sam2Contract.from_specs(parts).stand_in


def test_shared_memory_limits_follow_the_attention_config() -> None:
    contract = Sam2Contract.from_specs(specs(max_memories="5", max_object_pointers="12"))
    points = sam2.MAX_SHM_PROMPT_POINTS
    prompt = {"point_coords": (1, points, 2), "point_labels": (1, points)}
    assert contract.shm_max_shapes(sam2.MEMORY_ATTENTION) == {
        "memory_feats": (5, 64, F, F),
        "memory_tpos": (5,),
        "obj_ptrs": (12, 256),
        "obj_ptr_tdiff": (12,),
    }
    assert contract.shm_max_shapes(sam2.MASK_DECODER) == prompt
    # The step ensembles name the pointers input memory_obj_ptrs and take a prompt too.
    for step in (sam2.FRAME_STEP, sam2.TRACK_STEP):
        limits = contract.shm_max_shapes(step)
        assert limits["memory_obj_ptrs"] == (12, 256) and "obj_ptrs" not in limits
        assert limits["point_coords"] == prompt["point_coords"]
    assert contract.shm_max_shapes(sam2.IMAGE_ENCODER) == {}


def test_attention_limits_default_to_sam2s_own() -> None:
    # 7 memories (the prompt frame + 6 recent) and 16 object pointers when the config says nothing.
    limits = Sam2Contract.from_specs(specs()).shm_max_shapes(sam2.MEMORY_ATTENTION)
    assert limits["memory_feats"][0] == 7 and limits["obj_ptrs"][0] == 16
