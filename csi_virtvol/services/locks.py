"""Per-key in-flight guards: a second operation on a busy volume is refused at
once with OperationPending (ABORTED in CSI), never queued."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_virtvol import errors


class KeyedLocks:
    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = [k for k in dict.fromkeys(keys) if k]
        with self._mutex:
            taken = [k for k in wanted if k in self._busy]
            if taken:
                raise errors.OperationPending(f"an operation on {taken[0]} is already in progress")
            self._busy.update(wanted)
        try:
            yield
        finally:
            with self._mutex:
                self._busy.difference_update(wanted)
