"""The one error the D-ID client raises, classified for the job pipeline.

Error classes: ``recoverable`` (a transient network failure: retry with backoff),
``permanent`` (bad input or configuration: fail fast with a clear message), ``resource`` (out
of credits: queue and alert, do not retry now) and ``external`` (D-ID rate limits or outages:
retry with backoff).
"""

from __future__ import annotations

from typing import Literal

ErrorClass = Literal["recoverable", "permanent", "resource", "external"]

API_KEY_ENV = "FRAMEWISE_DID_API_KEY"


class DIDError(Exception):
    """A failed D-ID call.

    ``status`` is the HTTP status (``None`` for timeouts, connection errors and talks that ended
    in ``error``/``rejected``); ``kind``/``description`` come from D-ID's JSON error body when it
    sent one; ``retryable`` says whether repeating the same call may succeed; ``attempts`` is how
    many times the client tried before giving up; ``talk_ended`` is true when the talk itself
    ended in ``error``/``rejected`` (a retry needs a new talk), false when only a call failed (the
    talk may still be rendering: a retry polls the same one).
    """

    def __init__(
        self,
        status: int | None,
        kind: str,
        description: str,
        error_class: ErrorClass,
        retryable: bool,
        *,
        operation: str = "",
        hint: str = "",
        attempts: int = 1,
        retry_after_s: float | None = None,
        talk_ended: bool = False,
    ) -> None:
        self.status = status
        self.kind = kind
        self.description = description
        self.error_class: ErrorClass = error_class
        self.retryable = retryable
        self.operation = operation
        self.hint = hint
        self.attempts = attempts
        self.retry_after_s = retry_after_s
        self.talk_ended = talk_ended
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"D-ID {self.operation} failed" if self.operation else "D-ID call failed"
        status = f"HTTP {self.status} " if self.status is not None else ""
        text = f"{where}: {status}{self.kind}: {self.description}".rstrip()
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        if self.hint:
            text += f". {self.hint}"
        return text

    def with_attempts(self, attempts: int) -> DIDError:
        """The same error, recording how many attempts were made."""
        return DIDError(
            self.status,
            self.kind,
            self.description,
            self.error_class,
            self.retryable,
            operation=self.operation,
            hint=self.hint,
            attempts=attempts,
            retry_after_s=self.retry_after_s,
            talk_ended=self.talk_ended,
        )

    def __repr__(self) -> str:
        return (
            f"DIDError(status={self.status!r}, kind={self.kind!r}, error_class={self.error_class!r}, "
            f"retryable={self.retryable!r}, attempts={self.attempts!r})"
        )
