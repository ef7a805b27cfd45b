"""Writing a file so that readers see the old whole file or the new whole file, never half.

Used wherever a node keeps state or secrets on disk (credentials, config bundles, keys,
certificates, compiled modules, recordings' metadata, up.json): temp file in the same
directory, optional fsync, rename over the target. This module imports nothing of ours.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes, *, mode: int = 0o600,
                 durable: bool = True) -> None:
    """Replace `path` with `data` atomically; `mode` defaults to private (0600: secrets are
    common here); `durable` fsyncs first (skip it where losing the update is harmless)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
