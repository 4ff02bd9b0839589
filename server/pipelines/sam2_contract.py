"""The SAM 2 parts as Triton serves them: names and sizes read from the model specs.

Nothing here hard-codes 1024: the image size S comes from the encoder's input shape and every
grid size from the outputs (DESIGN.md 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.triton.model_spec import ModelSpec

IMAGE_ENCODER = "sam2_image_encoder"
MASK_DECODER = "sam2_mask_decoder"
MEMORY_ATTENTION = "sam2_memory_attention"
MEMORY_ENCODER = "sam2_memory_encoder"
MODELS = (IMAGE_ENCODER, MASK_DECODER, MEMORY_ATTENTION, MEMORY_ENCODER)

# Point labels of the prompt encoder.
POSITIVE, NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PADDING = 1, 0, 2, 3, -1


@dataclass(frozen=True)
class Sam2Contract:
    image_size: int  # S: frames are resized to S x S
    mask_size: int  # low-res mask grid (S/4)
    specs: dict[str, ModelSpec]

    @classmethod
    def from_specs(cls, specs: dict[str, ModelSpec]) -> Sam2Contract:
        encoder = specs[IMAGE_ENCODER]
        image = encoder.input("image")
        size = image.shape[-2]  # [B, S, S, 3]
        masks = specs[MASK_DECODER].output("masks")
        return cls(image_size=size, mask_size=masks.shape[-1], specs=specs)

    @property
    def stand_in(self) -> bool:
        return any(spec.stand_in for spec in self.specs.values())
