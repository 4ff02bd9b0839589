"""SAM 2 STAND-IN contract models for the CPU model repository (no SAM 2 weights, no torch).

Four small deterministic ONNX graphs with the exact tensor names, ranks and dtypes of the real
SAM 2 parts (the model contract (README.md, "The model contract")), built with ``onnx.helper`` and seeded numpy constants. They
have no learned meaning; they are just meaningful enough for a tracker built on them to
propagate a mask with differing candidates. Every size follows from the model size S
(``image_size``): feature grid S/16, high-res grids S/4 and S/8, mask grid S/4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from engines.sam2_standin import image_encoder, mask_decoder, memory_attention, memory_encoder
from engines.sam2_standin._graph import NUM_CANDIDATES, check_image_size

SOURCE_FILES = tuple(sorted(Path(__file__).resolve().parent.glob("*.py")))


@dataclass(frozen=True)
class StandInPart:
    name: str
    max_batch_size: int  # 0: no Triton batching, the config dims are full shapes
    build: Callable[[int], onnx.ModelProto]
    extra_parameters: dict[str, str]


PARTS: tuple[StandInPart, ...] = (
    StandInPart(image_encoder.NAME, image_encoder.MAX_BATCH_SIZE, image_encoder.build, {}),
    StandInPart(
        mask_decoder.NAME, mask_decoder.MAX_BATCH_SIZE, mask_decoder.build, {"num_candidates": str(NUM_CANDIDATES)}
    ),
    StandInPart(
        memory_attention.NAME,
        memory_attention.MAX_BATCH_SIZE,
        memory_attention.build,
        {"max_memories": str(memory_attention.MAX_MEMORIES), "max_object_pointers": str(memory_attention.MAX_POINTERS)},
    ),
    StandInPart(memory_encoder.NAME, memory_encoder.MAX_BATCH_SIZE, memory_encoder.build, {}),
)

__all__ = ["PARTS", "SOURCE_FILES", "StandInPart", "build_all", "check_image_size"]


def build_all(image_size: int) -> dict[str, onnx.ModelProto]:
    """Every part for model size ``image_size``, checked by onnx.checker."""
    check_image_size(image_size)
    return {part.name: part.build(image_size) for part in PARTS}
