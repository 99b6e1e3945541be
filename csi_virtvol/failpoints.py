"""Named failure points for the crash-recovery and rollback tests.

`VIRTVOL_FAILPOINTS=name[,name...]` makes the process SIGKILL itself when it
reaches one of those points, exactly as a power cut or OOM kill would stop it
there.  `name=error` instead raises a BackendError there, as a failing array or
host tool would, so the caller's undo path runs.  Unset (always, in production)
each call is one dict look-up.

It sits below every layer (it needs only `errors`), so that the copy a copy pod
runs (copy/) has failure points as well as the controller's services: the
crash and retry matrix (tests/kube/test_copy_matrix.py) kills or fails a copy
pod at a step the same way it kills the controller.
"""
from __future__ import annotations

import logging
import os
import signal

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
    log.warning("failpoint %s: killing this process", name)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
