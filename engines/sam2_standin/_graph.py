"""Shared helper for the SAM 2 STAND-IN contract models: a small ONNX graph builder.

Nothing here has learned meaning. It only makes the four stand-in graphs short to write:
``g.Mul(x, g.const(2.0))`` appends a node and returns the name of its output.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what opset 17 was released with; every ONNX Runtime since 1.13 reads it
SEED = 20240  # numpy RandomState seed of every "weight" in the stand-ins
FEATURE_CHANNELS = 256
MEMORY_CHANNELS = 64
HIGH_RES_CHANNELS = (32, 64)
NUM_CANDIDATES = 4
# Maps on the S/4 mask grid travel inside S/16 feature maps as 4x4 space-to-depth blocks
# (ONNX SpaceToDepth / DepthToSpace DCR): 16 channels per map channel.
#   vision_feat   0..2    RGB average-pooled 16x16 (0..1)
#                 3..50   RGB at S/4 (4x4 pooled), space-to-depth: what memories remember
#                 51..239 seeded projection of the pooled RGB
#                 240..255 mask prior logits at S/4, space-to-depth: -10 (no object) from the
#                          image encoder, written by memory attention, read by the mask decoder
#                          when it has no prompt
#   maskmem_feat  0..15   mask at S/4 (20 * probability - 10), space-to-depth
#                 16..63  RGB at S/4, space-to-depth (copied from vision_feat 3..50)
BLOCK = 4
AREA = BLOCK * BLOCK
VISION_RGB_CHANNELS = (3, 3 + 3 * AREA)
PRIOR_CHANNELS = (FEATURE_CHANNELS - AREA, FEATURE_CHANNELS)
MEMORY_MASK_CHANNELS = (0, AREA)
MEMORY_RGB_CHANNELS = (AREA, AREA + 3 * AREA)
NO_PRIOR_LOGIT = -10.0

# Point labels, as SAM 2 uses them.
LABEL_NEGATIVE, LABEL_POSITIVE, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT, LABEL_PADDING = 0, 1, 2, 3, -1

# The memory encoder writes the mask as 20 * sigmoid(logits) - 10 (SAM 2's sigmoid_scale_for_mem_enc
# and sigmoid_bias_for_mem_enc): a logit-like map in [-10, 10].
MEMORY_MASK_SCALE, MEMORY_MASK_BIAS = 20.0, -10.0


def check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 64 or image_size % 16:
        raise ValueError(f"sam2 image size must be an integer multiple of 16, >= 64; got {image_size!r}")
    return image_size


def rng(part: str) -> np.random.RandomState:
    """Seeded generator per part, so editing one part never changes another part's weights."""
    return np.random.RandomState([SEED, zlib.crc32(part.encode())])


