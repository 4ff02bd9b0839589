"""The talking video's progress scale: the percent each stage event reports (fixed,
INITIALIZED 0 ... COMPLETED 100), shared by every stage of this job kind."""

from __future__ import annotations

from framewise.v1 import jobs_service_pb2 as jobs_pb2

__all__ = ["STAGE_PERCENT", "S"]

S = jobs_pb2.JobStage
STAGE_PERCENT: dict[int, float] = {
    S.JOB_STAGE_INITIALIZED: 0,
    S.JOB_STAGE_UPLOAD_COMPLETE: 20,
    S.JOB_STAGE_DETECTION_RUNNING: 25,
    S.JOB_STAGE_DETECTION_COMPLETE: 40,
    S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING: 50,
    S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE: 60,
    S.JOB_STAGE_DID_UPLOAD: 70,
    S.JOB_STAGE_DID_PROCESSING: 75,
    S.JOB_STAGE_DID_COMPLETE: 80,
    S.JOB_STAGE_FINALIZING: 90,
    S.JOB_STAGE_COMPLETED: 100,
}

