"""The persons of a talking video: where each one's durable state lives, what its files are
called, how far its stages have got, and how its failure is recorded and reported.

A talking video is made for one person (the one ``person`` selects), or with ``all_persons`` for
each detected person up to a bound. The job's stages are the same either way (the executor's
stage list is fixed); a stage loops over the persons, and each person's progress is saved in
the job state the moment it is made, so a stage that is retried or resumed after a crash skips
what is done and never creates a D-ID talk twice.

State layout (``JobContext.state``, saved as JSON):

* one person: the keys sit at the top level, as before all_persons existed (``crop_box``,
  ``person_file``, ``did_image_url``, ``did_talk_id``, ...), so jobs saved by an earlier version
  resume unchanged;
* all persons: ``state["persons"]`` is a list of dicts holding the same keys per person, plus
  ``person`` (1-based detection rank), ``box``, ``score``, ``video_file`` once its video is
  downloaded, and ``error`` once a step failed for it.

Failure rule (all persons): a person whose step fails with a retryable error is retried with
the stage (the persons already done are skipped); a permanent error, or a retryable one whose
retries are spent, fails that person for good and the others go on. The operation succeeds
when at least one person's video is made; when every person failed it fails with the first
person's error (its class and code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.engine.failures import JobFailure
from server.pipelines.backgrounds import proto_mode
from server.vision.compositing import BackgroundMode, BackgroundSpec, Fit

__all__ = [
    "SKIPPED_BY_CLIENT",
    "PersonSlot",
    "background_proto",
    "background_record",
    "background_words",
    "band",
    "error_proto",
    "failure_of",
    "person_result",
    "persons_text",
    "raise_person_failures",
    "record_failure",
    "slots",
    "talks_summary",
]

SKIPPED_BY_CLIENT = "skipped at the client's request (skip_matting)"
# Single-person file names: kept as they were, so existing clients find their artifacts.
SINGLE_MATTED = "person.png"
SINGLE_CROP = "person.jpg"
SINGLE_VIDEO_FILE = "talk.mp4"
SINGLE_VIDEO_ARTIFACT = "talking_video.mp4"

_FITS = {Fit.COVER: common_pb2.BACKGROUND_FIT_COVER, Fit.CONTAIN: common_pb2.BACKGROUND_FIT_CONTAIN}


@dataclass(frozen=True)
class PersonSlot:
    """One person's share of the job. ``number`` 0: the single-person job (state at the top
    level, the original file names); otherwise the person's 1-based detection rank."""

    number: int
    total: int
    state: dict[str, Any]

    @property
    def many(self) -> bool:
        return self.number > 0

    @property
    def prefix(self) -> str:
        """What event messages and failure descriptions start with: which person it is about."""
        return f"person {self.number} of {self.total}: " if self.many else ""

    @property
    def matted_file(self) -> str:
        return f"person-{self.number}-matted.png" if self.many else SINGLE_MATTED

    @property
    def crop_file(self) -> str:
        return f"person-{self.number}-crop.jpg" if self.many else SINGLE_CROP

    @property
    def photo_file(self) -> str:
        """The photo sent to D-ID (set by the matting stage). Jobs saved before person_file
        existed sent person.png."""
        return str(self.state.get("person_file", SINGLE_MATTED))

    @property
    def photo_media_type(self) -> str:
        return str(self.state.get("person_media_type", "image/png"))

    @property
    def video_file(self) -> str:
        return f"person-{self.number}.mp4" if self.many else SINGLE_VIDEO_FILE

    @property
    def video_artifact(self) -> str:
        return f"person-{self.number}.mp4" if self.many else SINGLE_VIDEO_ARTIFACT

    @property
    def error(self) -> dict[str, Any] | None:
        return self.state.get("error")

    @property
    def failed(self) -> bool:
        """Failed for good: no later stage works on this person."""
        error = self.error
        return error is not None and bool(error["final"])

    @property
    def retry_pending(self) -> bool:
        """Failed in this round with an error the stage's retry may clear."""
        error = self.error
        return error is not None and not error["final"]

    def stamp(self, failure: JobFailure) -> JobFailure:
        """``failure`` marked as this person's (JobError.person) and its description prefixed."""
        if self.many and failure.person == 0:
            failure.person = self.number
            failure.description = self.prefix + failure.description
        return failure


def slots(state: dict[str, Any], all_persons: bool) -> list[PersonSlot]:
    """The job's persons, in detection rank."""
    if not all_persons:
        return [PersonSlot(0, 1, state)]
    persons = state["persons"]
    return [PersonSlot(int(p["person"]), len(persons), p) for p in persons]


def band(low_stage: int, high_stage: int, percents: dict[int, float], finished: int, total: int) -> float:
    """The operation's percent once ``finished`` of ``total`` persons are through a stage that
    spans the fixed percents of ``low_stage`` .. ``high_stage``. ``finished`` only grows (it
    is counted from the durable state), so the percents never go back, also across retries
    and a resume after a crash."""
    low, high = percents[low_stage], percents[high_stage]
    return low + (high - low) * min(finished, total) / max(total, 1)


