"""API keys: made random, shown once, stored as a hash, checked against the shared store.

A key reads ``fwk_<key id>_<secret>``: the key id (12 hex characters, not secret) is how the
store finds the key and how logs, audit lines and ``framewise admin keys list`` name it; the
secret is 32 random bytes (``secrets.token_urlsafe``, 43 characters). The store keeps the
SHA-256 of the whole key string, never the key.

Why SHA-256 and not bcrypt/scrypt/argon2: those are slow on purpose, to make guessing a
*password* (a few tens of bits of human choice) from a stolen hash expensive. A key here has
256 random bits; no number of hash evaluations finds it from its SHA-256, so a slow hash would
protect nothing and would cost tens of milliseconds on every authenticated call (the budget is
well under a millisecond). The comparison is constant-time (hmac.compare_digest), so timing
does not reveal how much of a guessed hash matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from server.jobs.store.protocol import ApiKeyRecord

__all__ = ["KEY_LENGTH", "KEY_PREFIX", "NewKey", "ParsedKey", "generate_key", "hash_key", "key_state", "parse_key", "verify_secret"]

KEY_PREFIX = "fwk_"
_KEY_ID_HEX = 12  # 48 bits: enough that two keys never share an id (the store refuses a repeat)
_SECRET_BYTES = 32  # 256 bits
_KEY_RE = re.compile(r"fwk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
# Every key is exactly this long: prefix, 12-character id, "_", 43-character secret.
KEY_LENGTH = len(KEY_PREFIX) + _KEY_ID_HEX + 1 + 43


@dataclass(frozen=True)
class NewKey:
    """A key just made: ``key`` is shown once to whoever asked for it, then only its hash exists."""

    key: str
    key_id: str
    secret_hash: str


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    key: str


def generate_key() -> NewKey:
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    return NewKey(key=key, key_id=key_id, secret_hash=hash_key(key))


def hash_key(key: str) -> str:
    """Hex SHA-256 of the whole key (the id included, so a hash is bound to its id)."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(token: str) -> ParsedKey | None:
    """The key id of a token shaped like one of our keys; None for anything else (then the
    token may be a JWT)."""
    match = _KEY_RE.fullmatch(token)
    return None if match is None else ParsedKey(key_id=match.group(1), key=token)


def verify_secret(key: str, record: ApiKeyRecord) -> bool:
    """Whether ``key`` is the key ``record`` was made from (constant-time in the hash)."""
    return hmac.compare_digest(hash_key(key), record.secret_hash)


def key_state(record: ApiKeyRecord, now: datetime) -> str:
    """"ok", "revoked" or "expired" (what the audit line says; the caller is told none of it)."""
    if record.revoke_time is not None:
        return "revoked"
    if record.expire_time is not None and record.expire_time <= now:
        return "expired"
    return "ok"
