"""The job kinds: each one a JobDefinition (server/jobs/engine/definition.py) of checkpointed stages.

    talking_video/  photo + audio -> a talking-head video through D-ID (JOB_KIND_TALKING_VIDEO)
    segment_video/  one prompted object tracked through a video (JOB_KIND_SEGMENT_VIDEO)
"""
