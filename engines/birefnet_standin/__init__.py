"""BiRefNet STAND-IN contract model for the CPU model repository (no BiRefNet weights, no torch).

One small deterministic ONNX graph with the tensor contract of the real BiRefNet export
(DESIGN.md section 4): ``image`` UINT8 [B,S,S,3] RGB -> ``alpha`` FP32 [B,1,S,S] in 0..1
(sigmoid applied inside the graph). The matte is plain image arithmetic (colour distance to
the mean border colour plus a centre prior, smoothed): it looks like a matte and varies with
the image, but it has NO learned meaning. Built with ``onnx.helper`` and numpy; see graph.py.
"""

from __future__ import annotations

from pathlib import Path

from engines.birefnet_standin.graph import INPUT, MAX_BATCH_SIZE, NAME, OUTPUT, build, check_image_size

# The graph is built with the SAM 2 stand-ins' GraphBuilder, so that file is part of its source.
SOURCE_FILES = (
    *sorted(Path(__file__).resolve().parent.glob("*.py")),
    Path(__file__).resolve().parents[1] / "sam2_standin" / "_graph.py",
)

__all__ = ["INPUT", "MAX_BATCH_SIZE", "NAME", "OUTPUT", "SOURCE_FILES", "build", "check_image_size"]
