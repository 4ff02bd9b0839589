"""The SAM 2 parts as Triton serves them: names and sizes read from the model specs.

Nothing here hard-codes 1024: the image size S comes from the encoder's input shape and every
grid size from the outputs (the model contract (README.md, "The model contract")).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.triton.model_spec import ModelSpec

IMAGE_ENCODER = "sam2_image_encoder"
MASK_DECODER = "sam2_mask_decoder"
MEMORY_ATTENTION = "sam2_memory_attention"
MEMORY_ENCODER = "sam2_memory_encoder"
MODELS = (IMAGE_ENCODER, MASK_DECODER, MEMORY_ATTENTION, MEMORY_ENCODER)
# Triton ensembles chaining the parts of a step (engines/sam2_steps.py): encoder -> attention ->
# decoder for a frame with one tracked object, attention -> decoder for one more object.
FRAME_STEP = "sam2_frame_step"
TRACK_STEP = "sam2_track_step"
TRACKING_MODELS = (*MODELS, FRAME_STEP, TRACK_STEP)

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
        """Limits of the dynamic dimensions, so shared-memory slots can be sized for them: the
        memory and pointer counts the attention's config declares (max_memories,
        max_object_pointers) and one object's prompt points."""
        prompt = {"point_coords": (1, MAX_SHM_PROMPT_POINTS, 2), "point_labels": (1, MAX_SHM_PROMPT_POINTS)}
        if model == MEMORY_ATTENTION:
            return self._memory_limits("obj_ptrs")
        if model == MASK_DECODER:
            return prompt
        if model in (FRAME_STEP, TRACK_STEP):
            return {**self._memory_limits("memory_obj_ptrs"), **prompt}
        return {}

    def _memory_limits(self, pointers_input: str) -> dict[str, tuple[int, ...]]:
        spec = self.specs[MEMORY_ATTENTION]
        memories = int(spec.parameters.get("max_memories", "7"))
        pointers = int(spec.parameters.get("max_object_pointers", "16"))
        return {
            "memory_feats": (memories, *spec.input("memory_feats").shape[1:]),
            "memory_tpos": (memories,),
            pointers_input: (pointers, spec.input("obj_ptrs").shape[-1]),
            "obj_ptr_tdiff": (pointers,),
        }

    @property
    def stand_in(self) -> bool:
        return any(spec.stand_in for spec in self.specs.values())
