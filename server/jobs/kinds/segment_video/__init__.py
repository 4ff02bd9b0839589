"""The video segmentation job (JOB_KIND_SEGMENT_VIDEO): one prompted object tracked through a
whole video, written out as mask, overlay and per-frame JSON artifacts.

    definition.py  SegmentVideoJob: submit-time checks and the stages
    propagation.py the TRACKING stage: forward and backward sessions into tracks.jsonl
    artifacts.py   the WRITING_ARTIFACTS stage: artifacts made from tracks.jsonl
"""

from server.jobs.kinds.segment_video.definition import SegmentVideoJob

__all__ = ["SegmentVideoJob"]
