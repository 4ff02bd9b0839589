"""Export SAM 2.1 (the SAMURAI fork, module ``sam2``) as the four Framewise SAM 2 parts.

    .venv-export/bin/python -m engines.export.sam2_parts --output DIR [--size tiny] \
        (--checkpoint sam2.1_hiera_tiny.pt | --random-init [--seed 0]) [--image-size S]

writes ``DIR/sam2_image_encoder.onnx``, ``sam2_mask_decoder.onnx``, ``sam2_memory_attention.onnx``,
``sam2_memory_encoder.onnx`` and ``DIR/sam2_export.json`` (model size, weights, per-part check
errors, sha256 of every file). ``build_engines.py --target cpu --sam2-onnx-dir DIR`` serves them
in place of the stand-ins. ``build_engines.py --target onnx --models sam2`` calls ``export_parts``.

The model size S (``--image-size``, ``build_engines.py --sam2-image-size``; 1024 in every SAM 2.1
config) may be any multiple of 32 for the hiera sizes of SAM 2.1: Hiera cuts the image into S/4 x
S/4 patches and tiles its first stage's 8 x 8 windows over them (``trunk.window_spec[0]``), so S/4
must be a multiple of 8. The learned weights do not depend on S (the position embedding is
interpolated), so a checkpoint exports at any such S.

The contract is the model contract (README.md, "The model contract"), identical to the CPU stand-ins
(engines/sam2_standin): same tensor names, ranks and dtypes, so the orchestrator cannot tell them
apart. What each graph holds, following sam2/modeling/sam2_base.py of the reference (H = W = S/16):

- ``sam2_image_encoder``: ``image`` UINT8 [B,S,S,3] RGB -> /255, ImageNet mean/std (inside the
  graph, as sam2.utils.misc.load_video_frames does it) -> Hiera + FPN neck (``forward_image``,
  including the decoder's conv_s0 / conv_s1 on the two high-resolution levels).
  ``vision_feat`` is the S/16 level PLUS ``no_mem_embed``: exactly the ``image_embed`` SAM 2 feeds
  the decoder on a frame without memory (``directly_add_no_mem_embed``, and SAM2ImagePredictor),
  so the orchestrator decodes a prompt frame straight from it. The two graphs that need the raw
  backbone feature (memory attention, memory encoder) subtract ``no_mem_embed`` again.
- ``sam2_mask_decoder``: prompt encoder (a padding point (0, 0, -1) is appended, as
  ``PromptEncoder._embed_points(pad=True)`` does when no box tensor is given: SAM 2 passes boxes as
  labels 2/3) + mask decoder + object-pointer head, ALL candidates: index 0 the single-mask output
  after ``_dynamic_multimask_via_stability`` (what SAM 2 returns for multimask_output=False, e.g.
  a box), 1..3 the multimask outputs; ``obj_ptrs`` per candidate (token 0 for candidate 0, tokens
  1..3 with use_multimask_token_for_obj_ptr) through ``obj_ptr_proj`` and the no-object mixing of
  ``_forward_sam_heads`` (object present iff score logit > ``min_obj_score_logits``). Masks are NOT
  blanked for an absent object: the orchestrator does that (server/sam2/samurai/selection.py), as it
  does the SAMURAI choice among the candidates.
- ``sam2_memory_attention`` (batching: dim 0 is the batch B, one row per tracked object; the rows
  of one call share N and M; row b of the output is the single-object computation on row b):
  ``vision_feat`` [B,256,H,W], ``memory_feats`` [B,N,64,H,W], ``memory_tpos`` INT32 [B,N],
  ``obj_ptrs`` [B,M,256], ``obj_ptr_tdiff`` INT32 [B,M] -> ``conditioned_feat`` [B,256,H,W].
  ``_prepare_memory_conditioned_features`` after the frame selection:
  memories (N 1..7, FP16) with the memory encoder's sine position encoding plus
  ``maskmem_tpos_enc[memory_tpos]`` (memory_tpos = the table row, num_maskmem - 1 - t_pos, from the
  orchestrator); object pointers (M 1..16) split into 4 tokens of 64, with the sine encoding
  of ``obj_ptr_tdiff / (max_obj_ptrs_in_encoder - 1)`` through ``obj_ptr_tpos_proj``; the current
  frame's sine position encoding; then the MemoryAttention layers. RoPE is re-implemented with real
  arithmetic (ONNX has no complex numbers): the same rotation as ``apply_rotary_enc``, keys of each
  memory rotated like the query grid, pointer tokens not rotated.
- ``sam2_memory_encoder`` (batching, row-wise like the memory attention): ``vision_feat``
  [B,256,H,W], ``mask_logits`` [B,1,S/4,S/4], ``object_score_logits`` [B,1] -> ``maskmem_feat``
  FP16 [B,64,H,W]. ``_encode_new_memory``: the S/4 logits are upsampled to S x S inside
  (bilinear, align_corners=False, like ``_forward_sam_heads``), sigmoid, * sigmoid_scale_for_mem_enc
  + sigmoid_bias_for_mem_enc, MemoryEncoder, then ``no_obj_embed_spatial`` where the object score
  logit is <= 0 (per row). Output FP16. (The reference video predictor binarises the mask of a prompt frame,
  ``binarize_mask_from_pts_for_mem_enc``: the orchestrator sends a prompt frame's logits scaled by
  a large factor, which saturates this sigmoid into exactly that binary mask.)

torch and sam2 are imported inside the functions: this module costs onnx + numpy to import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.export.checks import CompareReport, check_model, compare
from engines.hashing import sha256_file

OPSET = 17
NO_OBJ_SCORE = -1024.0
PART_NAMES = ("sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder")
METADATA_FILE = "sam2_export.json"
# Model sizes: our name -> suffix of the package's configs/samurai/sam2.1_hiera_<suffix>.yaml.
SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
SIZE_ALIASES = {"t": "tiny", "s": "small", "b+": "base_plus", "base+": "base_plus", "bplus": "base_plus", "l": "large"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Tolerances of the ONNX Runtime vs PyTorch check on random inputs: |ort - torch| <= ATOL + RTOL*|torch|.
# fp32 throughout; the encoder runs 12 transformer blocks over 65k tokens, so its sums are long.
TOLERANCES = {
    "sam2_image_encoder": (1e-3, 1e-3),
    "sam2_mask_decoder": (1e-3, 1e-3),
    "sam2_memory_attention": (1e-3, 1e-3),
    # FP16 output: one FP16 rounding step (2^-11 relative) may land differently.
    "sam2_memory_encoder": (2e-3, 2e-3),
}


def canonical_size(size: str) -> str:
    size = SIZE_ALIASES.get(size.lower(), size.lower())
    if size not in SIZES:
        raise ValueError(f"unknown SAM 2.1 size {size!r}; expected one of {sorted(SIZES)}")
    return size


def config_name(size: str) -> str:
    """The SAMURAI config of the installed package (kf_score_weight etc. come with it)."""
    return f"configs/samurai/sam2.1_hiera_{SIZES[canonical_size(size)]}.yaml"


def build_predictor(size: str = "tiny", checkpoint: Path | None = None, seed: int = 0, device: str = "cpu", *,
                    config: str | None = None, image_size: int | None = None):
    """The reference SAM2VideoPredictor (samurai_mode on) of the installed ``sam2`` package, built
    with ``build_sam2_video_predictor`` and its default post-processing overrides.

    ``config``: a config of the package (default: configs/samurai/sam2.1_hiera_<size>.yaml).
    ``image_size``: overrides the config's model size S (1024 for every SAM 2.1 config).
    No checkpoint: the architecture with seeded random weights (``torch.manual_seed(seed)`` right
    before the modules are built, so the same seed gives the same weights)."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
    if checkpoint is None:
        torch.manual_seed(seed)
    with _quiet():
        model = build_sam2_video_predictor(config or config_name(size), ckpt_path=str(checkpoint) if checkpoint else None,
                                           device=device, mode="eval", hydra_overrides_extra=overrides)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The four parts as torch modules around the reference model's own submodules.
