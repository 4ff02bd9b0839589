"""Row independence of the batching SAM 2 parts (memory attention, memory encoder) as exported.

    .venv-export/bin/python -m parity.batching DIR [--batch 3] [--heads 1]

For each of ``DIR/sam2_memory_attention.onnx`` and ``DIR/sam2_memory_encoder.onnx``: one call with
``--batch`` rows of different contents, then each row alone (B = 1); row b of the batched output
must equal the B = 1 result of row b. Run on ONNX Runtime, on OpenVINO in f32
(``INFERENCE_PRECISION_HINT``: f32, so that bf16 rounding cannot hide or fake a difference), and,
for the memory attention, on the graph with its attention fused into com.microsoft
MultiHeadAttention (engines/attention_fusion.py, what the CPU repository serves on ONNX Runtime),
which must also equal the unfused graph at B = 2, and the same with its value projections folded
first (engines/value_fold.py; on OpenVINO too: what the CPU repository serves). Prints the max abs difference of each
comparison; exit status 1 when one is outside the part's tolerance (sam2_parts.TOLERANCES).

Needs onnxruntime and openvino (the export environment); no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ATTENTION = "sam2_memory_attention"
ENCODER = "sam2_memory_encoder"
# SAM 2.1's maskmem_tpos_enc has num_maskmem = 7 rows: every memory_tpos must index one of them.
NUM_MASKMEM = 7

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Comparison:
    part: str
    runtime: str
    what: str
    max_abs: float
    ok: bool

    def line(self) -> str:
        return f"{self.part} {self.runtime}: {self.what}: max abs diff {self.max_abs:.3e} {'ok' if self.ok else 'FAIL'}"


def _dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def attention_inputs(model: onnx.ModelProto, batch: int, memories: int, pointers: int,
                     seed: int) -> dict[str, np.ndarray]:
    """``batch`` rows, each with its own features, memories, temporal rows and pointer distances."""
    _, c, f, _ = _dims(model, "vision_feat")
    mem_dim = _dims(model, "memory_feats")[2]
    rng = np.random.default_rng(seed)
    return {
        "vision_feat": rng.standard_normal((batch, c, f, f)).astype(np.float32),
        "memory_feats": rng.standard_normal((batch, memories, mem_dim, f, f)).astype(np.float16),
        "memory_tpos": rng.integers(0, NUM_MASKMEM, (batch, memories)).astype(np.int32),
        "obj_ptrs": rng.standard_normal((batch, pointers, c)).astype(np.float32),
        "obj_ptr_tdiff": rng.integers(-15, 16, (batch, pointers)).astype(np.int32),
    }


def encoder_inputs(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    """``batch`` rows; the object score alternates present / absent, so both branches meet in a call."""
    _, c, f, _ = _dims(model, "vision_feat")
    g = _dims(model, "mask_logits")[2]
    rng = np.random.default_rng(seed)
    scores = np.array([[2.5 if b % 2 == 0 else -0.5] for b in range(batch)], np.float32)
    return {
        "vision_feat": rng.standard_normal((batch, c, f, f)).astype(np.float32),
        "mask_logits": (rng.standard_normal((batch, 1, g, g)) * 8).astype(np.float32),
        "object_score_logits": scores,
    }


def onnxruntime_runner(model: onnx.ModelProto) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def openvino_runner(source: Path | onnx.ModelProto) -> Runner:
    import tempfile

    import openvino

    if isinstance(source, onnx.ModelProto):  # a rewritten graph: OpenVINO reads ONNX from a file
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            onnx.save(source, str(path))
            compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    else:
        compiled = openvino.Core().compile_model(str(source), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda feeds: np.asarray(compiled(feeds)[compiled.output(0)])


def rows_alone(run: Runner, feeds: dict[str, np.ndarray], part: str, runtime: str, atol: float,
               rtol: float) -> Comparison:
    """Row b of one batched call vs row b run alone, over every row."""
    batched = run(feeds).astype(np.float32)
    worst, ok = 0.0, True
    for b in range(batched.shape[0]):
        alone = run({name: value[b:b + 1] for name, value in feeds.items()}).astype(np.float32)
        worst = max(worst, float(np.abs(batched[b:b + 1] - alone).max()))
        ok = ok and alone.shape == batched[b:b + 1].shape and bool(np.allclose(batched[b:b + 1], alone,
                                                                               rtol=rtol, atol=atol))
    return Comparison(part, runtime, f"B={batched.shape[0]} rows vs B=1", worst, ok)


def same_outputs(a: Runner, b: Runner, feeds: dict[str, np.ndarray], part: str, what: str, atol: float,
                 rtol: float) -> Comparison:
    x, y = a(feeds).astype(np.float32), b(feeds).astype(np.float32)
    ok = x.shape == y.shape and bool(np.allclose(x, y, rtol=rtol, atol=atol))
    return Comparison(part, "onnxruntime", what, float(np.abs(x - y).max()) if x.shape == y.shape else np.inf, ok)


def check_folder(folder: Path, *, batch: int = 3, heads: int = 1, memories: int = NUM_MASKMEM, pointers: int = 16,
                 seed: int = 0, openvino: bool = True) -> list[Comparison]:
    """Every comparison of this module's docstring on the parts in ``folder``."""
    from engines.attention_fusion import fuse_attention
    from engines.export.sam2_parts import TOLERANCES
    from engines.value_fold import fold_value_projection

    results: list[Comparison] = []
    path = folder / f"{ATTENTION}.onnx"
    model = onnx.load(str(path))
    rtol, atol = TOLERANCES[ATTENTION]
    feeds = attention_inputs(model, batch, memories, pointers, seed)
    unfused = onnxruntime_runner(model)
    results.append(rows_alone(unfused, feeds, ATTENTION, "onnxruntime", atol, rtol))
    fused_model, count = fuse_attention(model, heads)
    fused = onnxruntime_runner(fused_model)
    results.append(rows_alone(fused, feeds, ATTENTION, f"onnxruntime fused ({count} MHA)", atol, rtol))
    results.append(same_outputs(unfused, fused, {k: v[:2] for k, v in feeds.items()}, ATTENTION,
                                f"fused ({count} MHA) vs unfused at B=2", atol, rtol))
    if openvino:
        results.append(rows_alone(openvino_runner(path), feeds, ATTENTION, "openvino f32", atol, rtol))
    # What the CPU repository serves: the value projections folded (engines/value_fold.py), fused
    # too on ONNX Runtime.
    folded_model, folds = fold_value_projection(model, heads)
    folded_fused_model, count = fuse_attention(folded_model, heads)
    folded_fused = onnxruntime_runner(folded_fused_model)
    what = f"{folds} values folded, {count} MHA"
    results.append(rows_alone(folded_fused, feeds, ATTENTION, f"onnxruntime {what}", atol, rtol))
    results.append(same_outputs(unfused, folded_fused, {k: v[:2] for k, v in feeds.items()}, ATTENTION,
                                f"{what} vs unfused at B=2", atol, rtol))
    if openvino:
        results.append(rows_alone(openvino_runner(folded_model), feeds, ATTENTION, f"openvino f32, {folds} values folded",
                                  atol, rtol))

    path = folder / f"{ENCODER}.onnx"
    model = onnx.load(str(path))
    rtol, atol = TOLERANCES[ENCODER]
    feeds = encoder_inputs(model, batch, seed + 1)
    results.append(rows_alone(onnxruntime_runner(model), feeds, ENCODER, "onnxruntime", atol, rtol))
    if openvino:
        results.append(rows_alone(openvino_runner(path), feeds, ENCODER, "openvino f32", atol, rtol))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder of exported SAM 2 parts")
    parser.add_argument("--batch", type=int, default=3, help="rows of the batched call (default 3)")
    parser.add_argument("--heads", type=int, default=1, help="attention heads of the memory attention (SAM 2.1: 1)")
    parser.add_argument("--no-openvino", action="store_true", help="ONNX Runtime only")
    args = parser.parse_args(argv)
    results = check_folder(args.folder, batch=args.batch, heads=args.heads, openvino=not args.no_openvino)
    for result in results:
        print(result.line())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
