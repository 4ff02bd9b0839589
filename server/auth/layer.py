"""Builds the authentication layer from AuthConfig: what the composition root calls once.

    auth = await build_auth(config.auth, store, metrics)
    interceptors = [observability, auth.interceptor, ...]
    auth.auth_required   # for the transport's loopback check and `framewise info`
    ...
    await auth.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.auth.authenticator import Authenticator
from server.auth.backoff import FailureBackoff
from server.auth.config import AuthConfig
from server.auth.interceptor import AuthInterceptor
from server.auth.jwt_bearer import JwtVerifier
from server.auth.key_verifier import ApiKeyVerifier
from server.auth.mtls import load_tenant_map
from server.jobs.store.protocol import JobStore
from server.metrics import Metrics

__all__ = ["AuthLayer", "auth_required_at_start", "build_auth"]

log = logging.getLogger("server.auth")


@dataclass
class AuthLayer:
    config: AuthConfig
    interceptor: AuthInterceptor
    keys: ApiKeyVerifier

    @property
    def auth_required(self) -> bool:
        """Whether callers must authenticate (as of startup, or since a key appeared in auto mode)."""
        return self.interceptor.required

    async def close(self) -> None:
        await self.keys.close()


async def build_auth(config: AuthConfig, store: JobStore, metrics: Metrics) -> AuthLayer:
    """ValueError for an unusable JWKS file or tenant map (the server must not start without the
    protection it was asked for)."""
    keys = ApiKeyVerifier(store, cache_ttl_s=config.key_cache_ttl_s)
    jwt = None
    if config.jwt_enabled:
        assert config.jwt_audience is not None and config.jwks_file is not None  # checked by the flags
        jwt = JwtVerifier(
            issuer=config.jwt_issuer,  # type: ignore[arg-type]
            audience=config.jwt_audience,
            jwks_file=config.jwks_file,
            tenant_claim=config.jwt_tenant_claim,
            leeway_s=config.jwt_leeway_s,
        )
    tenant_map = load_tenant_map(config.mtls_tenant_map) if config.mtls_tenant_map is not None else None
    interceptor = AuthInterceptor(
        Authenticator(keys=keys, jwt=jwt, tenant_map=tenant_map),
        metrics,
        mode=config.mode,
        open_methods=config.open_methods,
        backoff=FailureBackoff(),
        has_api_keys=store.has_api_keys,
        static_required=jwt is not None or tenant_map is not None,
    )
    if config.mode == "auto":
        await interceptor.refresh_required()
    log.info(
        "authentication",
        extra={
            "auth_mode": config.mode,
            "required": interceptor.required,
            "jwt_issuer": config.jwt_issuer,
            "jwt_algorithms": list(jwt.algorithms) if jwt else [],
            "mtls_tenant_map_entries": len(tenant_map) if tenant_map else 0,
            "open_methods": list(config.open_methods),
            "key_cache_ttl_s": config.key_cache_ttl_s,
        },
    )
    return AuthLayer(config, interceptor, keys)


async def auth_required_at_start(config: AuthConfig, store_url: str) -> bool:
    """Whether callers must authenticate, decided before the server listens (the transport
    picks the listen address and refuses an open public port from it). ``--auth auto`` with
    neither a JWT issuer nor an mTLS tenant map asks the job store whether a key exists."""
    if config.mode == "off":
        return False
    if config.mode == "required" or config.jwt_enabled or config.mtls_tenant_map is not None:
        return True
    from server.jobs.store.factory import open_job_store

    store = await open_job_store(store_url)
    try:
        return await store.has_api_keys()
    finally:
        await store.close()