# ---------------------------------------------------------------------------------------------


def _torch_modules():
    """Defined lazily so that importing this file needs no torch."""
    import torch
    import torch.nn.functional as F
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, image):  # uint8 [B,S,S,3]
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            x = (x - self.mean) / self.std
            fpn = self.model.forward_image(x)["backbone_fpn"]
            no_mem = self.model.no_mem_embed.view(1, -1, 1, 1)
            return fpn[-1] + no_mem, fpn[0], fpn[1]

    class MaskDecoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.register_buffer("image_pe", model.sam_prompt_encoder.get_dense_pe().detach().clone())
            self.present_threshold = float(getattr(model, "min_obj_score_logits", 0.0))

        def embed_points(self, coords, labels):
            pe_layer = self.model.sam_prompt_encoder
            b = coords.shape[0]
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)  # the padding point
            labels = torch.cat([labels, torch.full_like(labels[:, :1], -1)], dim=1)
            h, w = pe_layer.input_image_size
            xy = coords + 0.5  # pixel centres
            xy = torch.stack([xy[..., 0] / w, xy[..., 1] / h], dim=-1)
            pe = pe_layer.pe_layer._pe_encoding(xy)  # [B,P+1,C]
            lab = labels.unsqueeze(-1)
            emb = torch.where(lab == -1, torch.zeros_like(pe) + pe_layer.not_a_point_embed.weight, pe)
            for i in range(pe_layer.num_point_embeddings):
                emb = torch.where(lab == i, pe + pe_layer.point_embeddings[i].weight, emb)
            del b
            return emb

        def forward(self, image_embed, high_res_feat0, high_res_feat1, point_coords, point_labels):
            model = self.model
            decoder = model.sam_mask_decoder
            sparse = self.embed_points(point_coords, point_labels)
            b, _, h, w = image_embed.shape
            dense = model.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
            masks, ious, tokens, score = decoder.predict_masks(
                image_embeddings=image_embed, image_pe=self.image_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, repeat_image=False, high_res_features=[high_res_feat0, high_res_feat1])
            if decoder.dynamic_multimask_via_stability:
                single_mask, single_iou = decoder._dynamic_multimask_via_stability(masks, ious)
            else:
                single_mask, single_iou = masks[:, 0:1], ious[:, 0:1]
            all_masks = torch.cat([single_mask, masks[:, 1:]], dim=1)
            all_ious = torch.cat([single_iou, ious[:, 1:]], dim=1)
            if not (decoder.use_multimask_token_for_obj_ptr):
                tokens = tokens[:, 0:1].expand(-1, tokens.shape[1], -1)
            ptrs = model.obj_ptr_proj(tokens)  # [B,4,C]
            if model.pred_obj_scores:
                present = (score > self.present_threshold).to(ptrs.dtype).unsqueeze(1)  # [B,1,1]
                if model.soft_no_obj_ptr:
                    present = score.sigmoid().unsqueeze(1)
                if model.fixed_no_obj_ptr:
                    ptrs = present * ptrs
                ptrs = ptrs + (1 - present) * model.no_obj_ptr
            return all_masks, all_ious, ptrs, score

    class MemoryAttention(torch.nn.Module):
        """``_prepare_memory_conditioned_features`` once the frames are chosen, + MemoryAttention."""

        def __init__(self, model, feat_size: int):
            super().__init__()
            self.model = model
            attention = model.memory_attention
            self.hw = feat_size * feat_size
            c = model.hidden_dim
            self.split = c // model.mem_dim if model.mem_dim < c else 1
            self.t_diff_max = float(model.max_obj_ptrs_in_encoder - 1)
            dummy = torch.zeros(1, c, feat_size, feat_size)
            curr_pos = model.image_encoder.neck.position_encoding(dummy)  # the S/16 level's sine PE
            self.register_buffer("curr_pos", curr_pos.flatten(2).permute(0, 2, 1).contiguous())  # [1,HW,C]
            mem_pos = model.memory_encoder.position_encoding(torch.zeros(1, model.mem_dim, feat_size, feat_size))
            self.register_buffer("mem_pos", mem_pos.flatten(2).permute(0, 2, 1)[0].contiguous())  # [HW,64]
            for i, layer in enumerate(attention.layers):
                for kind, attn in (("self", layer.self_attn), ("cross", layer.cross_attn_image)):
                    if hasattr(attn, "compute_cis"):
                        cis = attn.compute_cis(end_x=feat_size, end_y=feat_size)  # [HW, d/2] complex
                        self.register_buffer(f"cos_{kind}_{i}", cis.real.float().contiguous())
                        self.register_buffer(f"sin_{kind}_{i}", cis.imag.float().contiguous())

        @staticmethod
        def rotate(x, cos, sin):
            """apply_rotary_enc with real numbers: x [..., L, d] with L a multiple of cos's rows."""
            shape = x.shape
            pairs = x.reshape(*shape[:-2], -1, cos.shape[0], shape[-1] // 2, 2)
            re, im = pairs[..., 0], pairs[..., 1]
            out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
            return out.reshape(shape)

        def attend(self, attn, q, k, v, rope, num_k_rope):
            q = attn._separate_heads(attn.q_proj(q), attn.num_heads)
            k = attn._separate_heads(attn.k_proj(k), attn.num_heads)
            v = attn._separate_heads(attn.v_proj(v), attn.num_heads)
            if rope is not None:
                cos, sin = rope
                q = self.rotate(q, cos, sin)
                if num_k_rope is None:
                    k = self.rotate(k, cos, sin)
                else:
                    k = torch.cat([self.rotate(k[:, :, :num_k_rope], cos, sin), k[:, :, num_k_rope:]], dim=2)
            scale = 1.0 / math.sqrt(q.shape[-1])
            weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
            out = attn._recombine_heads(torch.matmul(weights, v))
            return attn.out_proj(out)

        def forward(self, vision_feat, memory_feats, memory_tpos, obj_ptrs, obj_ptr_tdiff):
            """One row per tracked object: vision_feat [B,C,H,W], memory_feats [B,N,64,H,W],
            memory_tpos [B,N], obj_ptrs [B,M,C], obj_ptr_tdiff [B,M] -> [B,C,H,W]. Every shape is
            taken from the inputs (never a literal 1), so the traced graph keeps B, N and M dynamic."""
            model = self.model
            attention = model.memory_attention
            curr = (vision_feat - model.no_mem_embed.view(1, -1, 1, 1)).flatten(2).transpose(1, 2)  # [B,HW,C]
            memory, memory_pos, num_k_rope = self.memory_tokens(memory_feats, memory_tpos, obj_ptrs, obj_ptr_tdiff)

            output = curr
            query_pos = self.curr_pos  # [1,HW,C]: the same grid for every row, broadcast
            if attention.pos_enc_at_input:
                output = output + 0.1 * query_pos
            for i, layer in enumerate(attention.layers):
                rope_sa = self._rope("self", i)
                rope_ca = self._rope("cross", i)
                tgt2 = layer.norm1(output)
                qk = tgt2 + query_pos if layer.pos_enc_at_attn else tgt2
                output = output + self.attend(layer.self_attn, qk, qk, tgt2, rope_sa, None)
                tgt2 = layer.norm2(output)
                q = tgt2 + query_pos if layer.pos_enc_at_cross_attn_queries else tgt2
                k = memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory
                output = output + self.attend(layer.cross_attn_image, q, k, memory, rope_ca, num_k_rope)
                tgt2 = layer.norm3(output)
                output = output + layer.linear2(layer.activation(layer.linear1(tgt2)))
            output = attention.norm(output)
            return output.transpose(1, 2).reshape(vision_feat.shape)

        def memory_tokens(self, memory_feats, memory_tpos, obj_ptrs, obj_ptr_tdiff):
            """The cross-attention keys of each row, memories first (N*HW tokens, rotated by RoPE)
            then pointer tokens (M*split, not rotated): [B,Lk,64] tokens, [B,Lk,64] positions, and
            N*HW, the count of rotated keys."""
            model = self.model
            mem_dim = model.mem_dim
            # memories: [B,N,64,H,W] -> [B,N*HW,64], memory-major as the reference concatenates them
            mem = memory_feats.to(torch.float32).flatten(3).transpose(2, 3).flatten(1, 2)
            # position: the grid's sine encoding + the memory's temporal row; maskmem_tpos_enc is
            # [num_maskmem,1,1,64], so indexing with [B,N] gives [B,N,1,1,64]
            tpos = model.maskmem_tpos_enc[memory_tpos.to(torch.int64)].flatten(2, 3)  # [B,N,1,64]
            mem_pos = (self.mem_pos.view(1, 1, self.hw, mem_dim) + tpos).flatten(1, 2)  # [B,N*HW,64]
            num_k_rope = mem.shape[1]
            # object pointers: temporal sine encoding of the signed distance, through obj_ptr_tpos_proj
            pos = get_1d_sine_pe(obj_ptr_tdiff.to(torch.float32) / self.t_diff_max, dim=model.hidden_dim)
            pos = model.obj_ptr_tpos_proj(pos)  # [B,M,64]
            if self.split > 1:
                # a 256-wide pointer is `split` consecutive 64-wide tokens sharing its position
                ptr_tokens = obj_ptrs.reshape(obj_ptrs.shape[0], -1, mem_dim)  # [B,M*split,64]
                pos = pos.unsqueeze(2).expand(-1, -1, self.split, -1).flatten(1, 2)
            else:
                ptr_tokens = obj_ptrs
            memory = torch.cat([mem, ptr_tokens], dim=1)
            memory_pos = torch.cat([mem_pos, pos], dim=1)
            return memory, memory_pos, num_k_rope

        def _rope(self, kind, i):
            cos = getattr(self, f"cos_{kind}_{i}", None)
            return None if cos is None else (cos, getattr(self, f"sin_{kind}_{i}"))

    class MemoryEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, vision_feat, mask_logits, object_score_logits):
            """One row per tracked object: vision_feat [B,C,H,W], mask_logits [B,1,S/4,S/4],
            object_score_logits [B,1] -> FP16 [B,64,H,W] (each op works on rows independently)."""
            model = self.model
            size = model.image_size
            pix = vision_feat - model.no_mem_embed.view(1, -1, 1, 1)
            high = F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False)
            mask = torch.sigmoid(high)
            if model.sigmoid_scale_for_mem_enc != 1.0:
                mask = mask * model.sigmoid_scale_for_mem_enc
            if model.sigmoid_bias_for_mem_enc != 0.0:
                mask = mask + model.sigmoid_bias_for_mem_enc
            feats = model.memory_encoder(pix, mask, skip_mask_sigmoid=True)["vision_features"]
            if model.no_obj_embed_spatial is not None:
                absent = 1.0 - (object_score_logits > 0).to(feats.dtype)  # [B,1]: per row
                feats = feats + absent[..., None, None] * model.no_obj_embed_spatial[..., None, None]
            return feats.to(torch.float16)

    return ImageEncoder, MaskDecoder, MemoryAttention, MemoryEncoder


