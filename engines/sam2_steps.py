"""Triton ensembles that chain the SAM 2 parts of one tracking step inside Triton.

A tracked frame runs encoder -> memory attention -> mask decoder before the orchestrator can
choose a candidate; each hop through the orchestrator costs a gRPC round trip (about 1 ms on
these machines), while Triton passes an ensemble's intermediate tensors from model to model
itself. So the orchestrator calls:

* ``sam2_frame_step`` (image + memories + prompt -> vision_feat + all candidates): a frame with
  one tracked object, in one round trip instead of three;
* ``sam2_track_step`` (vision_feat + high-res features + memories + prompt -> candidates): the
  objects of an already encoded frame, one per row of a batch (when the attention and the decoder
  batch: rows of one call share the memory and pointer counts), in one round trip instead of two
  per object.

The selection (SAMURAI) and the memory encoder stay separate: the orchestrator decides which
candidate becomes memory. The ensembles are pure configuration, generated from the parts'
own configs (tensor names, dtypes, dims), so the CPU and the GPU repositories get the same
contract. In ``sam2_frame_step`` the batching parts get their batch dimension pinned to 1 (one
frame, one object).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

IMAGE_ENCODER = "sam2_image_encoder"
MASK_DECODER = "sam2_mask_decoder"
MEMORY_ATTENTION = "sam2_memory_attention"
FRAME_STEP = "sam2_frame_step"
TRACK_STEP = "sam2_track_step"
STEP_MODELS = (FRAME_STEP, TRACK_STEP)

# Ensemble tensor name -> (part, the part's tensor). The attention's "obj_ptrs" input (memory
# pointers) is renamed: the decoder's "obj_ptrs" output keeps its name.
_MEMORY_INPUTS = {
    "memory_feats": "memory_feats",
    "memory_tpos": "memory_tpos",
    "memory_obj_ptrs": "obj_ptrs",
    "obj_ptr_tdiff": "obj_ptr_tdiff",
}
_DECODER_OUTPUTS = ("masks", "iou_scores", "obj_ptrs", "object_score_logits")


@dataclass(frozen=True)
class _Tensor:
    name: str
    data_type: int
    dims: tuple[int, ...]


def _full_shape(config: mc.ModelConfig, tensors: object) -> dict[str, _Tensor]:
    """The part's tensors with the batch dimension written out (pinned to 1) when it batches."""
    batch = (1,) if config.max_batch_size > 0 else ()
    return {t.name: _Tensor(t.name, t.data_type, batch + tuple(t.dims)) for t in tensors}  # type: ignore[attr-defined]


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def step_configs(parts: dict[str, mc.ModelConfig], parameters: dict[str, str] | None = None) -> dict[str, str]:
    """config.pbtxt text of both ensembles, from the parts' configs."""
    enc_in = _full_shape(parts[IMAGE_ENCODER], parts[IMAGE_ENCODER].input)
    enc_out = _full_shape(parts[IMAGE_ENCODER], parts[IMAGE_ENCODER].output)
    att_in = _full_shape(parts[MEMORY_ATTENTION], parts[MEMORY_ATTENTION].input)
    dec_in = _full_shape(parts[MASK_DECODER], parts[MASK_DECODER].input)
    dec_out = _full_shape(parts[MASK_DECODER], parts[MASK_DECODER].output)

    attention_step = _step(
        MEMORY_ATTENTION,
        {"vision_feat": "vision_feat", **{part: name for name, part in _MEMORY_INPUTS.items()}},
        {"conditioned_feat": "_conditioned_feat"},
    )
    decoder_step = _step(
        MASK_DECODER,
        {
            "image_embed": "_conditioned_feat",
            "high_res_feat0": "high_res_feat0",
            "high_res_feat1": "high_res_feat1",
            "point_coords": "point_coords",
            "point_labels": "point_labels",
        },
        {name: name for name in _DECODER_OUTPUTS},
    )
    encoder_step = _step(IMAGE_ENCODER, {"image": "image"}, {name: name for name in enc_out})

    def memory_inputs(attention: dict[str, _Tensor]) -> list[_Tensor]:
        return [_Tensor(name, attention[part].data_type, attention[part].dims) for name, part in _MEMORY_INPUTS.items()]

    frame = _ensemble(
        FRAME_STEP,
        max_batch_size=0,
        inputs=[enc_in["image"], *memory_inputs(att_in), dec_in["point_coords"], dec_in["point_labels"]],
        outputs=[enc_out["vision_feat"], *(dec_out[name] for name in _DECODER_OUTPUTS)],
        steps=[encoder_step, attention_step, decoder_step],
        parameters=parameters,
    )
    # The objects of a frame (and, through the parts' dynamic batchers, of other sessions) go through
    # attention and decoder as one batch, one object per row, when both parts batch.
    rows = min(parts[MEMORY_ATTENTION].max_batch_size, parts[MASK_DECODER].max_batch_size)
    if rows > 0:
        enc_out, att_in, dec_in, dec_out = (
            _row_shape(parts[IMAGE_ENCODER].output), _row_shape(parts[MEMORY_ATTENTION].input),
            _row_shape(parts[MASK_DECODER].input), _row_shape(parts[MASK_DECODER].output),
        )
    track = _ensemble(
        TRACK_STEP,
        max_batch_size=max(rows, 0),
        inputs=[enc_out["vision_feat"], enc_out["high_res_feat0"], enc_out["high_res_feat1"], *memory_inputs(att_in),
                dec_in["point_coords"], dec_in["point_labels"]],
        outputs=[dec_out[name] for name in _DECODER_OUTPUTS],
        steps=[attention_step, decoder_step],
        parameters=parameters,
    )
    return {FRAME_STEP: frame, TRACK_STEP: track}


def _row_shape(tensors: object) -> dict[str, _Tensor]:
    """The part's tensors as a batching ensemble declares them: one row, the batch left out."""
    return {t.name: _Tensor(t.name, t.data_type, tuple(t.dims)) for t in tensors}  # type: ignore[attr-defined]


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> mc.ModelEnsembling.Step:
    return mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=inputs, output_map=outputs)


def _ensemble(
    name: str,
    *,
    max_batch_size: int,
    inputs: list[_Tensor],
    outputs: list[_Tensor],
    steps: list[mc.ModelEnsembling.Step],
    parameters: dict[str, str] | None,
) -> str:
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    config.input.extend(mc.ModelInput(name=t.name, data_type=t.data_type, dims=t.dims) for t in inputs)  # type: ignore[arg-type]
    config.output.extend(mc.ModelOutput(name=t.name, data_type=t.data_type, dims=t.dims) for t in outputs)  # type: ignore[arg-type]
    config.ensemble_scheduling.step.extend(steps)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    header = (
        "# Generated by engines/sam2_steps.py from the SAM 2 parts' configs: one tracking step\n"
        "# chained inside Triton (see that module). Do not edit: regenerate.\n"
    )
    return header + text_format.MessageToString(config)
