"""Argument checks shared by both backends' quota methods (server/jobs/store/*_quotas.py)."""

from __future__ import annotations

from collections.abc import Mapping

from server.quotas.limits import check_quota_value

__all__ = ["check_lease_slot_args", "checked_quota_values"]


def checked_quota_values(tenant: str, values: Mapping[str, float | None]) -> dict[str, float | None]:
    """ValueError for an empty tenant, an unknown quota name or a value no quota takes."""
    if not tenant:
        raise ValueError("the tenant must not be empty")
    return {name: None if value is None else check_quota_value(name, float(value)) for name, value in values.items()}


def check_lease_slot_args(resource: str, tenant: str, key: str, ttl_s: float) -> None:
    if not resource or not tenant or not key:
        raise ValueError("resource, tenant and key must not be empty")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