# ---------------------------------------------------------------------------------------------
# Reference computations with the unmodified SAM 2 code paths (for the checks).
# ---------------------------------------------------------------------------------------------


def reference_memory_attention(model, vision_feat, memory_feats, memory_tpos, obj_ptrs, obj_ptr_tdiff):
    """What sam2_base._prepare_memory_conditioned_features assembles, then model.memory_attention
    (complex RoPE) itself. Arrays in, tensor out."""
    import torch
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    vision = torch.as_tensor(vision_feat)
    _, c, h, w = vision.shape
    raw = vision - model.no_mem_embed.view(1, -1, 1, 1)
    curr = raw.flatten(2).permute(2, 0, 1)  # [HW,1,C]
    curr_pos = model.image_encoder.neck.position_encoding(raw).flatten(2).permute(2, 0, 1)
    mems, mem_pos = [], []
    pos_enc = model.memory_encoder.position_encoding(torch.zeros(1, model.mem_dim, h, w))
    for feats, row in zip(torch.as_tensor(memory_feats), np.asarray(memory_tpos).tolist()):
        mems.append(feats[None].float().flatten(2).permute(2, 0, 1))
        mem_pos.append(pos_enc.flatten(2).permute(2, 0, 1) + model.maskmem_tpos_enc[row])
    ptrs = torch.as_tensor(obj_ptrs)[:, None, :]  # [M,1,C]
    t_diff_max = model.max_obj_ptrs_in_encoder - 1
    obj_pos = get_1d_sine_pe(torch.tensor(np.asarray(obj_ptr_tdiff).tolist()) / t_diff_max, dim=c)
    obj_pos = model.obj_ptr_tpos_proj(obj_pos).unsqueeze(1)
    if model.mem_dim < c:
        ptrs = ptrs.reshape(-1, 1, c // model.mem_dim, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        obj_pos = obj_pos.repeat_interleave(c // model.mem_dim, dim=0)
    memory = torch.cat([*mems, ptrs], dim=0)
    memory_pos = torch.cat([*mem_pos, obj_pos], dim=0)
    out = model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                 num_obj_ptr_tokens=ptrs.shape[0])
    return out.permute(1, 2, 0).view(1, c, h, w)


