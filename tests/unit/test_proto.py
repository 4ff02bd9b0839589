"""The committed Python stubs are exactly what proto/generate.py makes from proto/ (no drift)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "framewise").rglob("*") if p.is_file()}
    committed = {
        p.relative_to(REPO): p.read_bytes()
        for p in (REPO / "framewise").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != "py.typed"
    }
    assert sorted(map(str, fresh)) == sorted(map(str, committed)), "stub files differ: run `make proto` and commit"
    stale = [str(name) for name, data in fresh.items() if committed[name] != data]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"


def test_every_rpc_is_reachable_from_the_generated_package() -> None:
    from framewise.v1 import info_service_pb2, jobs_service_pb2, tracking_service_pb2, vision_service_pb2

    methods = {
        f"{s.name}.{m.name}"
        for module in (vision_service_pb2, tracking_service_pb2, jobs_service_pb2, info_service_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    assert {"VisionService.Detect", "TrackingService.Track", "JobService.SegmentVideo", "InfoService.GetServerInfo"} <= methods
    operation = jobs_service_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name["SegmentVideo"]
    assert operation.output_type.full_name == "google.longrunning.Operation"
