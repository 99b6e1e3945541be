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
caller's undo path runs.  Unset (always, in production) each call is one dict
look-up.
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