def reference_memory_encoder(model, vision_feat, mask_logits, object_score_logits, *, binarize: bool = False):
    """sam2_base._encode_new_memory on the upsampled logits (as _forward_sam_heads upsamples them)."""
    import torch
    import torch.nn.functional as F

    vision = torch.as_tensor(vision_feat)
    _, _c, h, w = vision.shape
    raw = vision - model.no_mem_embed.view(1, -1, 1, 1)
    high = F.interpolate(torch.as_tensor(mask_logits), size=(model.image_size, model.image_size),
                         mode="bilinear", align_corners=False)
    saved = model.binarize_mask_from_pts_for_mem_enc
    model.binarize_mask_from_pts_for_mem_enc = binarize
    try:
        feats, _ = model._encode_new_memory(current_vision_feats=[raw.flatten(2).permute(2, 0, 1)],
                                            feat_sizes=[(h, w)], pred_masks_high_res=high,
                                            object_score_logits=torch.as_tensor(object_score_logits),
                                            is_mask_from_pts=binarize)
    finally:
        model.binarize_mask_from_pts_for_mem_enc = saved
    return feats


def reference_mask_decoder(model, image_embed, high_res_feat0, high_res_feat1, point_coords, point_labels):
    """Prompt encoder + MaskDecoder.forward (multimask True and False) + obj_ptr head, as in
    _forward_sam_heads (without its SAMURAI state)."""
    import torch

    coords, labels = torch.as_tensor(point_coords), torch.as_tensor(point_labels)
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    args = {"image_embeddings": torch.as_tensor(image_embed), "image_pe": model.sam_prompt_encoder.get_dense_pe(),
                "sparse_prompt_embeddings": sparse, "dense_prompt_embeddings": dense, "repeat_image": False,
                "high_res_features": [torch.as_tensor(high_res_feat0), torch.as_tensor(high_res_feat1)]}
    multi, multi_iou, multi_tok, score = model.sam_mask_decoder(multimask_output=True, **args)
    single, single_iou, single_tok, _ = model.sam_mask_decoder(multimask_output=False, **args)
    masks = torch.cat([single, multi], dim=1)
    ious = torch.cat([single_iou, multi_iou], dim=1)
    tokens = torch.cat([single_tok, multi_tok], dim=1)
    ptrs = model.obj_ptr_proj(tokens)
    present = (score > getattr(model, "min_obj_score_logits", 0.0)).float().unsqueeze(1)
    if model.fixed_no_obj_ptr:
        ptrs = present * ptrs
    ptrs = ptrs + (1 - present) * model.no_obj_ptr
    return masks, ious, ptrs, score