def record_failure(slot: PersonSlot, failure: JobFailure, stage: int) -> None:
    """Saves ``failure`` as the person's error (the caller saves the state). A retryable one
    stays pending (the stage is retried for this person); any other is final."""
    previous = slot.error or {}
    slot.state["error"] = {
        "error_class": failure.error_class,
        "code": failure.code.name,
        "kind": failure.kind,
        "description": failure.description,
        "stage": stage,
        "attempts": int(previous.get("attempts", 0)) + 1,
        "final": not failure.retryable,
    }


def failure_of(slot: PersonSlot) -> JobFailure:
    """The person's recorded error as a JobFailure (to raise, or to end the job with)."""
    error = slot.error
    assert error is not None
    failure = JobFailure(int(error["error_class"]), str(error["kind"]), str(error["description"]),
                         code=grpc.StatusCode[str(error["code"])])
    failure.person = slot.number
    failure.attempts = int(error["attempts"])
    return failure


def error_proto(slot: PersonSlot) -> jobs_pb2.JobError | None:
    error = slot.error
    if error is None:
        return None
    return jobs_pb2.JobError(
        error_class=int(error["error_class"]),  # type: ignore[arg-type]
        stage=int(error["stage"]),  # type: ignore[arg-type]
        kind=str(error["kind"]),
        description=str(error["description"]),
        will_retry=False,
        attempt=int(error["attempts"]),
        person=slot.number,
    )


def background_record(spec: BackgroundSpec) -> dict[str, Any]:
    """What the response reports about the background applied (JSON for the job state)."""
    colour = "#{:02x}{:02x}{:02x}".format(*spec.color)
    return {
        "mode": int(proto_mode(spec.mode)),
        "color": colour if spec.mode in (BackgroundMode.COLOR, BackgroundMode.IMAGE) else "",
        "fit": int(_FITS[spec.fit]) if spec.mode is BackgroundMode.IMAGE else 0,
    }


def background_proto(state: dict[str, Any]) -> common_pb2.Background:
    """The applied background of a person's state. Jobs saved before backgrounds existed sent
    the cut-out (TRANSPARENT) unless matting was skipped (the original pixels: KEEP)."""
    record = state.get("background")
    if record is None:
        mode = common_pb2.BACKGROUND_MODE_KEEP if state.get("matting_skipped") else common_pb2.BACKGROUND_MODE_TRANSPARENT
        return common_pb2.Background(mode=mode)
    return common_pb2.Background(mode=record["mode"], color=record["color"], fit=record["fit"])


def raise_person_failures(persons: list[PersonSlot]) -> None:
    """After a D-ID stage has tried every person: a retryable failure sends the stage round
    again (for the persons not done); with none left to retry, a stage in which every person
    has failed ends with the first one's error (the fallback then fails the job)."""
    pending = [p for p in persons if p.retry_pending]
    if pending:
        raise failure_of(pending[0])
    if all(p.failed for p in persons):
        raise failure_of(persons[0])


def talks_summary(persons: list[PersonSlot]) -> str:
    made = [p for p in persons if p.state.get("video_file")]
    failed = [p for p in persons if p.failed]
    text = f"D-ID talks done for {len(made)} of {persons_text(len(persons))}"
    for person in failed:
        assert person.error is not None
        text += f"; person {person.number} failed ({person.error['kind']}: {person.error['description'].removeprefix(person.prefix)})"
    return text


def persons_text(count: int) -> str:
    return f"{count} person{'s' if count != 1 else ''}"


def person_result(person: PersonSlot, artifacts: dict[str, jobs_pb2.Artifact]) -> jobs_pb2.TalkingVideoPerson:
    """What the response says about one person, from its state and the stored artifacts."""
    state = person.state
    if person.many:
        box, score, number = state["box"], state["score"], person.number
    else:  # jobs saved before person_number existed report 0 (unknown rank)
        box, score, number = state["person_box"], state.get("person_score", 0.0), state.get("person_number", 0)
    x1, y1, x2, y2 = box
    photo_name = person.photo_file
    result = jobs_pb2.TalkingVideoPerson(
        person=number,
        box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2),
        score=score,
        state=jobs_pb2.JOB_STATE_FAILED if person.failed else jobs_pb2.JOB_STATE_SUCCEEDED,
        did_talk_id=state.get("did_talk_id") or "",
        matting_skipped=bool(state.get("matting_skipped")),
        matting_skipped_reason=state.get("matting_skipped_reason")
        or (SKIPPED_BY_CLIENT if state.get("matting_skipped") else ""),
        background=background_proto(state),
    )
    if not person.failed:
        result.video.CopyFrom(artifacts[person.video_artifact])
    if photo_name in artifacts:
        result.photo.CopyFrom(artifacts[photo_name])
    error = error_proto(person)
    if error is not None and person.failed:
        result.error.CopyFrom(error)
    return result


def background_words(spec: BackgroundSpec) -> str:
    if spec.mode is BackgroundMode.COLOR:
        return "#{:02x}{:02x}{:02x}".format(*spec.color)
    if spec.mode is BackgroundMode.IMAGE:
        return f"the picture ({spec.fit.value})"
    return {BackgroundMode.KEEP: "original pixels", BackgroundMode.TRANSPARENT: "transparent"}[spec.mode]
