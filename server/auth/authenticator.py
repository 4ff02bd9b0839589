"""From what a call presents (its ``authorization`` metadata, its verified client certificate)
to a Principal, or a refusal with a reason the audit line records and the caller never sees."""

from __future__ import annotations

from typing import NamedTuple

from server.auth.jwt_bearer import MAX_TOKEN_BYTES, JwtVerifier
from server.auth.key_verifier import ApiKeyVerifier
from server.auth.keys import KEY_PREFIX
from server.auth.mtls import TenantMap
from server.auth.principal import Principal
from server.transport.identity import ClientIdentity

__all__ = ["Authenticator", "Verdict"]


class Verdict(NamedTuple):
    principal: Principal | None
    # How the caller tried: "api_key", "jwt", "mtls", or "none" (nothing presented, or a token
    # of no known kind): the bounded `via` label of framewise_auth_total.
    via: str
    # Who the credential names, for the audit line (a key id, a JWT subject, a certificate
    # identity; never the secret).
    subject: str
    reason: str
    tenant: str = ""
    # Whether any credential was presented: a refusal then says "not accepted", else "missing".
    presented: bool = False


class Authenticator:
    def __init__(
        self,
        *,
        keys: ApiKeyVerifier | None,
        jwt: JwtVerifier | None = None,
        tenant_map: TenantMap | None = None,
    ) -> None:
        self.keys = keys
        self.jwt = jwt
        self.tenant_map = tenant_map

    @property
    def uses_certificates(self) -> bool:
        return self.tenant_map is not None

    def expected(self) -> str:
        """What a caller must present, for the UNAUTHENTICATED message."""
        kinds = ["an API key" if self.jwt is None else "an API key or JWT"]
        text = f"{kinds[0]} as 'authorization: Bearer <token>'"
        if self.tenant_map is not None:
            text += ", or a client certificate this server maps to a tenant"
        return text

    async def authenticate(self, authorization: list[str], identity: ClientIdentity | None) -> Verdict:
        """``authorization``: every value of the call's ``authorization`` metadata."""
        if len(authorization) > 1:
            return Verdict(None, "none", "", "several_authorization_headers", presented=True)
        if authorization:
            return await self._bearer(authorization[0])
        if identity is not None and self.tenant_map is not None:
            principal = self.tenant_map.principal(identity)
            if principal is None:
                return Verdict(None, "mtls", identity.name, "unmapped_certificate", presented=True)
            return Verdict(principal, "mtls", principal.subject, "ok", principal.tenant, presented=True)
        return Verdict(None, "none", "", "missing")

    async def _bearer(self, value: str) -> Verdict:
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Verdict(None, "none", "", "not_bearer", presented=True)
        if len(token) > MAX_TOKEN_BYTES:
            return Verdict(None, "none", "", "too_large", presented=True)
        if token.startswith(KEY_PREFIX) and self.keys is not None:
            check = await self.keys.verify(token)
            return Verdict(check.principal, "api_key", check.key_id, check.reason, check.tenant, presented=True)
        if self.jwt is not None and token.count(".") == 2:
            jwt_check = self.jwt.verify(token)
            return Verdict(jwt_check.principal, "jwt", jwt_check.subject, jwt_check.reason, jwt_check.tenant, presented=True)
        return Verdict(None, "none", "", "unrecognised_token", presented=True)
