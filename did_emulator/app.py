"""A local D-ID talks API over real HTTP (``http.server.ThreadingHTTPServer``), with fault injection.

API (as D-ID): POST /images, POST /audios (multipart ``image``/``audio``), POST /talks, GET
/talks/{id}, GET /talks?limit=N (newest first); every call needs ``Authorization: Basic <api-key>``. Results are served, without
auth, at the ``result_url`` the talk carries once done. Control (no auth, not logged):
POST /_emulator/faults, POST /_emulator/reset, GET /_emulator/requests.

A fault spec is either an HTTP fault ({method, path, status | delay_s, kind, description,
retry_after, times}) or a talk outcome ({talk_outcome: done|error|rejected, kind, description,
stage_delay_s}): the next talk's, or, with ``source_url`` (fnmatch pattern) and/or
``talk_index`` (n-th talk since reset, from 1), the matching talks' (``times`` of them).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from did_emulator.media import MediaError, check_audio, check_image
from did_emulator.multipart import MultipartError, parse_multipart
from did_emulator.state import TalkRecord

if TYPE_CHECKING:
    from did_emulator.server import EmulatorServer

MAX_BODY_BYTES = 50 * 1024 * 1024
DEFAULT_KINDS = {
    400: "ValidationError",
    401: "AuthorizationError",
    402: "InsufficientCreditsError",
    404: "NotFoundError",
    413: "PayloadTooLargeError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
UPLOAD_FIELDS = {"/images": "image", "/audios": "audio"}


class ApiError(Exception):
    def __init__(self, status: int, description: str, kind: str | None = None) -> None:
        super().__init__(description)
        self.status, self.description = status, description
        self.kind = kind or DEFAULT_KINDS.get(status, "Error")


class Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------------- dispatch

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        self._body_read = False  # one handler serves every request of a keep-alive connection
        entry: dict[str, Any] | None = None
        try:
            if path.startswith("/_emulator/"):
                self._control(method, path)
                return
            entry = state.log(method, path)
            fault = state.take_fault(method, path)
            if fault is not None and fault.delay_s > 0 and self.server.stopping.wait(fault.delay_s):
                return
            if fault is not None and fault.status is not None:
                self._drain_body()
                headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                entry["status"] = fault.status
                self._send_error(ApiError(fault.status, fault.description or "injected fault", fault.kind), headers)
                return
            status = self._route(method, path)
            entry["status"] = status
        except ApiError as exc:
            self._drain_body()
            if entry is not None:
                entry["status"] = exc.status
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during an injected delay)

    def _route(self, method: str, path: str) -> int:
        if method == "GET" and path.startswith("/results/"):
            return self._get_result(path.removeprefix("/results/"))
        self._check_auth()
        if method == "POST" and path in UPLOAD_FIELDS:
            return self._upload(UPLOAD_FIELDS[path])
        if method == "POST" and path == "/talks":
            return self._create_talk()
        if method == "GET" and path.startswith("/talks/") and path.count("/") == 2:
            return self._get_talk(path.removeprefix("/talks/"))
        if method == "GET" and path == "/talks":
            return self._list_talks()
        raise ApiError(404, f"no route for {method} {path}")

    def _check_auth(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme != "Basic" or not credentials.strip():
            raise ApiError(401, "missing 'Authorization: Basic <api-key>' header")
        if self.server.api_key is not None and credentials.strip() != self.server.api_key:
            raise ApiError(401, "invalid API key")

    # ------------------------------------------------------------------------- endpoints

    def _upload(self, field_name: str) -> int:
        body = self._read_body()
        try:
            parts = parse_multipart(self.headers.get("Content-Type", ""), body)
        except MultipartError as exc:
            raise ApiError(400, str(exc)) from None
        part = parts.get(field_name)
        if part is None or not part.data:
            raise ApiError(400, f"missing multipart file field '{field_name}'")
        try:
            if field_name == "image":
                check_image(part.data)
            else:
                check_audio(part.data)
        except MediaError as exc:
            raise ApiError(400, str(exc)) from None
        upload = self.server.state.store_upload(field_name, part.filename, part.data)
        return self._send_json(201, {"id": upload.id, "url": upload.url})

    def _create_talk(self) -> int:
        try:
            payload = json.loads(self._read_body() or b"null")
        except ValueError:
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "request body must be a JSON object")
        state = self.server.state
        source = state.upload_by_url(payload.get("source_url"))
        if source is None or source.kind != "image":
            raise ApiError(400, f"source_url {payload.get('source_url')!r} is not an image uploaded to POST /images")
        script = payload.get("script")
        if not isinstance(script, dict) or script.get("type") != "audio":
            raise ApiError(400, "script must be {type: 'audio', audio_url} (the emulator has no text-to-speech)")
        audio = state.upload_by_url(script.get("audio_url"))
        if audio is None or audio.kind != "audio":
            raise ApiError(400, f"script.audio_url {script.get('audio_url')!r} is not audio uploaded to POST /audios")
        talk = state.create_talk(source, audio)
        return self._send_json(201, {"id": talk.id, "object": "talk", "created_at": _now_iso(), "status": "created"})

    def _get_talk(self, talk_id: str) -> int:
        talk = self.server.state.talk(talk_id)
        if talk is None:
            raise ApiError(404, f"talk {talk_id!r} not found")
        return self._send_json(200, self._talk_json(talk))

    def _list_talks(self) -> int:
        query = parse_qs(urlsplit(self.path).query)
        try:
            limit = int(query.get("limit", ["100"])[0])
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be within 1..100")
        talks = [self._talk_json(t) for t in self.server.state.recent_talks(limit)]
        return self._send_json(200, {"talks": talks})

    def _talk_json(self, talk: TalkRecord) -> dict[str, Any]:
        status = talk.status(time.time())
        body: dict[str, Any] = {
            "id": talk.id,
            "object": "talk",
            "status": status,
            "source_url": talk.source.url,
            "audio_url": talk.audio.url,
        }
        if status == "done":
            body["result_url"] = f"http://{self._host()}/results/{talk.id}.mp4"
        elif status == "rejected":
            body["error"] = {
                "kind": talk.outcome.kind or "ContentModerationError",
                "description": talk.outcome.description or "the source image was rejected by moderation",
            }
        elif status == "error":
            body["error"] = {
                "kind": talk.outcome.kind or "InternalServerError",
                "description": talk.outcome.description or talk.render_error or "rendering failed",
            }
        return body

    def _get_result(self, name: str) -> int:
        talk = self.server.state.talk(name.removesuffix(".mp4"))
        if talk is None or talk.status(time.time()) != "done":
            raise ApiError(404, f"result {name!r} not found (talk unknown or not done)")
        data = talk.video_path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return 200

    def _control(self, method: str, path: str) -> None:
        state = self.server.state
        if method == "POST" and path == "/_emulator/faults":
            try:
                spec = json.loads(self._read_body() or b"{}")
                self._send_json(201, state.add_fault(spec))
            except (ValueError, TypeError) as exc:
                raise ApiError(400, f"bad fault spec: {exc}") from None
        elif method == "POST" and path == "/_emulator/reset":
            self._drain_body()
            state.reset()
            self._send_json(200, {"reset": True})
        elif method == "GET" and path == "/_emulator/requests":
            self._send_json(200, state.snapshot())
        else:
            raise ApiError(404, f"no control route for {method} {path}")

    # ------------------------------------------------------------------------- plumbing

    def _host(self) -> str:
        host, port = self.server.server_address[:2]
        return self.headers.get("Host") or f"{host}:{port}"

    def _read_body(self) -> bytes:
        if getattr(self, "_body_read", False):
            return b""
        self._body_read = True
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"body of {length} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
        return self.rfile.read(length) if length > 0 else b""

    def _drain_body(self) -> None:
        try:
            self._read_body()
        except ApiError:
            pass

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        data = json.dumps(body).encode()
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        return status

    def _send_error(self, exc: ApiError, headers: dict[str, str] | None = None) -> None:
        self._send_json(exc.status, {"kind": exc.kind, "description": exc.description}, headers)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
