"""End-to-end tests: the real service over real sockets (a real Triton, orchestrator processes,
the job worker, the D-ID emulator, PostgreSQL and HAProxy for the cluster, the CLI and SDK
against them). The attack catalogue (attacks/) runs the server over TLS with authentication
required."""
