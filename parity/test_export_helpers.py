"""Export helpers that need torch: run in .venv-export by `make parity` (never in `make test`,
whose environment has no torch)."""

from __future__ import annotations


def test_deform_conv_decomposition_matches_torchvision():
    import torch
    import torchvision

    from engines.export.deform_conv import deform_conv2d

    gen = torch.Generator().manual_seed(0)
    for stride, padding, dilation, kernel, offset_groups in ((1, 1, 1, 3, 1), (2, 3, 1, 7, 2), (1, 2, 2, 3, 1),
                                                             (1, 0, 1, 1, 1)):
        x = torch.randn(2, 8, 13, 11, generator=gen)
        weight = torch.randn(6, 8, kernel, kernel, generator=gen)
        bias = torch.randn(6, generator=gen)
        out_h = (13 + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        out_w = (11 + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        # Offsets large enough to leave the image on some taps (the zero-padding rules).
        offset = 3.0 * torch.randn(2, 2 * offset_groups * kernel * kernel, out_h, out_w, generator=gen)
        mask = torch.rand(2, offset_groups * kernel * kernel, out_h, out_w, generator=gen)
        want = torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding,
                                             dilation=dilation, mask=mask)
        got = deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
