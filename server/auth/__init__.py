"""Who is calling: credentials (API keys, JWTs, client certificates), the principal an RPC runs
as (tenant, scopes), authorization by RPC family, and the audit trail of refusals.

principal.py is the seam the rest of the server uses: a servicer asks ``current_principal()``
for the tenant its call belongs to; it never reads credentials itself.

    principal.py      Principal, the call's ContextVar, tenant names
    keys.py           API key format, generation, SHA-256 hashing, constant-time check
    key_verifier.py   a presented key against the shared job store (short cache, last use)
    jwt_bearer.py     bearer JWTs with joserfc against issuer, audience and a JWKS file
    mtls.py           verified client certificate identity -> tenant (a JSON map)
    authenticator.py  authorization metadata / certificate -> Principal or a refusal reason
    scopes.py         method -> scope, the one table
    backoff.py        per-peer delay of repeated refusals
    audit.py          the server.audit log lines (and cross_tenant() for servicers)
    interceptor.py    the gRPC interceptor that puts it together
    config.py         --auth and the other flags; layer.py builds it all for the server
"""
