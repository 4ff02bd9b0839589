"""SAM 2 stand-in contract models in the CPU repository: configs, tensor contracts and the
stand-in semantics a tracker relies on, run in ONNX Runtime (no Triton needed).

Built with a small model size S = 256: feature grid S/16 = 16, high-res grids 64 and 32,
mask grid 64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engines.cpu_repository import build_cpu_repository
from engines.sam2_standin._graph import PRIOR_CHANNELS

ASSETS = REPO_ROOT.parent / "shared" / "assets"
YOLO_ONNX = ASSETS / "models" / "yolov8n_int8.onnx"
CROSSING = ASSETS / "sequences" / "Crossing"
S = 256
F, G = S // 16, S // 4

FP32, FP16, INT32, UINT8 = (
    model_config_pb2.TYPE_FP32,
    model_config_pb2.TYPE_FP16,
    model_config_pb2.TYPE_INT32,
    model_config_pb2.TYPE_UINT8,
)
# name -> (max_batch_size, inputs, outputs); dims as in config.pbtxt (no batch dim when batched).
CONTRACT = {
    "sam2_image_encoder": (
        8,
        [("image", UINT8, [S, S, 3])],
        [
            ("vision_feat", FP32, [256, F, F]),
            ("high_res_feat0", FP32, [32, S // 4, S // 4]),
            ("high_res_feat1", FP32, [64, S // 8, S // 8]),
        ],
    ),
    "sam2_mask_decoder": (
        16,
        [
            ("image_embed", FP32, [256, F, F]),
            ("high_res_feat0", FP32, [32, S // 4, S // 4]),
            ("high_res_feat1", FP32, [64, S // 8, S // 8]),
            ("point_coords", FP32, [-1, 2]),
            ("point_labels", INT32, [-1]),
        ],
        [
            ("masks", FP32, [4, G, G]),
            ("iou_scores", FP32, [4]),
            ("obj_ptrs", FP32, [4, 256]),
            ("object_score_logits", FP32, [1]),
        ],
    ),
    "sam2_memory_attention": (
        16,
        [
            ("vision_feat", FP32, [256, F, F]),
            ("memory_feats", FP16, [-1, 64, F, F]),
            ("memory_tpos", INT32, [-1]),
            ("obj_ptrs", FP32, [-1, 256]),
            ("obj_ptr_tdiff", INT32, [-1]),
        ],
        [("conditioned_feat", FP32, [256, F, F])],
    ),
    "sam2_memory_encoder": (
        16,
        [
            ("vision_feat", FP32, [256, F, F]),
            ("mask_logits", FP32, [1, G, G]),
            ("object_score_logits", FP32, [1]),
        ],
        [("maskmem_feat", FP16, [64, F, F])],
    ),
}
NUMPY = {FP32: np.float32, FP16: np.float16, INT32: np.int32, UINT8: np.uint8}
NO_PROMPT = (np.zeros((1, 1, 2), np.float32), np.full((1, 1), -1, np.int32))

pytestmark = pytest.mark.skipif(
    not (YOLO_ONNX.is_file() and (CROSSING / "img" / "0001.jpg").is_file()),
    reason=f"shared assets not found under {ASSETS}",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return build_cpu_repository(tmp_path_factory.mktemp("sam2") / "repo", YOLO_ONNX, sam2_image_size=S)


@pytest.fixture(scope="module")
def parts(repo):
    """Callables name(**feeds) -> {output name: array}, one ORT session per part."""

    def runner(name):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            str(repo / name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        return lambda **feeds: dict(zip(names, session.run(names, feeds)))

    return {name: runner(name) for name in CONTRACT}


def crossing_frame(index: int) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    bgr = cv2.imread(str(CROSSING / "img" / f"{index:04d}.jpg"))
    return np.ascontiguousarray(cv2.resize(bgr, (S, S), interpolation=cv2.INTER_AREA)[..., ::-1])


def crossing_box(index: int) -> np.ndarray:
    """Ground-truth box of frame ``index`` in model pixels: x0, y0, x1, y1."""
    cv2 = pytest.importorskip("cv2")
    h, w = cv2.imread(str(CROSSING / "img" / "0001.jpg")).shape[:2]
    line = (CROSSING / "groundtruth_rect.txt").read_text().splitlines()[index - 1]
    x, y, bw, bh = (float(v) for v in line.split("\t"))
    return np.array([x * S / w, y * S / h, (x + bw) * S / w, (y + bh) * S / h], np.float32)


def box_prompt(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return box.reshape(1, 2, 2).astype(np.float32), np.array([[2, 3]], np.int32)


def cells_in_box(box: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """[G,G] bool: mask cells whose centre lies in ``box`` (model pixels) grown by ``margin``."""
    centres = (np.arange(G) + 0.5) * (S / G)
    inside_x = (centres >= box[0] - margin) & (centres <= box[2] + margin)
    inside_y = (centres >= box[1] - margin) & (centres <= box[3] + margin)
    return inside_y[:, None] & inside_x[None, :]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def encode(parts, index: int):
    out = parts["sam2_image_encoder"](image=crossing_frame(index)[None])
    return out["vision_feat"], out["high_res_feat0"], out["high_res_feat1"]


def decode(parts, embed, high0, high1, coords, labels):
    return parts["sam2_mask_decoder"](
        image_embed=embed, high_res_feat0=high0, high_res_feat1=high1, point_coords=coords, point_labels=labels
    )


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONTRACT))
def test_config_matches_the_tensor_contract(repo, name):
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    max_batch, inputs, outputs = CONTRACT[name]
    assert config.name == name and config.backend == "python"
    assert config.max_batch_size == max_batch
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == inputs
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == outputs
    assert config.HasField("dynamic_batching") == (max_batch > 0)
    (group,) = config.instance_group
    assert 1 <= group.count <= 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU

    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["stand_in"] == "true"
    assert params["source"] == "stand-in contract model (no SAM 2 weights on this machine)"
    assert params["image_size"] == str(S)
    assert params["per_item_execution"] == "false"
    assert params["onnx_file"] == "model.onnx"
    if name == "sam2_mask_decoder":
        assert params["num_candidates"] == "4"
    assert (repo / name / "1" / "model.py").read_text() == (
        REPO_ROOT / "engines" / "python_backend" / "onnx_model.py"
    ).read_text()


@pytest.mark.parametrize("name", list(CONTRACT))
def test_onnx_graph_is_valid_and_agrees_with_the_config(repo, name):
    model = onnx.load(str(repo / name / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["stand_in"] == "true"
    assert "STAND-IN" in model.graph.doc_string
    max_batch, inputs, outputs = CONTRACT[name]

    def described(values):
        result = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            result.append((v.name, t.elem_type, dims[1:] if max_batch else dims))
        return result

    elem = {
        FP32: onnx.TensorProto.FLOAT,
        FP16: onnx.TensorProto.FLOAT16,
        INT32: onnx.TensorProto.INT32,
        UINT8: onnx.TensorProto.UINT8,
    }
    assert described(model.graph.input) == [(n, elem[t], d) for n, t, d in inputs]
    assert described(model.graph.output) == [(n, elem[t], d) for n, t, d in outputs]
    if max_batch:  # the batch dimension is symbolic
        assert all(
            not v.type.tensor_type.shape.dim[0].HasField("dim_value") for v in [*model.graph.input, *model.graph.output]
        )


# --- the parts in ONNX Runtime -----------------------------------------------------------------


def test_image_encoder_on_a_real_frame(parts):
    frame = crossing_frame(1)
    out = parts["sam2_image_encoder"](image=np.stack([frame, frame[::-1]]))
    assert out["vision_feat"].shape == (2, 256, F, F)
    assert out["high_res_feat0"].shape == (2, 32, S // 4, S // 4)
    assert out["high_res_feat1"].shape == (2, 64, S // 8, S // 8)
    for value in out.values():
        assert value.dtype == np.float32 and np.isfinite(value).all()
    # Items of a batch are independent; the features follow the image.
    single = parts["sam2_image_encoder"](image=frame[None])
    np.testing.assert_allclose(single["vision_feat"], out["vision_feat"][:1], atol=1e-6)
    np.testing.assert_allclose(out["vision_feat"][1, :3], out["vision_feat"][0, :3, ::-1], atol=1e-5)
    assert np.ptp(out["vision_feat"][0, 3:200]) > 0.1  # not a constant map
    assert (out["vision_feat"][:, PRIOR_CHANNELS[0] :] < -5).all()  # no memory yet: "no object" prior


def test_decoder_box_prompt_segments_inside_the_box(parts):
    embed, high0, high1 = encode(parts, 1)
    box = crossing_box(1)
    out = decode(parts, embed, high0, high1, *box_prompt(box))
    masks = out["masks"]
    assert masks.shape == (1, 4, G, G) and np.isfinite(masks).all()
    positive = masks[0] > 0
    assert all(positive[k].any() for k in range(4))
    grown_box = cells_in_box(box, margin=2 * S / G)
    for k in range(4):  # every candidate lies (almost) within the box grown by two mask cells
        assert (positive[k] & grown_box).sum() >= 0.9 * positive[k].sum(), k
    assert (positive[1] & cells_in_box(box)).sum() >= 0.8 * positive[1].sum()
    assert iou(positive[1], cells_in_box(box)) > 0.5

    # Candidates differ (so candidate selection has something to choose from).
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(masks[0, a], masks[0, b]), (a, b)
    assert len({positive[k].tobytes() for k in (1, 2, 3)}) == 3
    assert positive[2].sum() > positive[1].sum() > positive[3].sum()  # grown, as is, shrunk

    scores = out["iou_scores"][0]
    assert out["iou_scores"].shape == (1, 4) and ((scores > 0) & (scores < 1)).all()
    assert len(set(scores.round(6).tolist())) == 4
    assert int(np.argmax(scores[1:])) == 0  # the unaltered mask is the best multimask guess
    assert out["obj_ptrs"].shape == (1, 4, 256) and np.isfinite(out["obj_ptrs"]).all()
    assert out["object_score_logits"].shape == (1, 1) and out["object_score_logits"][0, 0] > 1


def test_decoder_points(parts):
    embed, high0, high1 = encode(parts, 1)
    point = np.array([[[128.0, 100.0]]], np.float32)
    out = decode(parts, embed, high0, high1, point, np.array([[1]], np.int32))
    positive = out["masks"][0, 1] > 0
    assert positive[100 * G // S, 128 * G // S]
    assert positive.mean() < 0.1 and out["object_score_logits"][0, 0] > 0
    # A negative point on top removes it; padding changes nothing.
    both = decode(parts, embed, high0, high1, np.concatenate([point, point], 1), np.array([[1, 0]], np.int32))
    assert not (both["masks"][0, 1] > 0).any() and both["object_score_logits"][0, 0] < -1
    padded = decode(parts, embed, high0, high1, np.concatenate([point, point + 50], 1), np.array([[1, -1]], np.int32))
    np.testing.assert_allclose(padded["masks"], out["masks"], atol=1e-5)


def test_decoder_without_prompt_or_prior_finds_nothing(parts):
    embed, high0, high1 = encode(parts, 1)
    # A frame straight from the image encoder (no memory): no object.
    out = decode(parts, embed, high0, high1, *NO_PROMPT)
    assert not (out["masks"] > 0).any() and out["object_score_logits"][0, 0] < -1
    # A very negative prior with padding-only prompts: an empty mask, object absent.
    negative = embed.copy()
    negative[:, PRIOR_CHANNELS[0] :] = -20.0
    out = decode(parts, negative, high0, high1, np.zeros((1, 3, 2), np.float32), np.full((1, 3), -1, np.int32))
    assert not (out["masks"] > 0).any()
    assert out["object_score_logits"][0, 0] < -1
    assert np.isfinite(out["obj_ptrs"]).all() and ((out["iou_scores"] > 0) & (out["iou_scores"] < 1)).all()


def test_decoder_batch_of_objects_equals_single_runs(parts):
    embed, high0, high1 = encode(parts, 1)
    box = crossing_box(1)
    coords = np.array(
        [
            [[box[0], box[1]], [box[2], box[3]], [0, 0]],  # box + padding
            [[60, 60], [0, 0], [0, 0]],  # one positive point
            [[150, 150], [170, 150], [40, 200]],  # positive, negative, positive
        ],
        np.float32,
    )
    labels = np.array([[2, 3, -1], [1, -1, -1], [1, 0, 1]], np.int32)
    batch = decode(parts, np.repeat(embed, 3, 0), np.repeat(high0, 3, 0), np.repeat(high1, 3, 0), coords, labels)
    for i in range(3):
        single = decode(parts, embed, high0, high1, coords[i : i + 1], labels[i : i + 1])
        for name, value in single.items():
            np.testing.assert_allclose(batch[name][i : i + 1], value, rtol=1e-5, atol=1e-5, err_msg=f"{name}[{i}]")
    assert len({(batch["masks"][i, 1] > 0).tobytes() for i in range(3)}) == 3


def test_memory_encoder_then_attention_then_decoder_propagates_the_mask(parts):
    embed, high0, high1 = encode(parts, 1)
    prompted = decode(parts, embed, high0, high1, *box_prompt(crossing_box(1)))
    mask, score = prompted["masks"][:, 1:2], prompted["object_score_logits"]
    memory = parts["sam2_memory_encoder"](vision_feat=embed, mask_logits=mask, object_score_logits=score)[
        "maskmem_feat"
    ]
    assert memory.shape == (1, 64, F, F) and memory.dtype == np.float16 and np.isfinite(memory).all()
    pointer = prompted["obj_ptrs"][:, 1]

    def propagate(index: int) -> dict:
        now, now0, now1 = encode(parts, index)
        conditioned = parts["sam2_memory_attention"](
            vision_feat=now,
            memory_feats=memory.astype(np.float16)[None],
            memory_tpos=np.array([[0]], np.int32),
            obj_ptrs=pointer[None],
            obj_ptr_tdiff=np.array([[index - 1]], np.int32),
        )["conditioned_feat"]
        assert conditioned.shape == (1, 256, F, F) and np.isfinite(conditioned).all()
        np.testing.assert_array_equal(conditioned[:, : PRIOR_CHANNELS[0]], now[:, : PRIOR_CHANNELS[0]])
        return decode(parts, conditioned, now0, now1, *NO_PROMPT)

    before = mask[0, 0] > 0
    same = propagate(1)  # same frame: the mask comes back
    assert iou(same["masks"][0, 1] > 0, before) > 0.9
    assert same["object_score_logits"][0, 0] > 0 and same["iou_scores"][0, 1] > 0.5
    following = propagate(2)  # next frame: near the previous mask, and on the object
    after = following["masks"][0, 1] > 0
    assert iou(after, before) > 0.6
    assert iou(after, cells_in_box(crossing_box(2))) > 0.4
    assert following["object_score_logits"][0, 0] > 0

    # An absent object (score <= 0) leaves an empty memory, and nothing is found from it.
    empty = parts["sam2_memory_encoder"](
        vision_feat=embed, mask_logits=mask, object_score_logits=np.array([[-3.0]], np.float32)
    )["maskmem_feat"]
    conditioned = parts["sam2_memory_attention"](
        vision_feat=embed,
        memory_feats=empty.astype(np.float16)[None],
        memory_tpos=np.array([[0]], np.int32),
        obj_ptrs=pointer[None],
        obj_ptr_tdiff=np.array([[1]], np.int32),
    )["conditioned_feat"]
    out = decode(parts, conditioned, high0, high1, *NO_PROMPT)
    assert not (out["masks"] > 0).any() and out["object_score_logits"][0, 0] < -1


@pytest.mark.parametrize("memories,pointers", [(1, 1), (1, 16), (7, 1), (7, 16)])
def test_memory_attention_accepts_1_to_7_memories_and_1_to_16_pointers(parts, memories, pointers):
    embed, high0, high1 = encode(parts, 1)
    prompted = decode(parts, embed, high0, high1, *box_prompt(crossing_box(1)))
    memory = parts["sam2_memory_encoder"](
        vision_feat=embed, mask_logits=prompted["masks"][:, 1:2], object_score_logits=prompted["object_score_logits"]
    )["maskmem_feat"]
    rs = np.random.RandomState(memories * 100 + pointers)
    out = parts["sam2_memory_attention"](
        vision_feat=embed,
        memory_feats=np.repeat(memory.astype(np.float16), memories, 0)[None],
        # Rows of the temporal encoding: prompt frame 6, then oldest -> newest (0).
        memory_tpos=np.array([[6, 5, 4, 3, 2, 1, 0][-memories:]], np.int32),
        obj_ptrs=rs.normal(size=(1, pointers, 256)).astype(np.float32),
        obj_ptr_tdiff=np.arange(1, pointers + 1, dtype=np.int32)[None],
    )["conditioned_feat"]
    assert out.shape == (1, 256, F, F) and out.dtype == np.float32 and np.isfinite(out).all()
    decoded = decode(parts, out, high0, high1, *NO_PROMPT)
    assert iou(decoded["masks"][0, 1] > 0, prompted["masks"][0, 1] > 0) > 0.9


def test_every_memory_attention_input_counts(parts):
    embed, high0, high1 = encode(parts, 1)
    prompted = decode(parts, embed, high0, high1, *box_prompt(crossing_box(1)))
    memory = parts["sam2_memory_encoder"](
        vision_feat=embed, mask_logits=prompted["masks"][:, 1:2], object_score_logits=prompted["object_score_logits"]
    )["maskmem_feat"]
    elsewhere = np.roll(memory, 3, axis=3).astype(np.float32)  # the same object, 3 feature cells to the right
    feeds = {
        "vision_feat": embed,
        "memory_feats": np.concatenate([memory.astype(np.float16), elsewhere.astype(np.float16)])[None],
        "memory_tpos": np.array([[1, 5]], np.int32),
        "obj_ptrs": np.random.RandomState(0).normal(size=(1, 2, 256)).astype(np.float32),
        "obj_ptr_tdiff": np.array([[1, 4]], np.int32),
    }
    base = parts["sam2_memory_attention"](**feeds)["conditioned_feat"]
    changes = {
        "vision_feat": embed * 0.5,
        "memory_feats": feeds["memory_feats"][:, ::-1].copy(),
        "memory_tpos": np.array([[5, 1]], np.int32),
        "obj_ptrs": -feeds["obj_ptrs"],
        "obj_ptr_tdiff": np.array([[4, 1]], np.int32),
    }
    for name, value in changes.items():
        changed = parts["sam2_memory_attention"](**{**feeds, name: value})["conditioned_feat"]
        assert not np.array_equal(changed, base), name


def test_memory_parts_take_one_object_per_row(parts):
    """Rows of a batched call are independent objects: each row gives what the object alone gives."""
    embed, high0, high1 = encode(parts, 1)
    prompted = decode(parts, embed, high0, high1, *box_prompt(crossing_box(1)))
    masks = np.concatenate([prompted["masks"][:, 1:2], np.roll(prompted["masks"][:, 2:3], 5, axis=3),
                            prompted["masks"][:, 3:4]])
    scores = np.array([[2.0], [1.0], [-3.0]], np.float32)  # the third object absent
    encoder_feeds = {"vision_feat": np.repeat(embed, 3, 0), "mask_logits": masks, "object_score_logits": scores}
    memories = parts["sam2_memory_encoder"](**encoder_feeds)["maskmem_feat"]
    assert memories.shape == (3, 64, F, F)
    for row in range(3):
        alone = parts["sam2_memory_encoder"](**{k: v[row:row + 1] for k, v in encoder_feeds.items()})["maskmem_feat"]
        np.testing.assert_array_equal(memories[row:row + 1], alone)
    assert len({memories[row].tobytes() for row in range(3)}) == 3

    rs = np.random.RandomState(3)
    feeds = {
        "vision_feat": np.repeat(embed, 3, 0),
        "memory_feats": np.stack([memories, memories[::-1], np.roll(memories, 1, 0)]).astype(np.float16),  # 3 x 3 memories
        "memory_tpos": np.array([[2, 1, 0], [6, 1, 0], [0, 1, 2]], np.int32),
        "obj_ptrs": rs.normal(size=(3, 2, 256)).astype(np.float32),
        "obj_ptr_tdiff": np.array([[1, 2], [1, 3], [2, 4]], np.int32),
    }
    batch = parts["sam2_memory_attention"](**feeds)["conditioned_feat"]
    assert batch.shape == (3, 256, F, F)
    for row in range(3):
        alone = parts["sam2_memory_attention"](**{k: v[row:row + 1] for k, v in feeds.items()})["conditioned_feat"]
        np.testing.assert_array_equal(batch[row:row + 1], alone)
    assert not np.array_equal(batch[0], batch[1])
