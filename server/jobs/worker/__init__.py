"""The job worker process: jobs run in a child of the serving process at a lower CPU priority,
so their work never holds the serving event loop. "Worker" in this project means this process.

    process.py  WorkerProcess: the serving process's handle on the child (start, supervise,
                restart, answer its store calls); a JobExecution for the JobQueue
    child.py    JobWorker: the child's end: runs what it is sent, reports it done
    channel.py  the child's store and event sink, answered by the serving process
    ipc.py      the frames between the two processes, and WorkerSettings

The child process is wired in server/app_worker.py.
"""
