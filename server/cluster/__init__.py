"""Many replicas behind one address, on one machine or several.

    topology.py    replica names, ports and command lines (no processes)
    haproxy.py     the load balancer's configuration and HAProxy as a child process
    launcher.py    Cluster: PostgreSQL, one Triton, the D-ID emulator, N replicas and HAProxy
                   (``python -m server.cluster``, ``make serve-cluster``)
    membership.py  ReplicaMembership: a replica's registration and heartbeat in the shared job
                   store (what ``framewise info`` lists); the only part a replica itself runs

Nothing is imported here, so a replica importing membership loads none of the launcher.
"""
