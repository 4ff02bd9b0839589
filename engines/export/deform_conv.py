"""ONNX-exportable ``torchvision.ops.deform_conv2d``: a decomposition into standard operators.

torchvision's ``deform_conv2d`` is a custom op with no ONNX exporter. Three ways out were
considered for BiRefNet (its ASPPDeformable blocks use modulated deformable convolution, DCNv2):

- ONNX ``DeformConv`` (opset 19) with a registered symbolic: ONNX Runtime has no kernel for it
  (so the export could not be checked against PyTorch here) and TensorRT's ONNX parser support
  depends on the version; rejected.
- the PyPI package ``deform-conv2d-onnx-exporter``: a TorchScript-exporter symbolic (the legacy
  exporter, deprecated in recent torch) that emits a large GatherElements graph; rejected.
- this module: the same arithmetic written with ``grid_sample`` (bilinear, zero padding) and a
  matrix multiply. Both exporters (TorchScript and ``torch.export``/dynamo) take it, ONNX Runtime
  runs it (GridSample, opset >= 16) and TensorRT builds it (IGridSampleLayer, TensorRT >= 8.6).

Equivalence with torchvision's bilinear sampling: torchvision returns 0 for a sampling point with
y <= -1, y >= H, x <= -1 or x >= W and treats out-of-image neighbours as 0; ``grid_sample`` with
``padding_mode="zeros"`` and ``align_corners=False`` at normalised ``(2p + 1) / size - 1`` samples
pixel coordinate p with exactly those rules. Offsets are laid out as torchvision's
``[B, offset_groups, kh*kw, (dy, dx), Ho, Wo]``, the mask as ``[B, offset_groups, kh*kw, Ho, Wo]``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop-in replacement for ``torchvision.ops.deform_conv2d`` (same arguments, same result)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    channels, height, width = int(input.shape[1]), int(input.shape[2]), int(input.shape[3])
    out_channels, group_channels, kh, kw = (int(d) for d in weight.shape)
    groups = channels // group_channels
    taps = kh * kw
    out_h, out_w = int(offset.shape[-2]), int(offset.shape[-1])
    offset_groups = int(offset.shape[1]) // (2 * taps)
    if offset_groups * 2 * taps != int(offset.shape[1]) or channels % offset_groups:
        raise ValueError(f"offset has {offset.shape[1]} channels; expected 2 * offset_groups * {taps} "
                         f"with offset_groups dividing {channels} input channels")

    dtype, device = input.dtype, input.device
    off = offset.reshape(-1, offset_groups, taps, 2, out_h, out_w)
    base_y = (torch.arange(out_h, device=device, dtype=dtype) * sh - ph).reshape(1, 1, 1, out_h, 1)
    base_x = (torch.arange(out_w, device=device, dtype=dtype) * sw - pw).reshape(1, 1, 1, 1, out_w)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw).reshape(1, 1, taps, 1, 1)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh).reshape(1, 1, taps, 1, 1)
    y = base_y + tap_y + off[:, :, :, 0]  # [B, G, K, Ho, Wo] pixel coordinates
    x = base_x + tap_x + off[:, :, :, 1]
    grid = torch.stack(((2.0 * x + 1.0) / width - 1.0, (2.0 * y + 1.0) / height - 1.0), dim=-1)
    grid = grid.reshape(-1, taps * out_h, out_w, 2)  # [B*G, K*Ho, Wo, 2]

    per_group = input.reshape(-1, channels // offset_groups, height, width)  # [B*G, C/G, H, W]
    sampled = F.grid_sample(per_group, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.reshape(-1, offset_groups, channels // offset_groups, taps, out_h, out_w)
    if mask is not None:
        sampled = sampled * mask.reshape(-1, offset_groups, 1, taps, out_h, out_w)
    # Columns [B, groups, C/groups * K, Ho*Wo]: channel-major, kernel tap minor, like weight.flatten(1).
    columns = sampled.reshape(-1, groups, group_channels * taps, out_h * out_w)
    kernel = weight.reshape(1, groups, out_channels // groups, group_channels * taps)
    out = torch.matmul(kernel, columns).reshape(-1, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.reshape(1, out_channels, 1, 1)
    return out


@contextlib.contextmanager
def exportable_deform_conv2d(model: torch.nn.Module | None = None) -> Iterator[int]:
    """Within the block, every call of ``torchvision.ops.deform_conv2d`` runs the decomposition.

    Patches ``torchvision.ops.deform_conv2d``, ``torchvision.ops.deform_conv.deform_conv2d`` and
    any module-level name bound to the original function in the modules that define
    ``model``'s submodules (``from torchvision.ops import deform_conv2d``). Yields the number of
    bindings replaced; everything is restored on exit."""
    import torchvision.ops
    import torchvision.ops.deform_conv as tv_deform

    original = tv_deform.deform_conv2d
    namespaces = {id(torchvision.ops): torchvision.ops.__dict__, id(tv_deform): tv_deform.__dict__}
    module_names = {type(m).__module__ for m in model.modules()} if model is not None else set()
    for name in module_names:
        mod = sys.modules.get(name)
        if mod is not None:
            namespaces[id(mod)] = mod.__dict__
    patched: list[tuple[dict, str]] = []
    for namespace in namespaces.values():
        for key, value in list(namespace.items()):
            if value is original:
                namespace[key] = deform_conv2d
                patched.append((namespace, key))
    try:
        yield len(patched)
    finally:
        for namespace, key in patched:
            namespace[key] = original


def count_deform_convs(model: torch.nn.Module) -> int:
    """Submodules whose forward calls deform_conv2d (by name in their source), for the report."""
    import inspect

    count = 0
    for module in model.modules():
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        count += "deform_conv2d" in source
    return count
