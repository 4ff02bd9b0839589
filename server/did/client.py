"""Typed async client for the D-ID talks API (photo + audio -> talking video).

Every call goes through one retry loop: 429, 5xx, timeouts and connection errors are retried
with exponential backoff and full jitter (capped), honouring ``Retry-After``; 402 and other 4xx
fail at once. Failures surface as :class:`DIDError` with an error class the job pipeline acts on.
No module state: the HTTP client, clock (``sleep``) and randomness (``rng``) are injected.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Self

import httpx

from server.did.errors import API_KEY_ENV, DIDError

TalkStatus = Literal["created", "started", "done", "error", "rejected"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"done", "error", "rejected"})
# A talk that ended in one of these can never become a video: never adopted for a retry.
FAILED_STATUSES: frozenset[str] = frozenset({"error", "rejected"})
_KNOWN_STATUSES: frozenset[str] = frozenset({"created", "started", "done", "error", "rejected"})

OnRetry = Callable[[int, DIDError, float], Any]
Sleep = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True)
class Talk:
    id: str
    status: TalkStatus
    result_url: str | None = None
    error_kind: str | None = None
    error_description: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class DIDClient:
    """Async D-ID client. Use as ``async with DIDClient(...) as did:`` or call :meth:`aclose`.

    ``http`` may be a shared ``httpx.AsyncClient`` (it is then not closed here); the client's own
    timeout (``timeout_s``, per connect/read/write/pool phase) is applied to every request.
    ``on_retry(attempt, error, delay_s)`` runs before each retry sleep; it may be async.
    """

    def __init__(
        self,
        base_url: str = "https://api.d-id.com",
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 8.0,
        max_retry_after_s: float = 60.0,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        on_retry: OnRetry | None = None,
        http: httpx.AsyncClient | None = None,
        landing_wait_s: float | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise DIDError(
                None,
                "ConfigurationError",
                "no D-ID API key configured",
                "permanent",
                False,
                hint=f"Set {API_KEY_ENV} to the API key from the D-ID studio (Account settings > API key)",
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if backoff_base_s < 0 or backoff_cap_s < 0:
            raise ValueError("backoff_base_s and backoff_cap_s must be >= 0")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Basic {api_key.strip()}", "Accept": "application/json"}
        self._timeout = httpx.Timeout(timeout_s)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        # How long a POST /talks that failed without a clear answer gets to land before the
        # client looks for its talk (see create_talk); default: one timeout.
        self.landing_wait_s = timeout_s if landing_wait_s is None else landing_wait_s
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._on_retry = on_retry
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=self._timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # ----------------------------------------------------------------------------------- API

    async def upload_image(self, data: bytes, filename: str, content_type: str) -> str:
        """Upload a source photo; returns its D-ID URL (``s3://...``) for :meth:`create_talk`."""
        return await self._upload("/images", "image", data, filename, content_type)

    async def upload_audio(self, data: bytes, filename: str, content_type: str) -> str:
        """Upload a voice track (wav/mp3); returns its D-ID URL for :meth:`create_talk`."""
        return await self._upload("/audios", "audio", data, filename, content_type)

    async def create_talk(self, source_url: str, audio_url: str) -> str:
        """Start rendering a talk from two uploads; returns its id, one talk per pair of uploads.

        D-ID has no idempotency key and bills a talk when it is created. Upload URLs are unique per
        upload, so a talk listed with these URLs is ours: the client adopts it instead of posting
        (a job resumed after a crash, a stage retried after a failed attempt), unless it ended in
        ``error``/``rejected`` (polling it again can only fail again), and when a POST
        fails without an answer that rules creation out (a timeout, a dropped connection, a 5xx)
        it gives that request ``landing_wait_s`` to land and looks again before posting anew.
        A talk that lands even later than that can still make a second one."""
        try:
            existing = await self.find_talk(source_url, audio_url)
        except DIDError:
            existing = None  # the lookup only avoids a duplicate; the POST says what is wrong
        if existing is not None:
            return existing

        async def landed() -> httpx.Response | None:
            await self._sleep(self.landing_wait_s)
            try:
                talk_id = await self.find_talk(source_url, audio_url)
                if talk_id is None:
                    return None
                return await self._http.get(f"{self.base_url}/talks/{talk_id}", headers=self._headers, timeout=self._timeout)
            except (DIDError, httpx.HTTPError):
                return None  # cannot tell: post again, as without the lookup

        body = {"source_url": source_url, "script": {"type": "audio", "audio_url": audio_url}}
        payload = await self._json_call("POST", "/talks", "create talk", expect=(200, 201), json=body, landed=landed)
        talk_id = payload.get("id")
        if not isinstance(talk_id, str) or not talk_id:
            raise _protocol_error("create talk", f"response has no talk id: {_clip(payload)}")
        return talk_id

    async def find_talk(self, source_url: str, audio_url: str) -> str | None:
        """The newest of the account's latest 100 talks made from these uploads that did not end
        in failure (it is rendering, or done); None if none."""
        payload = await self._json_call("GET", "/talks", "list talks", expect=(200,), params={"limit": 100})
        talks = payload.get("talks")
        if not isinstance(talks, list):
            raise _protocol_error("list talks", f"response has no talks list: {_clip(payload)}")
        for talk in talks:
            if (
                isinstance(talk, dict)
                and talk.get("source_url") == source_url
                and talk.get("audio_url", audio_url) == audio_url  # not every listing carries it
                and isinstance(talk.get("id"), str)
                and talk.get("status") not in FAILED_STATUSES
            ):
                return str(talk["id"])
        return None

    async def get_talk(self, talk_id: str) -> Talk:
        payload = await self._json_call("GET", f"/talks/{talk_id}", f"get talk {talk_id}", expect=(200,))
        return _parse_talk(talk_id, payload)

    async def wait_for_talk(self, talk_id: str, *, poll_interval_s: float = 2.0, timeout_s: float = 600.0) -> Talk:
        """Poll until the talk is done; raise :class:`DIDError` if it ends in error/rejected or
        does not finish within ``timeout_s``. Cancelling the awaiting task stops polling at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            talk = await self.get_talk(talk_id)
            if talk.status == "done":
                if not talk.result_url:
                    raise _protocol_error(f"talk {talk_id}", "talk is done but has no result_url")
                return talk
            if talk.status == "rejected":
                raise DIDError(
                    None,
                    talk.error_kind or "TalkRejected",
                    talk.error_description or "D-ID rejected the talk",
                    "permanent",
                    False,
                    operation=f"talk {talk_id}",
                    hint="D-ID refused the inputs (e.g. content moderation or no face found); use another photo or audio",
                    talk_ended=True,
                )
            if talk.status == "error":
                raise DIDError(
                    None,
                    talk.error_kind or "TalkError",
                    talk.error_description or "D-ID failed to render the talk",
                    "external",
                    False,
                    operation=f"talk {talk_id}",
                    hint="D-ID failed while rendering; creating a new talk may succeed if the cause was transient",
                    talk_ended=True,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DIDError(
                    None,
                    "TalkTimeout",
                    f"talk {talk_id} still '{talk.status}' after {timeout_s:g} s",
                    "recoverable",
                    True,
                    operation=f"wait for talk {talk_id}",
                    hint="The talk may still finish: wait again with the same id or raise the wait timeout",
                )
            await self._sleep(min(poll_interval_s, remaining))

    async def download(self, url: str) -> bytes:
        """Fetch a result (``result_url`` is a pre-signed URL: no Authorization header is sent)."""

        async def call() -> httpx.Response:
            return await self._http.get(url, timeout=self._timeout, follow_redirects=True)

        response = await self._with_retries("download result", call, expect=(200,))
        return response.content

    # ------------------------------------------------------------------------------ plumbing

    async def _upload(self, path: str, field: str, data: bytes, filename: str, content_type: str) -> str:
        if not data:
            raise DIDError(
                None,
                "ValidationError",
                f"empty {field} file {filename!r}",
                "permanent",
                False,
                operation=f"upload {field}",
            )
        files = {field: (filename, data, content_type)}
        payload = await self._json_call("POST", path, f"upload {field}", expect=(200, 201), files=files)
        url = payload.get("url")
        if not isinstance(url, str) or not url:
            raise _protocol_error(f"upload {field}", f"response has no url: {_clip(payload)}")
        return url

    async def _json_call(
        self,
        method: str,
        path: str,
        operation: str,
        *,
        expect: tuple[int, ...],
        landed: Callable[[], Awaitable[httpx.Response | None]] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        url = f"{self.base_url}{path}"

        async def call() -> httpx.Response:
            return await self._http.request(method, url, headers=self._headers, timeout=self._timeout, **kwargs)

        response = await self._with_retries(operation, call, expect=expect, landed=landed)
        try:
            payload = response.json()
        except ValueError:
            raise _protocol_error(operation, f"response is not JSON: {_clip(response.text)}") from None
        if not isinstance(payload, dict):
            raise _protocol_error(operation, f"response is not a JSON object: {_clip(payload)}")
        return payload

    async def _with_retries(
        self,
        operation: str,
        call: Callable[[], Awaitable[httpx.Response]],
        *,
        expect: tuple[int, ...],
        landed: Callable[[], Awaitable[httpx.Response | None]] | None = None,
    ) -> httpx.Response:
        """``call`` until it answers one of ``expect``, retrying what may succeed. ``landed``: for
        a call that is not idempotent, asked before a retry of a failure that may have done the
        work anyway (no answer, or a 5xx); a response it returns is the call's result."""
        attempt = 1
        while True:
            try:
                response = await call()
            except httpx.TimeoutException as exc:
                error = DIDError(
                    None,
                    "Timeout",
                    f"no answer within {self.timeout_s:g} s ({type(exc).__name__})",
                    "recoverable",
                    True,
                    operation=operation,
                    hint=f"Check connectivity to {self.base_url} or raise the D-ID timeout",
                )
            except httpx.TransportError as exc:
                error = DIDError(
                    None,
                    "ConnectionError",
                    f"{type(exc).__name__}: {exc}",
                    "recoverable",
                    True,
                    operation=operation,
                    hint=f"Check that {self.base_url} is reachable from this host",
                )
            else:
                if response.status_code in expect:
                    return response
                error = _http_error(operation, response)
            if not error.retryable or attempt >= self.max_attempts:
                raise error.with_attempts(attempt)
            delay = self._backoff(attempt, error.retry_after_s)
            if self._on_retry is not None:
                result = self._on_retry(attempt, error, delay)
                if asyncio.iscoroutine(result):
                    await result
            await self._sleep(delay)
            if landed is not None and (error.status is None or error.status >= 500):
                found = await landed()
                if found is not None and found.status_code in expect:
                    return found
            attempt += 1

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1``: Retry-After when given, else full jitter."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2 ** (attempt - 1)))
        return self._rng.uniform(0.0, ceiling)


# --------------------------------------------------------------------------------- helpers


def _http_error(operation: str, response: httpx.Response) -> DIDError:
    status = response.status_code
    kind, description = _error_body(response)
    retry_after = _retry_after_s(response.headers.get("Retry-After"))
    common: dict[str, Any] = {"operation": operation, "retry_after_s": retry_after}
    if status == 429:
        return DIDError(
            status,
            kind,
            description,
            "external",
            True,
            **common,
            hint="D-ID rate limit: lower the number of concurrent talks per API key",
        )
    if status >= 500:
        return DIDError(
            status, kind, description, "external", True, **common, hint="D-ID is unavailable or failing; retry later"
        )
    if status == 402:
        return DIDError(
            status,
            kind,
            description,
            "resource",
            False,
            **common,
            hint="The D-ID account is out of credits; add credits in the D-ID studio, then retry the job",
        )
    if status == 401:
        return DIDError(
            status,
            kind,
            description,
            "permanent",
            False,
            **common,
            hint=f"The D-ID API key was rejected; set {API_KEY_ENV} to a valid key from the D-ID studio",
        )
    if status == 403:
        return DIDError(
            status,
            kind,
            description,
            "permanent",
            False,
            **common,
            hint=f"The D-ID API key in {API_KEY_ENV} is not allowed to do this (plan or permissions)",
        )
    if status == 404:
        return DIDError(
            status,
            kind,
            description,
            "permanent",
            False,
            **common,
            hint="The D-ID resource does not exist (wrong id, or it expired)",
        )
    if 400 <= status < 500:
        return DIDError(
            status,
            kind,
            description,
            "permanent",
            False,
            **common,
            hint="D-ID refused the request; fix the input named in the description",
        )
    return DIDError(
        status, kind, description, "external", False, **common, hint=f"unexpected HTTP status {status} from D-ID"
    )


def _error_body(response: httpx.Response) -> tuple[str, str]:
    default_kind = f"HTTP{response.status_code}"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return default_kind, _clip(text) if text else response.reason_phrase
    if isinstance(body, dict):
        kind = body.get("kind") or default_kind
        description = body.get("description") or body.get("message") or response.reason_phrase
        return str(kind), _clip(str(description))
    return default_kind, _clip(str(body))


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_talk(talk_id: str, payload: dict[str, Any]) -> Talk:
    status = payload.get("status")
    if status not in _KNOWN_STATUSES:
        raise _protocol_error(f"get talk {talk_id}", f"unknown talk status {status!r}")
    error = payload.get("error")
    kind = description = None
    if isinstance(error, dict):
        kind = error.get("kind")
        description = error.get("description")
    elif isinstance(error, str):
        description = error
    result_url = payload.get("result_url")
    return Talk(
        id=str(payload.get("id") or talk_id),
        status=status,
        result_url=result_url if isinstance(result_url, str) and result_url else None,
        error_kind=str(kind) if kind else None,
        error_description=str(description) if description else None,
    )


def _protocol_error(operation: str, description: str) -> DIDError:
    return DIDError(
        None,
        "ProtocolError",
        description,
        "external",
        False,
        operation=operation,
        hint="D-ID answered in an unexpected shape; the API may have changed",
    )


def _clip(value: object, limit: int = 500) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
