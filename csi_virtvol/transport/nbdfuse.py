"""An NBD export as a local regular file, through nbdfuse (userspace: no nbd module).

`mount(uri, point)` makes `point` (a regular file, created if missing) show the
export's bytes; `unmount(point)` takes it away (lazily when something still holds
it: the holder keeps the old mount until it lets go).  A mount whose nbdfuse died
answers ENOTCONN; `mount` notices and mounts again.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time

from csi_virtvol import errors

logger = logging.getLogger(__name__)

MOUNT_TIMEOUT = 15.0
POLL = 0.02

_children: dict[str, subprocess.Popen[bytes]] = {}  # nbdfuse processes we started, reaped on unmount
_guard = threading.Lock()


def is_mounted(point: str) -> bool:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].replace("\\040", " ") == point:
                    return True
    except OSError:
        return False
    return False


def mount(uri: str, point: str) -> str:
    """Mount NBD export `uri` over file `point`; idempotent.  Its pid file and log sit
    next to it (``.<name>.pid``, ``.<name>.log``)."""
    if is_mounted(point):
        try:
            os.stat(point)
            return point
        except OSError as e:  # nbdfuse died: ENOTCONN
            logger.warning("stale nbdfuse mount %s (%s); remounting", point, e)
            unmount(point)
    directory, name = os.path.split(point)
    os.makedirs(directory, exist_ok=True)
    with open(point, "ab"):
        pass
    pidfile = os.path.join(directory, f".{name}.pid")
    log = os.path.join(directory, f".{name}.log")  # nbdfuse outlives this call: not a pipe
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    argv = ["nbdfuse", "-P", pidfile, point, uri]
    try:
        with open(log, "ab") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True)
    except OSError as e:
        raise errors.BackendUnavailable(f"cannot run nbdfuse: {e}") from e
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not (os.path.exists(pidfile) and is_mounted(point)):
        if proc.poll() is not None:
            raise errors.BackendError(f"nbdfuse {uri} exited ({proc.returncode}): {_tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise errors.BackendError(f"nbdfuse {uri} did not mount at {point}: {_tail(log)}")
        time.sleep(POLL)
    with _guard:
        _children[point] = proc
    logger.debug("mounted %s at %s", uri, point)
    return point


def unmount(point: str) -> None:
    """Unmount `point`; not mounted is fine."""
    if not is_mounted(point):
        return
    proc = subprocess.run(["fusermount3", "-u", point], capture_output=True, text=True, check=False)
    with _guard:
        child = _children.pop(point, None)
    if proc.returncode != 0 and is_mounted(point):
        logger.warning("%s busy (%s); lazy unmount", point, proc.stderr.strip())
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, check=False)
        return  # nbdfuse exits when its last user goes; Popen reaps it later
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=MOUNT_TIMEOUT)


def unmount_lazily(point: str) -> None:
    if is_mounted(point):
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, check=False)


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


__all__ = ["mount", "unmount", "unmount_lazily", "is_mounted", "MOUNT_TIMEOUT"]
