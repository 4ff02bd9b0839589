"""Which scope each RPC needs: one table from the full method name to its scope.

Families: ``vision`` (the image RPCs), ``tracking`` (Track), ``jobs:read`` (watch, download,
list and get operations, storage stats), ``jobs:write`` (upload, submit, cancel, delete).
``admin`` covers key and quota administration. ``None``: any authenticated caller (server
info; health and reflection when they are not left open). A method missing from the table
needs ``admin`` (fail closed); tests/unit/test_auth_interceptor.py checks that every method of every
service the server offers is in it.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.auth.principal import SCOPES

__all__ = ["DEFAULT_OPEN_PREFIXES", "METHOD_SCOPES", "UNLISTED_SCOPE", "is_open", "required_scope"]

_VISION = "/framewise.v1.VisionService/"
_TRACKING = "/framewise.v1.TrackingService/"
_JOBS = "/framewise.v1.JobService/"
_OPERATIONS = "/google.longrunning.Operations/"

METHOD_SCOPES: Mapping[str, str | None] = {
    f"{_VISION}Detect": "vision",
    f"{_VISION}RemoveBackground": "vision",
    f"{_VISION}Segment": "vision",
    f"{_TRACKING}Track": "tracking",
    f"{_JOBS}UploadFile": "jobs:write",
    f"{_JOBS}SegmentVideo": "jobs:write",
    f"{_JOBS}CreateTalkingVideo": "jobs:write",
    f"{_JOBS}WatchOperation": "jobs:read",
    f"{_JOBS}DownloadArtifact": "jobs:read",
    f"{_JOBS}GetStorageStats": "jobs:read",
    f"{_OPERATIONS}GetOperation": "jobs:read",
    f"{_OPERATIONS}ListOperations": "jobs:read",
    f"{_OPERATIONS}WaitOperation": "jobs:read",
    f"{_OPERATIONS}CancelOperation": "jobs:write",
    f"{_OPERATIONS}DeleteOperation": "jobs:write",
    # What `framewise info` shows: every caller may ask which models are ready.
    "/framewise.v1.InfoService/GetServerInfo": None,
    "/grpc.health.v1.Health/Check": None,
    "/grpc.health.v1.Health/Watch": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": None,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": None,
}

# Fail closed: a method someone added without a table entry needs the strongest scope.
UNLISTED_SCOPE = "admin"

# Answered without credentials unless configured otherwise (--auth-open-methods): a load
# balancer's health checks carry no key, and reflection describes only the public API.
DEFAULT_OPEN_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")

assert all(s is None or s in SCOPES for s in METHOD_SCOPES.values())


def required_scope(method: str) -> str | None:
    return METHOD_SCOPES.get(method, UNLISTED_SCOPE)


def is_open(method: str, open_prefixes: tuple[str, ...]) -> bool:
    return bool(open_prefixes) and method.startswith(open_prefixes)
