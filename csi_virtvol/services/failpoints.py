"""Named crash points for the crash-recovery tests.

`VIRTVOL_FAILPOINTS=name[,name...]` makes the process SIGKILL itself when it
reaches one of those points, exactly as a power cut or OOM kill would stop it
there.  Unset (always, in production) each call is one dict look-up.
"""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
_ARMED = frozenset(p for p in os.environ.get("VIRTVOL_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    if name in _ARMED:
        log.warning("failpoint %s: killing this process", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
