"""The orchestrator's composition root: how its parts are built from ``ServerConfig``.

Both processes build from here, so a concern that cuts across them (credentials, interceptors,
quotas) is added in one place:

- ``inference``: the inference stack (Triton client, model monitor, runner, result cache, the
  detection / segmentation / matting / tracking pipelines), in one order, for the serving
  process (server/app.py) and the job worker process (server/app_worker.py).
- ``jobs``: the job parts both processes build (storage tiers, admission slots, the job kinds'
  pipelines) and the serving process's jobs half (store, event bus, queue, retention).
- ``grpc_server``: the serving process's gRPC server: its interceptors, its credentials, the
  servicers it serves.

Modules below this one (server/jobs, server/pipelines, server/triton, ...) never import it
nor the two process entry points: their dependencies are passed in.
"""
