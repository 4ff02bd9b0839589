"""Pipeline results -> framewise.v1 messages: the conversions every servicer shares."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from framewise.v1 import common_pb2
from server.triton.model_spec import ModelSpec


def timings(ms: dict[str, float]) -> common_pb2.Timings:
    """Stage timings in milliseconds; stages a pipeline does not have stay 0."""
    return common_pb2.Timings(
        decode_ms=ms.get("decode", 0.0),
        preprocess_ms=ms.get("preprocess", 0.0),
        triton_ms=ms.get("triton", 0.0),
        postprocess_ms=ms.get("postprocess", 0.0),
        total_ms=ms.get("total", 0.0),
    )


def box(corners: tuple[float, float, float, float]) -> common_pb2.BoundingBox:
    x1, y1, x2, y2 = corners
    return common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)


def model_ref(spec: ModelSpec) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=spec.name, version=spec.version, stand_in=spec.stand_in, network=spec.network)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts
