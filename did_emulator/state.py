"""The emulator's state: uploads, talks, injected faults and the request log (thread-safe).

With ``persist`` the uploads and talks (and the results rendered from them) outlive the process,
as they do at D-ID: every change rewrites ``state.json`` in the storage folder atomically (a temp
file, fsync, rename), and a new emulator on the same folder serves the same talks and accepts
the same upload URLs. A talk's clock is wall time, so one that was rendering when the emulator
stopped finishes on schedule after the restart (its result is rendered again if the stop cut
that short). Faults and the request log are the test's controls of one run: never persisted.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from did_emulator.media import render_talk

URL_PREFIX = "s3://d-id-emulator/"
STATE_FILE = "state.json"
STATE_VERSION = 1
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
TALK_OUTCOMES = ("done", "error", "rejected")


@dataclass
class Fault:
    """An injected failure: requests matching method/path (fnmatch) are delayed by ``delay_s``
    and, if ``status`` is set, answered with it instead of being handled; ``times`` uses."""

    id: int
    method: str = "*"
    path: str = "*"
    status: int | None = None
    kind: str | None = None
    description: str | None = None
    retry_after: float | None = None
    delay_s: float = 0.0
    times: int = 1
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and fnmatch.fnmatchcase(path, self.path) and self.fired < self.times


@dataclass
class TalkOutcome:
    """How a talk ends. Without a target it is the next talk's (first in, first used); with
    ``source_url`` (an fnmatch pattern on the talk's source_url) and/or ``talk_index`` (the n-th
    talk created since the last reset, from 1) it is the outcome of the talks it matches, ``times``
    of them, whatever the order: a test can fail one person's talk of several."""

    outcome: str = "done"
    kind: str | None = None
    description: str | None = None
    stage_delay_s: float | None = None
    source_url: str | None = None
    talk_index: int | None = None
    times: int = 1
    fired: int = 0

    @property
    def targeted(self) -> bool:
        return self.source_url is not None or self.talk_index is not None

    def matches(self, source_url: str, index: int) -> bool:
        return (
            self.fired < self.times
            and (self.source_url is None or fnmatch.fnmatchcase(source_url, self.source_url))
            and (self.talk_index is None or self.talk_index == index)
        )


@dataclass
class Upload:
    id: str
    kind: str  # "image" | "audio"
    path: Path
    url: str


@dataclass
class TalkRecord:
    id: str
    source: Upload
    audio: Upload
    created_at: float
    stage_delay_s: float
    outcome: TalkOutcome
    video_path: Path
    rendered: threading.Event = field(default_factory=threading.Event)
    render_error: str | None = None

    def status(self, now: float) -> str:
        """The status at wall time ``now`` (time.time(): it survives a restart, monotonic does not)."""
        elapsed = now - self.created_at
        if elapsed < self.stage_delay_s:
            return "created"
        if elapsed < 2 * self.stage_delay_s:
            return "started"
        if self.outcome.outcome != "done":
            return self.outcome.outcome
        if not self.rendered.is_set():
            return "started"
        return "error" if self.render_error else "done"


