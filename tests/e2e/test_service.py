"""Service hygiene on the shared orchestrator: reflection, health per service, metrics, server
info, and clear UNIMPLEMENTED answers for the parts of the API later versions fill in."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from framewise.v1 import (
    common_pb2,
    info_service_pb2,
    info_service_pb2_grpc,
    vision_service_pb2,
    vision_service_pb2_grpc,
)
from tests.conftest import Orchestrator

API_SERVICES = {
    "framewise.v1.VisionService",
    "framewise.v1.TrackingService",
    "framewise.v1.JobService",
    "framewise.v1.InfoService",
}


def test_reflection_lists_every_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert API_SERVICES | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_server_info_reports_models_and_triton(channel: grpc.Channel, triton) -> None:
    info = info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=5)
    assert info.serving and info.server_version
    assert info.triton.url == triton.url and info.triton.ready and not info.triton.managed
    assert info.triton.server_version == "2.51.0"
    models = {m.name: m for m in info.models}
    assert set(models) == {
        "yolov8", "matting", "sam2_image_encoder", "sam2_mask_decoder", "sam2_memory_attention", "sam2_memory_encoder",
        "sam2_frame_step", "sam2_track_step",
    }
    assert all(m.ready and m.required for m in models.values())
    # Real weights for YOLOv8 and matting (U^2-Netp); the SAM 2 parts are contract stand-ins and say so.
    real = {"yolov8": "YOLOv8n", "matting": "U2-Netp"}
    assert [name for name, m in models.items() if m.stand_in] == [n for n in models if n not in real]
    assert all("stand-in" in models[n].source and models[n].network == "stand-in" for n in models if n not in real)
    assert {n: models[n].network for n in real} == real
    yolo = models["yolov8"]
    assert yolo.backend == "python" and "sha256:" in yolo.source and yolo.max_batch_size == 8
    assert [(t.name, t.datatype, list(t.shape)) for t in yolo.inputs] == [("images", "UINT8", [-1, 640, 640, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in yolo.outputs] == [("output0", "FP32", [-1, 84, 8400])]


def test_metrics_endpoint(channel: grpc.Channel, orchestrator: Orchestrator, assets: Path) -> None:
    vision = vision_service_pb2_grpc.VisionServiceStub(channel)
    vision.Detect(vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=(assets / "images" / "zidane.jpg").read_bytes())), timeout=60)
    with pytest.raises(grpc.RpcError):
        vision.Detect(vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=b"nope")), timeout=10)
    text = httpx.get(orchestrator.metrics_url, timeout=5).text
    detect = 'method="/framewise.v1.VisionService/Detect"'
    assert f'framewise_rpc_latency_seconds_count{{code="OK",{detect}}}' in text
    assert f'framewise_rpc_errors_total{{code="INVALID_ARGUMENT",{detect}}}' in text
    assert f"framewise_rpc_in_flight{{{detect}}}" in text
    assert 'framewise_triton_request_latency_seconds_count{model="yolov8",outcome="ok"}' in text
    assert 'framewise_stage_latency_seconds_count{pipeline="detect",stage="decode"}' in text
    assert "framewise_triton_ready 1.0" in text
    assert 'framewise_triton_transfers_total{model="yolov8",path="shm"}' in text


def test_logs_are_structured(orchestrator: Orchestrator) -> None:
    records = orchestrator.log_records()
    assert any(r["msg"] == "framewise serving" and r["triton_url"] for r in records)
    assert any(r["msg"] == "rpc failed" and r["code"] == "INVALID_ARGUMENT" for r in records)
