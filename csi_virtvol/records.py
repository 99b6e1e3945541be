"""An application's stand-in, and the check that an image of it is one point in time.

`Writer` writes record i at offset i*RECORD of a file or block device, `fdatasync`s it and
keeps (i, the wall-clock time it was acknowledged), every `period` seconds, until stopped.
`check_image` reads an image of that file taken at `cut` (a snapshot's restore): a
crash-consistent image holds exactly records 0..n-1 with every record acknowledged before
the cut, at most one more (in flight at the cut) and nothing after, and zeros past them.

The demo shows this to a newcomer; the live-cut tests (FUSE and dm) and the crash tests
assert it.  Only the standard library and `errors`: any layer may use it.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

from csi_virtvol import errors

RECORD = 4096
PERIOD = 0.003


class NotThePointInTime(errors.VirtvolError):
    """An image that is not the writer's file as it was at the cut."""


def record(i: int) -> bytes:
    head = b"REC%010d|" % i
    return head + bytes([i % 251 + 1]) * (RECORD - len(head))


def prefix_length(image: bytes) -> int:
    """How many records the image holds, from record 0 on, before the first that is not there."""
    n = 0
    while (n + 1) * RECORD <= len(image) and image[n * RECORD:(n + 1) * RECORD] == record(n):
        n += 1
    return n


def check_image(image: bytes, acked: list[tuple[int, float]], cut: float) -> str:
    """What the image says about the cut; raises NotThePointInTime when it is not the
    writer's file as it was at `cut` (wall clock, as the pair's cut_at)."""
    n = prefix_length(image)
    tail = image[n * RECORD:]
    before = [i for i, t in acked if t < cut]
    after = len(acked) - len(before)
    if tail.count(0) != len(tail):
        raise NotThePointInTime(f"the image holds a torn or foreign record after record {n}")
    if not before or n - 1 < before[-1]:
        raise NotThePointInTime(f"record {before[-1] if before else 0} was acknowledged before the cut "
                                f"but the image ends at {n - 1}")
    if n - 1 > before[-1] + 1:
        raise NotThePointInTime(f"the image holds records up to {n - 1}; only {before[-1]} (+1 in flight) "
                                "were written before the cut")
    return (f"records 0..{n - 1}: all {len(before)} acknowledged before the cut"
            f"{' (+1 in flight at the cut)' if n > len(before) else ''}, none of the {after} written after it")


class Writer:
    """Writes record i at offset i*RECORD of `path` and fdatasyncs it, every `period` s;
    `acked` keeps (i, wall-clock time the write was acknowledged).  An I/O error (the device
    is gone) stops it and is kept in `error`.  A context manager: stop() on the way out."""

    def __init__(self, path: str, *, create: bool = True, period: float = PERIOD) -> None:
        self._path = str(path)
        self._fd = os.open(self._path, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
        self._period = period
        self.acked: list[tuple[int, float]] = []
        self.error: OSError | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._t.start()

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                os.pwrite(self._fd, record(i), i * RECORD)
                os.fdatasync(self._fd)
                self.acked.append((i, time.time()))
                i += 1
                time.sleep(self._period)
        except OSError as e:
            self.error = e
        finally:
            os.close(self._fd)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, n: int, timeout: float = 30) -> None:
        """Until n records are acknowledged; raises when the writer is stuck or failed."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            if time.monotonic() > deadline or self.error is not None:
                raise errors.BackendError(f"the writer is stuck ({self.error})")
            time.sleep(0.01)

    def stalled(self) -> float:
        """Seconds since its last acknowledged write."""
        return time.time() - (self.acked[-1][1] if self.acked else 0.0)

    def stop(self, timeout: float = 30) -> None:
        """Stop it.  A writer stuck in a write (its filesystem left frozen) is thawed first,
        and that is an error: a frozen filesystem can be neither unmounted nor left behind."""
        self._stop.set()
        self._t.join(timeout=min(2.0, timeout))
        if not self._t.is_alive():
            return
        self._t.join(timeout=max(0.0, timeout - 2.0))
        if not self._t.is_alive():
            return
        subprocess.run(["fsfreeze", "--unfreeze", os.path.dirname(self._path)], capture_output=True,
                       check=False)
        self._t.join(timeout=10)
        if self._t.is_alive():
            raise errors.BackendError(f"the writer is stuck in a write to {self._path}")
        raise errors.BackendError(f"the writes to {self._path} were held {timeout:.0f}s, until its "
                                  "filesystem was thawed by hand")

    def longest_pause(self, since: float, until: float) -> float:
        """The longest gap between acknowledged records in [since, until] (wall clock)."""
        times = [t for _, t in self.acked if since <= t <= until]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


__all__ = ["RECORD", "PERIOD", "NotThePointInTime", "record", "prefix_length", "check_image", "Writer"]