class EmulatorState:
    def __init__(self, storage: Path, stage_delay_s: float, *, persist: bool = False) -> None:
        self.storage = storage
        self.stage_delay_s = stage_delay_s
        self.persist = persist
        self._lock = threading.Lock()
        # Serialises the writes of state.json, so the last snapshot taken is the last written.
        self._save_lock = threading.Lock()
        # Renders still running (daemon threads encoding an mp4 with PyAV): stop() waits for them,
        # so a stop does not leave a half-written result behind.
        self._renders: set[threading.Thread] = set()
        self._reset_locked()
        if persist:
            self._load()

    def _reset_locked(self) -> None:
        self.uploads: dict[str, Upload] = {}
        self.talks: dict[str, TalkRecord] = {}
        self.faults: list[Fault] = []
        self.outcomes: list[TalkOutcome] = []
        self.targeted_outcomes: list[TalkOutcome] = []
        self.requests: list[dict[str, Any]] = []
        self._next_fault = 1
        self._talks_created = 0

    def reset(self) -> None:
        with self._lock:
            self._reset_locked()
        self._save()

    # --------------------------------------------------------------------- faults and log

    def add_fault(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Register a fault or a talk outcome (the next talk's, or with ``source_url`` /
        ``talk_index`` the matching talks') from the control endpoint's JSON."""
        with self._lock:
            if "talk_outcome" in spec:
                outcome = TalkOutcome(
                    outcome=str(spec["talk_outcome"]),
                    kind=spec.get("kind"),
                    description=spec.get("description"),
                    stage_delay_s=None if spec.get("stage_delay_s") is None else float(spec["stage_delay_s"]),
                    source_url=None if spec.get("source_url") is None else str(spec["source_url"]),
                    talk_index=None if spec.get("talk_index") is None else int(spec["talk_index"]),
                    times=int(spec.get("times", 1)),
                )
                if outcome.outcome not in TALK_OUTCOMES:
                    raise ValueError(f"talk_outcome must be one of {TALK_OUTCOMES}")
                if outcome.talk_index is not None and outcome.talk_index < 1:
                    raise ValueError("talk_index counts talks from 1")
                (self.targeted_outcomes if outcome.targeted else self.outcomes).append(outcome)
                return {"talk_outcome": asdict(outcome)}
            if spec.get("status") is None and not spec.get("delay_s"):
                raise ValueError("a fault needs 'status', 'delay_s' or 'talk_outcome'")
            fault = Fault(
                id=self._next_fault,
                method=str(spec.get("method", "*")).upper(),
                path=str(spec.get("path", "*")),
                status=None if spec.get("status") is None else int(spec["status"]),
                kind=spec.get("kind"),
                description=spec.get("description"),
                retry_after=None if spec.get("retry_after") is None else float(spec["retry_after"]),
                delay_s=float(spec.get("delay_s", 0.0)),
                times=int(spec.get("times", 1)),
            )
            self._next_fault += 1
            self.faults.append(fault)
            return asdict(fault)

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.fired += 1
                    return fault
        return None

    def log(self, method: str, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": method, "path": path, "time": time.time(), "status": None}
        with self._lock:
            self.requests.append(entry)
        return entry

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": [dict(r) for r in self.requests],
                "faults": [asdict(f) for f in self.faults],
                "pending_talk_outcomes": [asdict(o) for o in self.outcomes],
                "targeted_talk_outcomes": [asdict(o) for o in self.targeted_outcomes],
            }

    # ----------------------------------------------------------------- uploads and talks

    def store_upload(self, kind: str, filename: str | None, data: bytes) -> Upload:
        upload_id = f"{kind[:3]}_{secrets.token_hex(8)}"
        name = _SAFE_NAME.sub("_", Path(filename or kind).name).strip("._") or kind
        folder = self.storage / upload_id
        folder.mkdir(parents=True)
        path = folder / name
        _write_atomically(path, data)  # state.json names it only once it is whole
        upload = Upload(id=upload_id, kind=kind, path=path, url=f"{URL_PREFIX}{upload_id}/{name}")
        with self._lock:
            self.uploads[upload.url] = upload
        self._save()
        return upload

    def upload_by_url(self, url: object) -> Upload | None:
        with self._lock:
            return self.uploads.get(url) if isinstance(url, str) else None

    def create_talk(self, source: Upload, audio: Upload) -> TalkRecord:
        with self._lock:
            self._talks_created += 1
            outcome = self._targeted_outcome(source.url, self._talks_created)
            if outcome is None:
                outcome = self.outcomes.pop(0) if self.outcomes else TalkOutcome()
        talk_id = f"tlk_{secrets.token_urlsafe(12).replace('-', 'x').replace('_', 'y')}"
        delay = self.stage_delay_s if outcome.stage_delay_s is None else outcome.stage_delay_s
        record = TalkRecord(
            id=talk_id,
            source=source,
            audio=audio,
            created_at=time.time(),
            stage_delay_s=delay,
            outcome=outcome,
            video_path=self.storage / "talks" / f"{talk_id}.mp4",
        )
        with self._lock:
            self.talks[talk_id] = record
        self._save()
        if outcome.outcome == "done":
            self._start_render(record)
        return record

    def _start_render(self, record: TalkRecord) -> None:
        thread = threading.Thread(target=self._render, args=(record,), name=f"render-{record.id}", daemon=True)
        with self._lock:
            self._renders.add(thread)
        thread.start()

    def wait_for_renders(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s`` in all) for the renders under way; whether none is left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            running = list(self._renders)
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in running)

    def _targeted_outcome(self, source_url: str, index: int) -> TalkOutcome | None:
        """The first targeted outcome matching this talk (under the lock)."""
        for outcome in self.targeted_outcomes:
            if outcome.matches(source_url, index):
                outcome.fired += 1
                return outcome
        return None

    def talk(self, talk_id: str) -> TalkRecord | None:
        with self._lock:
            return self.talks.get(talk_id)

    def recent_talks(self, limit: int) -> list[TalkRecord]:
        """Newest first, as D-ID's GET /talks lists them."""
        with self._lock:
            return sorted(self.talks.values(), key=lambda t: t.created_at, reverse=True)[:limit]

    def _render(self, record: TalkRecord) -> None:
        try:
            record.video_path.parent.mkdir(parents=True, exist_ok=True)
            render_talk(record.source.path, record.audio.path, record.video_path)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as the talk's error
            record.render_error = f"{type(exc).__name__}: {exc}"
            self._save()  # the error is the talk's status from now on, also after a restart
        finally:
            record.rendered.set()
            with self._lock:
                self._renders.discard(threading.current_thread())

    # ----------------------------------------------------------------- persistence

    def _save(self) -> None:
        if not self.persist:
            return
        with self._save_lock:
            with self._lock:
                document = {
                    "version": STATE_VERSION,
                    "talks_created": self._talks_created,
                    "uploads": [self._upload_json(u) for u in self.uploads.values()],
                    "talks": [self._talk_json(t) for t in self.talks.values()],
                }
            _write_json_atomically(self.storage / STATE_FILE, document)

    def _upload_json(self, upload: Upload) -> dict[str, Any]:
        path = str(upload.path.relative_to(self.storage))
        return {"id": upload.id, "kind": upload.kind, "path": path, "url": upload.url}

    def _talk_json(self, talk: TalkRecord) -> dict[str, Any]:
        outcome = talk.outcome
        return {
            "id": talk.id,
            "source_url": talk.source.url,
            "audio_url": talk.audio.url,
            "created_at": talk.created_at,
            "stage_delay_s": talk.stage_delay_s,
            "outcome": {"outcome": outcome.outcome, "kind": outcome.kind, "description": outcome.description},
            "video_path": str(talk.video_path.relative_to(self.storage)),
            "render_error": talk.render_error,
        }

    def _load(self) -> None:
        """The uploads and talks a previous emulator on this folder saved (none if it saved none).
        A finished talk whose result is missing (the stop cut its rendering short) renders again."""
        path = self.storage / STATE_FILE
        if not path.exists():
            return
        document = json.loads(path.read_text())
        if document.get("version") != STATE_VERSION:
            found = document.get("version")
            raise ValueError(f"{path} has state version {found!r}; this emulator reads {STATE_VERSION}")
        to_render: list[TalkRecord] = []
        with self._lock:
            self._talks_created = int(document.get("talks_created", 0))
            for item in document["uploads"]:
                upload = Upload(id=item["id"], kind=item["kind"], path=self.storage / item["path"], url=item["url"])
                self.uploads[upload.url] = upload
            for item in document["talks"]:
                record = TalkRecord(
                    id=item["id"],
                    source=self.uploads[item["source_url"]],
                    audio=self.uploads[item["audio_url"]],
                    created_at=float(item["created_at"]),
                    stage_delay_s=float(item["stage_delay_s"]),
                    outcome=TalkOutcome(**item["outcome"]),
                    video_path=self.storage / item["video_path"],
                    render_error=item.get("render_error"),
                )
                if record.outcome.outcome != "done" or record.render_error or record.video_path.exists():
                    record.rendered.set()
                else:
                    to_render.append(record)
                self.talks[record.id] = record
        for record in to_render:
            self._start_render(record)


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    _write_atomically(path, json.dumps(document).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
