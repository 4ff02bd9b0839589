"""Attacks on authorization: a valid key of the right tenant that lacks the scope of the RPC it
calls gets PERMISSION_DENIED naming that scope, for every RPC that needs one, and the server
answers the next valid call. The keys (made by `framewise admin keys create --scope ...`) each
hold every family but one.
"""

from __future__ import annotations

import grpc
import pytest

from tests.e2e.attacks.conftest import ALL_BUT
from tests.e2e.attacks.secure_server import Rpc, SecureServer, all_rpcs, assert_serves, invoke, refusal

# The scope each RPC needs, as the API promises it (one family per RPC): stated here rather than
# read from the server's table, so a change in the server's table shows up as a failing case.
FAMILY = {
    "VisionService.Detect": "vision",
    "VisionService.RemoveBackground": "vision",
    "VisionService.Segment": "vision",
    "TrackingService.Track": "tracking",
    "JobService.UploadFile": "jobs:write",
    "JobService.SegmentVideo": "jobs:write",
    "JobService.CreateTalkingVideo": "jobs:write",
    "JobService.WatchOperation": "jobs:read",
    "JobService.DownloadArtifact": "jobs:read",
    "JobService.GetStorageStats": "jobs:read",
    "Operations.GetOperation": "jobs:read",
    "Operations.ListOperations": "jobs:read",
    "Operations.WaitOperation": "jobs:read",
    "Operations.CancelOperation": "jobs:write",
    "Operations.DeleteOperation": "jobs:write",
}
SCOPED = [r for r in all_rpcs() if str(r) in FAMILY]


def test_every_rpc_but_server_info_has_a_family_here() -> None:
    assert {str(r) for r in all_rpcs()} - set(FAMILY) == {"InfoService.GetServerInfo"}


@pytest.mark.parametrize("rpc", SCOPED, ids=str)
def test_a_key_without_the_scope_is_permission_denied_naming_it(secure: SecureServer, tls: grpc.Channel, rpc: Rpc) -> None:
    scope = FAMILY[str(rpc)]
    error = refusal(lambda: invoke(tls, rpc, metadata=secure.as_key(f"no-{scope}")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (error.code(), error.details())
    assert f"'{scope}'" in (error.details() or ""), error.details()
    assert_serves(secure, tls)


@pytest.mark.parametrize("scope", sorted(ALL_BUT), ids=str)
def test_the_same_key_keeps_the_scopes_it_has(secure: SecureServer, tls: grpc.Channel, scope: str) -> None:
    """Control: a key lacking one family is not refused for the families it holds (GetStorageStats
    needs jobs:read, Detect with no image needs vision and is INVALID_ARGUMENT past authorization)."""
    rpc = next(r for r in SCOPED if FAMILY[str(r)] != scope and str(r) in ("JobService.GetStorageStats", "VisionService.Detect"))
    try:
        invoke(tls, rpc, metadata=secure.as_key(f"no-{scope}"))
    except grpc.RpcError as exc:
        assert exc.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), exc.details()
    assert_serves(secure, tls)
