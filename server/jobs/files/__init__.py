"""The files of long-running jobs: where they live on disk and how they get there safely.

    storage.py    StorageManager: the retention tiers (uploads, processed, videos, temp),
                  atomic placement, cleanup, low-disk checks
    uploads.py    UploadStore: chunked client uploads and server-side media paths
    durable.py    writes that survive a power loss (file and folder fsync)
    artifacts.py  stored artifact rows as API messages, and removing artifact files
"""
