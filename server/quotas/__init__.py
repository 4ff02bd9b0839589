"""Per-tenant quotas held in the shared job store, so every replica enforces the same ones:
tracking sessions at once, jobs queued or running, storage bytes, and a call rate per RPC
family (token buckets). Defaults come from flags (limits.py); `framewise admin quotas set`
stores a tenant's overrides (cli.py); enforcer.py checks them, interceptor.py applies the rates
to every call, rates.py explains why the buckets live in each replica's memory.

Refusals are server.errors.QuotaExceeded: RESOURCE_EXHAUSTED with google.rpc.QuotaFailure
(which quota) and RetryInfo (when to retry).
"""
