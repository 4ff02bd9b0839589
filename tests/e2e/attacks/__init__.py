"""End-to-end attack catalogue: the real orchestrator over TLS with authentication required."""
