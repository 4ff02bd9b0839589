"""What a cached result is keyed by: the input's content, the model that computed it, and the
parameters that change it. Pure functions (no SQLite, no Triton)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from framewise.v1 import common_pb2
from server.triton.model_spec import ModelSpec
from server.vision.image_decode import DecodedImage

# Part of every key: bump it when a cached value's layout or a pipeline's computation changes,
# so entries written by other code are never read as ours. (The serving process also empties
# the file when it starts: a new build never sees an old build's entries.)
KEY_FORMAT = "framewise.result-cache/1"


@dataclass(frozen=True)
class CacheKey:
    """One entry's key, and the model it belongs to (so entries of a replaced model can be
    dropped without knowing their keys)."""

    kind: str  # "detection" or "matting": the metrics label and the eviction accounting
    digest: bytes  # sha256 over everything below and the input content
    model: str  # Triton model name
    model_id: str  # model_id() of the spec that computed (or would compute) the value


def model_id(spec: ModelSpec) -> str:
    """A fingerprint of everything Triton reports about the model: name, version, backend,
    tensors and every config parameter, among them ``source`` (the weights' sha256). A reload
    that changes any of them (new version, new weights, new input size) changes the id, and
    with it every key, so results of the previous model are never served."""
    described = {
        "name": spec.name,
        "version": spec.version,
        "backend": spec.backend,
        "max_batch_size": spec.max_batch_size,
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in spec.inputs],
        "outputs": [[t.name, t.datatype, list(t.shape)] for t in spec.outputs],
        "parameters": spec.parameters,
    }
    return hashlib.sha256(_canonical(described)).hexdigest()[:32]


def image_digest(image: common_pb2.Image | DecodedImage) -> bytes:
    """sha256 of the input's content: the encoded bytes as sent, or a raw frame's pixels with
    its format and size (the same pixels in another layout are another input), or decoded
    pixels with the original size they stand for. Hashing the encoded bytes (not the decoded
    pixels) keeps a lookup free of the decode."""
    h = hashlib.sha256()
    if isinstance(image, DecodedImage):
        rgb = image.rgb
        h.update(f"decoded:{rgb.shape}:{rgb.dtype}:{image.width}x{image.height}:".encode())
        h.update(memoryview(rgb).cast("B") if rgb.flags.c_contiguous else rgb.tobytes())
        return h.digest()
    kind = image.WhichOneof("source")
    if kind == "encoded":
        h.update(b"encoded:")
        h.update(image.encoded)
    elif kind == "raw":
        raw = image.raw
        h.update(f"raw:{raw.width}x{raw.height}:{raw.pixel_format}:".encode())
        h.update(raw.data)
    else:
        h.update(b"empty:")
    return h.digest()


def image_size(image: common_pb2.Image | DecodedImage) -> int:
    """Bytes image_digest() reads (to decide whether hashing is worth a thread)."""
    if isinstance(image, DecodedImage):
        return image.rgb.nbytes
    kind = image.WhichOneof("source")
    return len(image.encoded) if kind == "encoded" else len(image.raw.data) if kind == "raw" else 0


def entry_key(kind: str, spec: ModelSpec, spec_id: str, content: bytes, params: Mapping[str, object]) -> CacheKey:
    """The key of ``kind``'s result for input ``content`` (an image_digest) under ``params``
    (every option that changes the result, JSON-able; floats are written exactly)."""
    h = hashlib.sha256(_canonical([KEY_FORMAT, kind, spec.name, spec_id, params]))
    h.update(content)
    return CacheKey(kind, h.digest(), spec.name, spec_id)


def _canonical(value: object) -> bytes:
    # sort_keys + no whitespace: one text per value; json writes floats with repr (exact).
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