class GraphBuilder:
    """Collects nodes and initializers; ``g.OpType(*inputs, **attributes)`` adds one node."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, value, dtype=np.float32, name: str | None = None) -> str:
        array = np.asarray(value, dtype=dtype)
        name = name or self._fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        names = [name] if name and outputs == 1 else [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self._fresh(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    # A few compound helpers used by several parts.
    def channels(self, x: str, start: int, stop: int) -> str:
        """x[:, start:stop] of an NCHW tensor."""
        return self.Slice(x, self.ints(start), self.ints(stop), self.ints(1), self.ints(1))

    def sum_hw(self, x: str) -> str:
        return self.ReduceSum(x, self.ints(2, 3), keepdims=1)

    def masked_mean_hw(self, x: str, weight: str, eps: float = 1e-6) -> str:
        """sum(w * x) / (sum(w) + eps) over H, W: [B,C,H,W], [B,1,H,W] -> [B,C,1,1]."""
        return self.Div(self.sum_hw(self.Mul(x, weight)), self.Add(self.sum_hw(weight), self.const(eps)))

    def to_mask_grid(self, x: str) -> str:
        """[B,16,S/16,S/16] space-to-depth blocks -> [B,1,S/4,S/4]."""
        return self.DepthToSpace(x, blocksize=BLOCK, mode="DCR")

    def from_mask_grid(self, x: str) -> str:
        """[B,1,S/4,S/4] -> [B,16,S/16,S/16] space-to-depth blocks."""
        return self.SpaceToDepth(x, blocksize=BLOCK)

    def resize(self, x: str, factor: float) -> str:
        """Bilinear resize of the last two axes by ``factor`` (half-pixel centres)."""
        scales = self.const([1.0, 1.0, factor, factor])
        return self.Resize(x, "", scales, mode="linear", coordinate_transformation_mode="half_pixel")

    def to_float(self, x: str) -> str:
        return self.Cast(x, to=TensorProto.FLOAT)

    def model(self, inputs, outputs, *, doc: str, image_size: int) -> onnx.ModelProto:
        """Finish the graph; ``inputs``/``outputs`` are (name, TensorProto type, dims) triples."""
        graph = helper.make_graph(
            self.nodes, self.name, _infos(inputs), _infos(outputs), initializer=self.initializers, doc_string=doc
        )
        return self._finish(graph, doc, image_size)

    def rows_model(self, inputs, outputs, *, one_row: set[str], doc: str, image_size: int) -> onnx.ModelProto:
        """Finish a graph written for ONE object as a batching model: its nodes run once per row of
        the batch (an ONNX Scan over axis 0), so row b of every output is exactly what the
        one-object graph gives for row b of the inputs.

        ``inputs``/``outputs``: (name, type, dims of one row) triples; the model's tensors get a
        leading "batch" dimension. ``one_row``: the tensors the one-object graph holds with a
        leading 1 (e.g. vision_feat [1,256,F,F]), unsqueezed / squeezed around the nodes; the
        others (memory_feats [N,...]) are one row as they are.
        """
        # Inside the Scan body the contract's names would shadow the outer graph's (ONNX graphs
        # are single-assignment across subgraphs), so the body calls them "<name>__in_row".
        inner = {name: f"{name}__in_row" for name, _, _ in (*inputs, *outputs)}
        nodes = []
        for node in self.nodes:
            node = onnx.NodeProto.FromString(node.SerializeToString())
            node.input[:] = [inner.get(n, n) for n in node.input]
            node.output[:] = [inner.get(n, n) for n in node.output]
            nodes.append(node)
        axes = self.ints(0)
        prologue, epilogue = [], []
        row_inputs, row_outputs = [], []
        for name, kind, dims in inputs:
            row = f"{name}__row" if name in one_row else inner[name]
            if name in one_row:
                prologue.append(helper.make_node("Unsqueeze", [row, axes], [inner[name]], name=f"{name}__unsqueeze"))
            row_inputs.append((row, kind, dims))
        for name, kind, dims in outputs:
            row = f"{name}__row" if name in one_row else inner[name]
            if name in one_row:
                epilogue.append(helper.make_node("Squeeze", [inner[name], axes], [row], name=f"{name}__squeeze"))
            row_outputs.append((row, kind, dims))
        body = helper.make_graph(
            prologue + nodes + epilogue, f"{self.name}_row", _infos(row_inputs), _infos(row_outputs),
            initializer=self.initializers,
        )
        scan = helper.make_node(
            "Scan", [name for name, _, _ in inputs], [name for name, _, _ in outputs], name=f"{self.name}_rows",
            body=body, num_scan_inputs=len(inputs),
        )
        graph = helper.make_graph(
            [scan], self.name,
            _infos([(name, kind, ["batch", *dims]) for name, kind, dims in inputs]),
            _infos([(name, kind, ["batch", *dims]) for name, kind, dims in outputs]),
            doc_string=doc,
        )
        return self._finish(graph, doc, image_size)

    def _finish(self, graph: onnx.GraphProto, doc: str, image_size: int) -> onnx.ModelProto:
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="framewise engines/sam2_standin",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(
            model,
            {
                "stand_in": "true",
                "framewise_model": self.name,
                "image_size": str(image_size),
                "seed": str(SEED),
            },
        )
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model


def _infos(items) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(n, t, d) for n, t, d in items]


def pixel_centres(size: int, stride: int) -> np.ndarray:
    """Model-pixel coordinate of the centre of each cell of a grid with ``stride`` pixels per cell."""
    return (np.arange(size, dtype=np.float32) + 0.5) * stride


def projection(
    rs: np.random.RandomState, out_channels: int, in_channels: int, identity: int = 0, zero_rows=()
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 1x1 conv weight [out, in, 1, 1] and bias; the first ``identity`` outputs copy the
    first inputs unchanged and ``zero_rows`` are always 0."""
    weight = rs.normal(0.0, 1.0 / np.sqrt(in_channels), (out_channels, in_channels)).astype(np.float32)
    bias = rs.normal(0.0, 0.1, out_channels).astype(np.float32)
    weight[:identity] = np.eye(identity, in_channels, dtype=np.float32)
    bias[:identity] = 0.0
    for row in zero_rows:
        weight[row], bias[row] = 0.0, 0.0
    return weight[:, :, None, None], bias