def reference_image_encoder(model, image):
    import torch

    x = torch.as_tensor(np.asarray(image)).permute(0, 3, 1, 2).to(torch.float64) / 255.0
    x = x.to(torch.float32)  # as load_video_frames: float64 / 255 into a float32 tensor
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    fpn = model.forward_image((x - mean) / std)["backbone_fpn"]
    return fpn[-1] + model.no_mem_embed.view(1, -1, 1, 1), fpn[0], fpn[1]


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@dataclass
class PartExport:
    name: str
    path: Path
    report: CompareReport | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.path.name, "sha256": sha256_file(self.path),
                "check": None if self.report is None else self.report.to_dict()}


def export_model(model, output: Path, *, source: str, parts: tuple[str, ...] = PART_NAMES, check: bool = True,
                 seed: int = 0, opset: int = OPSET, log=print) -> dict[str, PartExport]:
    """Export the parts of ``model`` (a SAM2VideoPredictor / SAM2Base in eval mode) into ``output``
    and check each (onnx.checker + ONNX Runtime vs the reference PyTorch code path on random
    inputs). Returns the parts by name; writes ``output/sam2_export.json``."""
    import torch

    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"unknown SAM 2 parts {sorted(unknown)}; expected some of {PART_NAMES}")
    check_image_size(model)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ImageEncoder, MaskDecoder, MemoryAttention, MemoryEncoder = _torch_modules()
    s = int(model.image_size)
    f = s // int(model.backbone_stride)
    c, mem_dim = int(model.hidden_dim), int(model.mem_dim)
    max_memories, max_pointers = int(model.num_maskmem), int(model.max_obj_ptrs_in_encoder)
    gen = torch.Generator().manual_seed(seed)
    results: dict[str, PartExport] = {}

    def export(name, module, args, inputs, outputs, dynamic_axes, output_dims=None):
        """torch.onnx (TorchScript exporter, opset ``opset``), then the declared output dims of the
        contract (the exporter leaves some symbolic), metadata, onnx.checker."""
        path = output / f"{name}.onnx"
        module.eval()
        with warnings.catch_warnings(), torch.no_grad(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        graph = onnx.load(str(path))
        if output_dims:
            from engines.export.common import set_dims

            graph = set_dims(graph, output_dims)
        graph.doc_string = f"Framewise {name}: SAM 2.1 {source}, model size S={s} (engines/export/sam2_parts.py)"
        for key, value in (("framewise_part", name), ("image_size", str(s)), ("source", source)):
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(path))
        check_model(path)
        return path

    # --- image encoder --------------------------------------------------------------------
    if "sam2_image_encoder" in parts:
        _export_image_encoder(model, ImageEncoder, export, results, s, c, gen, check, seed, log)
    if "sam2_mask_decoder" in parts:
        _export_mask_decoder(model, MaskDecoder, export, results, s, f, c, gen, check, seed, log)
    if "sam2_memory_attention" in parts:
        _export_memory_attention(model, MemoryAttention, export, results, f, c, mem_dim, max_memories, max_pointers,
                                 gen, check, seed, log)
    if "sam2_memory_encoder" in parts:
        _export_memory_encoder(model, MemoryEncoder, export, results, s, f, c, gen, check, seed, log)
    _write_metadata(output, results, source=source, image_size=s, opset=opset, num_maskmem=max_memories,
                    max_obj_ptrs=max_pointers)
    return results


