"""The sha256 of a file, read in 1 MiB chunks (weights are hundreds of MB). Standard library only:
the TensorRT builder imports it inside the NGC container, without the project's dependencies."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
