"""Named failure points for the crash-recovery and rollback tests.

`VIRTVOL_FAILPOINTS=name[,name...]` makes the process SIGKILL itself when it
reaches one of those points, exactly as a power cut or OOM kill would stop it
there.  Every layer may name points (so this module sits below all of them, and
needs only `errors`): the controller's copy and cut steps (copy-*, cut-*), the
copy a copy pod runs (copier-*: the crash and retry matrix of
tests/kube/test_copy_matrix.py kills or fails a copy pod the way it kills the
controller), the node plugin's side of a cut (cut-node-*) and the concatenation
daemon (daemon-*), which inherits the plugin's environment.  `name=error` instead
raises a BackendError there, as a failing array or host tool would, so the
caller's undo path runs; `name=sleep:SECONDS` pauses there (a slow step, to widen
a window a test must show closed).  `armed()` arms a point in this process only,
for tests that run the plugin in-process.  Unset (always, in production) each
call is one dict look-up.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

from csi_virtvol import errors

log = logging.getLogger(__name__)
_ARMED = {name: action or "kill" for name, _, action in
          (p.partition("=") for p in os.environ.get("VIRTVOL_FAILPOINTS", "").split(",") if p)}


def hit(name: str) -> None:
    action = _ARMED.get(name)
    if action is None:
        return
    if action == "error":
        log.warning("failpoint %s: failing here", name)
        raise errors.BackendError(f"failpoint {name}: injected failure")
    if action.startswith("sleep:"):
        log.warning("failpoint %s: sleeping %ss", name, action[6:])
        time.sleep(float(action[6:]))
        return
    log.warning("failpoint %s: killing this process", name)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def armed(name: str, action: str = "kill") -> Iterator[None]:
    """Arm `name` with `action` in this process while the block runs."""
    before = _ARMED.get(name)
    _ARMED[name] = action
    try:
        yield
    finally:
        if before is None:
            _ARMED.pop(name, None)
        else:
            _ARMED[name] = before