def _export_image_encoder(model, ImageEncoder, export, results, s, c, gen, check, seed, log):
    import torch

    trunk = model.image_encoder.trunk
    pos_embed = trunk._get_pos_embed((s // 4, s // 4)).detach().clone()  # bicubic: a constant
    trunk._get_pos_embed = lambda hw: pos_embed
    try:
        enc = ImageEncoder(model)
        image = torch.randint(0, 256, (1, s, s, 3), dtype=torch.uint8, generator=gen)
        path = export("sam2_image_encoder", enc, (image,), ["image"],
                      ["vision_feat", "high_res_feat0", "high_res_feat1"],
                      {"image": {0: "batch"}, "vision_feat": {0: "batch"}, "high_res_feat0": {0: "batch"},
                       "high_res_feat1": {0: "batch"}},
                      {"vision_feat": ["batch", c, s // 16, s // 16], "high_res_feat0": ["batch", c // 8, s // 4, s // 4],
                       "high_res_feat1": ["batch", c // 4, s // 8, s // 8]})
    finally:
        del trunk._get_pos_embed
    report = None
    if check:
        rng = np.random.default_rng(seed)
        frames = rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8)
        report = _check("sam2_image_encoder", lambda x: reference_image_encoder(model, x), path, {"image": frames})
        log(str(report))
    results["sam2_image_encoder"] = PartExport("sam2_image_encoder", path, report)


def _export_mask_decoder(model, MaskDecoder, export, results, s, f, c, gen, check, seed, log):
    import torch

    dec = MaskDecoder(model)
    embed = torch.randn(1, c, f, f, generator=gen)
    hr0 = torch.randn(1, c // 8, s // 4, s // 4, generator=gen)
    hr1 = torch.randn(1, c // 4, s // 8, s // 8, generator=gen)
    coords = torch.tensor([[[10.0, 20.0], [s / 2, s / 3]]])
    labels = torch.tensor([[2, 3]], dtype=torch.int32)
    path = export("sam2_mask_decoder", dec, (embed, hr0, hr1, coords, labels),
                  ["image_embed", "high_res_feat0", "high_res_feat1", "point_coords", "point_labels"],
                  ["masks", "iou_scores", "obj_ptrs", "object_score_logits"],
                  {"image_embed": {0: "batch"}, "high_res_feat0": {0: "batch"}, "high_res_feat1": {0: "batch"},
                   "point_coords": {0: "batch", 1: "points"}, "point_labels": {0: "batch", 1: "points"},
                   "masks": {0: "batch"}, "iou_scores": {0: "batch"}, "obj_ptrs": {0: "batch"},
                   "object_score_logits": {0: "batch"}},
                  {"masks": ["batch", 4, s // 4, s // 4], "iou_scores": ["batch", 4], "obj_ptrs": ["batch", 4, c],
                   "object_score_logits": ["batch", 1]})
    report = None
    if check:
        rng = np.random.default_rng(seed + 1)
        inputs = {
            "image_embed": rng.standard_normal((3, c, f, f)).astype(np.float32),
            "high_res_feat0": rng.standard_normal((3, c // 8, s // 4, s // 4)).astype(np.float32),
            "high_res_feat1": rng.standard_normal((3, c // 4, s // 8, s // 8)).astype(np.float32),
            # a box; a positive + a negative click; no prompt at all (a tracked frame)
            "point_coords": np.array([[[0.1 * s, 0.2 * s], [0.6 * s, 0.7 * s]],
                                      [[0.5 * s, 0.5 * s], [0.2 * s, 0.8 * s]],
                                      [[0.0, 0.0], [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[2, 3], [1, 0], [-1, -1]], np.int32),
        }
        report = _check("sam2_mask_decoder", lambda *a: reference_mask_decoder(model, *a), path, inputs)
        log(str(report))
    results["sam2_mask_decoder"] = PartExport("sam2_mask_decoder", path, report)


def _export_memory_attention(model, MemoryAttention, export, results, f, c, mem_dim, max_memories, max_pointers,
                             gen, check, seed, log):
    import torch

    att = MemoryAttention(model, f)
    # Traced with 2 rows, 2 memories and 3 pointers: no traced dim is 1, so the tracer cannot take
    # a broadcast or a squeeze for the shape of every call.
    vision = torch.randn(2, c, f, f, generator=gen)
    mems = torch.randn(2, 2, mem_dim, f, f, generator=gen).to(torch.float16)
    tpos = torch.tensor([[max_memories - 1, 0], [max_memories - 1, 1]], dtype=torch.int32)
    ptrs = torch.randn(2, 3, c, generator=gen)
    tdiff = torch.tensor([[5, 1, 2], [3, 1, 2]], dtype=torch.int32)
    path = export("sam2_memory_attention", att, (vision, mems, tpos, ptrs, tdiff),
                  ["vision_feat", "memory_feats", "memory_tpos", "obj_ptrs", "obj_ptr_tdiff"], ["conditioned_feat"],
                  {"vision_feat": {0: "batch"}, "memory_feats": {0: "batch", 1: "memories"},
                   "memory_tpos": {0: "batch", 1: "memories"}, "obj_ptrs": {0: "batch", 1: "pointers"},
                   "obj_ptr_tdiff": {0: "batch", 1: "pointers"}, "conditioned_feat": {0: "batch"}},
                  {"conditioned_feat": ["batch", c, f, f]})
    report = None
    if check:
        report = _check("sam2_memory_attention", lambda *a: reference_memory_attention_rows(model, *a), path,
                        memory_attention_check_inputs(np.random.default_rng(seed + 2), c, f, mem_dim, max_memories,
                                                      max_pointers))
        log(str(report))
    results["sam2_memory_attention"] = PartExport("sam2_memory_attention", path, report)


def memory_attention_check_inputs(rng: np.random.Generator, c: int, f: int, mem_dim: int, n: int,
                                  m: int) -> dict[str, np.ndarray]:
    """Two rows (objects) at a full bank, n memories and m pointers, with different contents and
    different temporal rows / distances: a row that read another row's memories, positions or
    pointers would come out wrong."""
    rows = 2
    tpos = np.array([[n - 1, *range(n - 2, -1, -1)],  # prompt frame (row num_maskmem - 1), then newest last
                     [n - 1, n - 1, *range(n - 3, -1, -1)]], np.int32)  # two prompt frames
    tdiff = np.array([[20, *range(1, m)], [*range(-1, -m, -1), 7]], np.int32)  # reversed: signed distances
    return {
        "vision_feat": rng.standard_normal((rows, c, f, f)).astype(np.float32),
        "memory_feats": rng.standard_normal((rows, n, mem_dim, f, f)).astype(np.float16),
        "memory_tpos": tpos,
        "obj_ptrs": rng.standard_normal((rows, m, c)).astype(np.float32),
        "obj_ptr_tdiff": tdiff,
    }


def reference_memory_attention_rows(model, vision_feat, memory_feats, memory_tpos, obj_ptrs, obj_ptr_tdiff):
    """``reference_memory_attention`` (one object) on each row of a batch, stacked: what row b of
    the batched part must equal."""
    import torch

    return torch.cat([reference_memory_attention(model, vision_feat[b:b + 1], memory_feats[b], memory_tpos[b],
                                                 obj_ptrs[b], obj_ptr_tdiff[b])
                      for b in range(len(vision_feat))])


def _export_memory_encoder(model, MemoryEncoder, export, results, s, f, c, gen, check, seed, log):
    import torch

    menc = MemoryEncoder(model)
    # Traced with 2 rows (one present, one absent) so that no traced dim is 1.
    vision = torch.randn(2, c, f, f, generator=gen)
    logits = torch.randn(2, 1, s // 4, s // 4, generator=gen) * 8
    score = torch.tensor([[3.0], [-2.0]])
    mem_dim = int(model.mem_dim)
    path = export("sam2_memory_encoder", menc, (vision, logits, score),
                  ["vision_feat", "mask_logits", "object_score_logits"], ["maskmem_feat"],
                  {"vision_feat": {0: "batch"}, "mask_logits": {0: "batch"}, "object_score_logits": {0: "batch"},
                   "maskmem_feat": {0: "batch"}},
                  {"maskmem_feat": ["batch", mem_dim, f, f]})
    report = None
    if check:
        rng = np.random.default_rng(seed + 3)
        # row 0 object present, row 1 absent (no_obj_embed_spatial): each row its own branch
        inputs = {
            "vision_feat": rng.standard_normal((2, c, f, f)).astype(np.float32),
            "mask_logits": (rng.standard_normal((2, 1, s // 4, s // 4)) * 8).astype(np.float32),
            "object_score_logits": np.array([[2.5], [-0.5]], np.float32),
        }
        report = _check("sam2_memory_encoder", lambda *a: reference_memory_encoder_rows(model, *a), path, inputs)
        log(str(report))
    results["sam2_memory_encoder"] = PartExport("sam2_memory_encoder", path, report)


def reference_memory_encoder_rows(model, vision_feat, mask_logits, object_score_logits):
    """``reference_memory_encoder`` (one object) on each row of a batch, stacked."""
    import torch

    return torch.cat([reference_memory_encoder(model, vision_feat[b:b + 1], mask_logits[b:b + 1],
                                               object_score_logits[b:b + 1])
                      for b in range(len(vision_feat))])


def _write_metadata(output: Path, results: dict[str, PartExport], *, source: str, image_size: int, opset: int,
                    num_maskmem: int, max_obj_ptrs: int) -> None:
    """``sam2_export.json``: what the parts in ``output`` are (merged with parts exported before)."""
    path = output / METADATA_FILE
    parts = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            if previous.get("source") == source and previous.get("image_size") == image_size:
                parts = previous.get("parts", {})
        except (ValueError, AttributeError):
            parts = {}
    parts.update({name: part.to_dict() for name, part in results.items()})
    metadata = {
        "format": 1,
        "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        "image_size": image_size,
        "opset": opset,
        "versions": _versions(),
        "num_maskmem": num_maskmem,
        "max_obj_ptrs_in_encoder": max_obj_ptrs,
        "parts": parts,
        "tolerances": {name: {"rtol": r, "atol": a} for name, (r, a) in TOLERANCES.items()},
    }
    path.write_text(json.dumps(metadata, indent=2) + "\n")


def image_size_multiple(model) -> int:
    """What S must be a multiple of for ``model``: Hiera's patch stride (4) times its first stage's
    window (8 in every SAM 2.1 config), since the window position embedding is tiled over the
    S/4 x S/4 patch grid (``Hiera._get_pos_embed``) and the tiling must come out even."""
    trunk = model.image_encoder.trunk
    stride = int(trunk.patch_embed.proj.stride[0])
    return stride * int(trunk.window_spec[0])


def check_image_size(model) -> None:
    """Refuse a model size S the image encoder cannot run, before anything is exported (the torch
    error would otherwise come from the middle of a trace: "size of tensor a (20) must match...")."""
    s, multiple = int(model.image_size), image_size_multiple(model)
    if s % multiple:
        below, above = s // multiple * multiple, (s // multiple + 1) * multiple
        sizes = f"{below} or {above}" if below else str(above)
        raise ValueError(f"SAM 2 model size S={s} is not a multiple of {multiple}: the hiera image encoder tiles "
                         f"its {multiple // 4}x{multiple // 4} first-stage windows over the S/4 patch grid "
                         f"(try S={sizes})")


def export_parts(output: Path, *, parts: tuple[str, ...] = PART_NAMES, checkpoint: Path | None = None,
                 config: str | None = None, size: str = "tiny", random_init: bool = False, seed: int = 0,
                 image_size: int | None = None, opset: int = OPSET, check: bool = True, log=print) -> list:
    """Build the model (``checkpoint``, or seeded random weights with ``random_init``) at model size
    ``image_size`` (None: the config's, 1024) and export ``parts`` into ``output``; the entry point
    of ``build_engines.py --target onnx`` and of this module's command. Returns
    ``engines.export.common.ExportResult`` objects (name, path, source, report)."""
    import torch

    from engines.export.common import ExportResult

    if checkpoint is None and not random_init:
        raise ValueError("SAM 2: give a checkpoint or random_init=True")
    checkpoint = Path(checkpoint).expanduser() if checkpoint is not None else None
    torch.set_grad_enabled(False)  # inference only: no autograd graph over the reference checks
    model = build_predictor(size, checkpoint, seed=seed, config=config, image_size=image_size)
    source = source_description(size if config is None else config, checkpoint, seed)
    log(f"SAM 2.1 {source}, config {config or config_name(size)}, S={model.image_size}")
    exported = export_model(model, Path(output), source=source, parts=tuple(parts), check=check, seed=seed,
                            opset=opset, log=log)
    return [ExportResult(name=name, path=part.path, source=source, report=part.report,
                         notes=[_NOTES[name]]) for name, part in exported.items()]


def contract_mismatches(path: Path, image_size: int) -> list[str]:
    """How the exported part at ``path`` differs from the model contract at model size ``image_size``:
    the CPU stand-in of the same name (engines/sam2_standin) is the reference, exactly as
    ``build_engines.py --target cpu --sam2-onnx-dir`` will demand it (names, order, dtypes, dims;
    a dynamic dim must stay dynamic)."""
    from engines import sam2_standin
    from engines.export.common import contract, model_contract

    name = Path(path).stem
    part = next((p for p in sam2_standin.PARTS if p.name == name), None)
    if part is None:
        return [f"{name}: not a SAM 2 part ({', '.join(PART_NAMES)})"]
    want = model_contract(part.build(image_size))
    got = contract(Path(path))

    def dims(tensor):
        return [d if isinstance(d, int) else -1 for d in tensor["shape"]]

    problems = []
    for kind in ("inputs", "outputs"):
        if [t["name"] for t in got[kind]] != [t["name"] for t in want[kind]]:
            problems.append(f"{kind} {[t['name'] for t in got[kind]]} != {[t['name'] for t in want[kind]]}")
            continue
        for g, w in zip(got[kind], want[kind]):
            if g["datatype"] != w["datatype"] or dims(g) != dims(w):
                problems.append(f"{g['name']}: {g['datatype']} {dims(g)} != {w['datatype']} {dims(w)} "
                                f"at S={image_size}")
    return problems


_NOTES = {
    "sam2_image_encoder": "vision_feat includes no_mem_embed (the decoder input of a frame without memory)",
    "sam2_mask_decoder": "all 4 candidates: 0 = single-mask output after dynamic multimask via stability, 1..3 "
                         "multimask; obj_ptrs with the no-object mixing; masks not blanked",
    "sam2_memory_attention": "batch = tracked objects (rows independent, sharing N and M); memory_tpos = "
                             "maskmem_tpos_enc row (num_maskmem - 1 - t_pos); obj_ptr_tdiff / "
                             "(max_obj_ptrs_in_encoder - 1) sine-encoded; RoPE in real arithmetic",
    "sam2_memory_encoder": "batch = tracked objects (rows independent); S/4 logits upsampled inside, "
                           "sigmoid*20-10, no_obj_embed_spatial when score <= 0; FP16 out",
}


def _check(name: str, reference, path: Path, inputs: dict[str, np.ndarray]) -> CompareReport:
    rtol, atol = TOLERANCES[name]
    return compare(_Callable(reference), path, inputs, rtol=rtol, atol=atol, check=False)


class _Callable:
    """``compare`` calls module(*tensors) under inference_mode; a plain function will do."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *tensors):
        out = self.fn(*tensors)
        return tuple(t.float() if hasattr(t, "dtype") and str(t.dtype) == "torch.bfloat16" else t
                     for t in (out if isinstance(out, (tuple, list)) else (out,)))


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "absolutely-not-samurai", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out



class _quiet:
    """SAM 2 prints (SAMURAI banner, loguru); keep the export log readable."""

    def __enter__(self):
        import contextlib
        import io

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def source_description(size: str, checkpoint: Path | None, seed: int) -> str:
    size = canonical_size(size) if size.lower() in SIZES or size.lower() in SIZE_ALIASES else Path(size).stem
    if checkpoint is not None:
        return f"hiera {size} checkpoint {Path(checkpoint).name} sha256:{sha256_file(Path(checkpoint))[:16]}"
    return f"hiera {size} RANDOM weights (torch.manual_seed({seed}); no checkpoint)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for the four .onnx files")
    parser.add_argument("--size", default="tiny", help="hiera size: tiny (default), small, base_plus, large")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="a SAM 2.1 checkpoint (.pt) of that size")
    weights.add_argument("--random-init", action="store_true",
                         help="no checkpoint: the architecture with seeded random weights (parity tests)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for --random-init (default 0)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model size S, a multiple of 32 (default: the config's, 1024)")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch checks")
    args = parser.parse_args(argv)

    size = canonical_size(args.size)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    # The same function as build_engines.py --target onnx, so the two commands cannot drift apart.
    try:
        results = export_parts(args.output, checkpoint=args.checkpoint, size=size, random_init=args.random_init,
                               seed=args.seed, image_size=args.image_size, check=not args.no_check)
    except ValueError as exc:
        print(f"engines.export.sam2_parts: {exc}", file=sys.stderr)
        return 2
    failed = [r.name for r in results if r.report is not None and not r.report.ok]
    for r in results:
        print(f"  {r.path}  ({r.path.stat().st_size:,} bytes)")
    if failed:
        print(f"FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
