"""The talking video job (JOB_KIND_TALKING_VIDEO): photo + audio -> a
talking-head video through D-ID.

    inputs -> YOLO person detection -> crop -> matting -> D-ID upload -> create talk
           -> poll until done -> download into storage

    definition.py TalkingVideoJob: its settings, the stages in order, FINALIZING, response
    inputs.py    submit-time checks, the request's sources, the UPLOAD_COMPLETE stage
    photos.py    the DETECTION and BACKGROUND_REMOVAL stages: the photo D-ID gets per person
    talks.py     the D-ID stages: DID_UPLOAD and DID_COMPLETE (one talk per person, never two)
    persons.py   per-person bookkeeping for all_persons: state, file names, failure rule
    progress.py  the percent each stage event reports

With ``all_persons`` the same stages run once for the job, and each of them after detection
loops over the persons; the stage_update events are the single person's, the per-person steps
are progress_update events naming the person, and the percents move through each stage's band
as persons finish.
"""

from server.jobs.kinds.talking_video.definition import TalkingVideoJob
from server.jobs.kinds.talking_video.progress import STAGE_PERCENT
from server.jobs.kinds.talking_video.talks import DIDFactory

__all__ = ["STAGE_PERCENT", "DIDFactory", "TalkingVideoJob"]
