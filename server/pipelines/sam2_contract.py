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

# Prompts of up to this many points go to the decoder through shared memory (more: over gRPC).
MAX_SHM_PROMPT_POINTS = 8

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

    def shm_max_shapes(self, model: str) -> dict[str, tuple[int, ...]]:
        """Limits of the dynamic dimensions, so shared-memory slots can be sized for them.

        Memory attention: the memory and pointer counts the model config declares
        (max_memories, max_object_pointers). Mask decoder: one object's prompt points."""
        if model == MEMORY_ATTENTION:
            spec = self.specs[model]
            memories = int(spec.parameters.get("max_memories", "7"))
            pointers = int(spec.parameters.get("max_object_pointers", "16"))
            memory_shape = spec.input("memory_feats").shape[1:]
            pointer_width = spec.input("obj_ptrs").shape[-1]
            return {
                "memory_feats": (memories, *memory_shape),
                "memory_tpos": (memories,),
                "obj_ptrs": (pointers, pointer_width),
                "obj_ptr_tdiff": (pointers,),
            }
        if model == MASK_DECODER:
            return {"point_coords": (1, MAX_SHM_PROMPT_POINTS, 2), "point_labels": (1, MAX_SHM_PROMPT_POINTS)}
        return {}

    @property
    def stand_in(self) -> bool:
        return any(spec.stand_in for spec in self.specs.values())
