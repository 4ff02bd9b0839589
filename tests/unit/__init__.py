"""Unit tests: one module or a few, in process (real SQLite and PostgreSQL, an in-process gRPC
server or the D-ID emulator where the subject talks to one); no Triton, no orchestrator process."""
