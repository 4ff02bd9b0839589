"""The SAM 2 parts as Triton serves them: names and sizes read from the model specs.

Nothing here hard-codes 1024: the image size S comes from the encoder's input shape and every
grid size from the outputs (the model contract (README.md, "The model contract")).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from server.errors import ServiceError
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
# The per-object parts take a frame's objects as the rows of one call (one object per row), up to
# this many rows a call (and the model's max_batch_size): a frame with more objects makes several
# calls. It bounds a shared-memory slot: a sam2_track_step row at S = 1024 carries the frame's
# features again (16 MiB) besides the object's memories.
MAX_OBJECTS_PER_CALL = 4
PER_OBJECT_MODELS = (MASK_DECODER, MEMORY_ATTENTION, MEMORY_ENCODER, TRACK_STEP)

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
        unbatched = [name for name in (MEMORY_ATTENTION, MEMORY_ENCODER) if name in specs and specs[name].max_batch_size <= 0]
        if unbatched:
            # A repository written before the per-object parts took one object per batch row.
            raise ServiceError(
                f"the SAM 2 models {', '.join(unbatched)} in Triton's repository do not batch (max_batch_size 0): "
                "the repository predates this server's model contract; rebuild it with build_engines.py",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        return cls(image_size=size, mask_size=masks.shape[-1], specs=specs)

    def rows_per_call(self, model: str) -> int:
        """How many objects one call of ``model`` takes (1 for the encoder and the frame step)."""
        batch = self.specs[model].max_batch_size
        return min(MAX_OBJECTS_PER_CALL, batch) if model in PER_OBJECT_MODELS and batch > 0 else 1

    def shm_max_shapes(self, model: str) -> dict[str, tuple[int, ...]]:
        """The largest shape of each tensor, so shared-memory slots can be sized for them: a batch
        of ``rows_per_call`` rows for the per-object parts, the memory and pointer counts the
        attention's config declares (max_memories, max_object_pointers) and MAX_SHM_PROMPT_POINTS
        prompt points. A tensor with a dynamic dimension not listed here has no bound (gRPC)."""
        spec = self.specs[model]
        attention = self.specs[MEMORY_ATTENTION]
        memories = int(attention.parameters.get("max_memories", "7"))
        pointers = int(attention.parameters.get("max_object_pointers", "16"))
        limits = {
            "memory_feats": memories, "memory_tpos": memories, "obj_ptr_tdiff": pointers,
            "point_coords": MAX_SHM_PROMPT_POINTS, "point_labels": MAX_SHM_PROMPT_POINTS,
            # the attention's pointer input; the decoder's obj_ptrs output has no dynamic dims
            "obj_ptrs": pointers, "memory_obj_ptrs": pointers,
        }
        rows = self.rows_per_call(model)
        shapes = {}
        for tensor in (*spec.inputs, *spec.outputs):
            dims = list(tensor.shape)
            if spec.max_batch_size > 0:
                dims[0] = rows
            if any(d < 0 for d in dims) and tensor.name not in limits:
                continue
            shapes[tensor.name] = tuple(limits[tensor.name] if d < 0 else d for d in dims)
        return shapes

    @property
    def stand_in(self) -> bool:
        return any(spec.stand_in for spec in self.specs.values())
