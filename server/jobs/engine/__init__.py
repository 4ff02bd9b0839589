"""The job engine: how a submitted job becomes a finished operation, whatever its kind.

    queue.py      JobQueue: lanes claiming jobs from the store's queue with leases (renewed,
                  taken over when they expire), cancel wherever a job runs, drain, resumption
    executor.py   JobExecutor: one job's stages in order, checkpoints, retries, the terminal event
    definition.py JobDefinition and Stage: what a job kind gives the engine (server/jobs/kinds/)
    context.py    JobContext: what a running stage sees (request, folder, state, events, slots)
    failures.py   JobFailure: the error classes and what the engine does with each
    admission.py  Admission: per-model concurrency slots for jobs
    events.py     EventBus: stored events fanned out to watchers (WatchOperation)
    retention.py  OperationRetention: finished operations deleted after a while
"""
