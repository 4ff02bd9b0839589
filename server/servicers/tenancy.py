"""The caller's tenant as the servicers use it: who owns what a call creates, whose resources it
may reach, and what happens when it reaches for another tenant's.

Servicers are the only layer that reads the call's principal; they pass its tenant down as an
argument (job store, uploads, tracking sessions). Another tenant's resource is answered
exactly as one that does not exist (existence is not leaked), and the attempt goes to the
audit trail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import Message

from server.auth import audit
from server.auth.principal import Principal, current_principal
from server.jobs.files.uploads import tenant_media_root

__all__ = ["caller", "cross_tenant", "media_root", "upload_fields"]


def caller() -> Principal:
    """The principal of the call in progress (ANONYMOUS while authentication is off)."""
    return current_principal()


def cross_tenant(resource: str) -> None:
    """The caller reached for ``resource`` of another tenant: one audit line (the caller's
    tenant, key and method come from the call)."""
    audit.cross_tenant(tenant=caller().tenant, resource=resource)


def media_root(root: Path | None, principal: Principal) -> Path | None:
    """Where this caller's ``server_path`` resolves: ``<root>/<tenant>/`` for an authenticated
    caller, the root itself while authentication is off (the anonymous caller)."""
    return tenant_media_root(root, principal.tenant, authenticated=principal.via != "anonymous")


def upload_fields(message: Message, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(field path, upload id)`` for every upload a request names (fields ``upload_id`` and
    ``*_upload_id``, nested messages included), so a submit can check that each is the caller's
    whatever request type or nesting a job kind uses."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for item in items:
                if isinstance(item, Message):  # map entries of scalars are not
                    yield from upload_fields(item, f"{path}.")
        elif field.type == field.TYPE_STRING and (field.name == "upload_id" or field.name.endswith("_upload_id")):
            if not field.is_repeated and value:
                yield path, value
