"""An exclusive flock(2) on a lock file, held for a `with` block."""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from csi_virtvol import errors


@contextlib.contextmanager
def exclusive(path: str, *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, with its directory, if missing);
    errors.BackendUnavailable, naming `what`, when the file cannot be opened."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise errors.BackendUnavailable(f"{what}: lock {path}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


__all__ = ["exclusive"]
