"""Removing the host copies' checkpoints that no copy will resume from.

A copy removes its own checkpoint when it finishes (or fails to verify), and
the standalone runner removes what its children leave.  On a cluster a copy
pod that was killed, or whose pair was discarded, leaves its checkpoint in
``hostDataDir/copy`` on its node, where the controller cannot reach it.  Each
node plugin therefore sweeps that directory: a checkpoint whose identity
(copy/checkpoint.py) names a pair that no longer exists, or a cut that is not
the pair's present one, is stale and removed.  A checkpoint of the present cut
is kept: its copy resumes from it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from csi_virtvol.copy import checkpoint
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

PERIOD = 300.0  # seconds between sweeps
GRACE = 60.0    # a checkpoint younger than this is left alone (its pair may be being recorded)


def sweep(*, store: StateStore, directory: str, grace: float = GRACE) -> list[str]:
    """Remove the stale checkpoints in `directory`; return the paths removed."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    removed: list[str] = []
    now = time.time()
    for name in sorted(names):
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime < grace:
                continue
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        ident = str(data.get(checkpoint.KEY, "")) if isinstance(data, dict) else ""
        parsed = checkpoint.parse(ident)
        if parsed is None:
            continue  # not ours to judge (no identity): harmless, a copy with an identity never resumes it
        pair_id, cut_at = parsed
        rec = store.get(S.PAIRS, pair_id)
        if rec is not None and rec.value.cut_at == cut_at:
            continue
        checkpoint.remove(path)
        removed.append(path)
        log.info("removed checkpoint %s: %s", path,
                 "its pair is gone" if rec is None else "it is of an earlier cut")
    return removed


def keep_swept(stop: threading.Event, *, store: StateStore, directory: str, period: float = PERIOD) -> None:
    while not stop.wait(period):
        try:
            sweep(store=store, directory=directory)
        except Exception:  # a sweep must never stop the node plugin
            log.exception("checkpoint sweep of %s failed", directory)


__all__ = ["sweep", "keep_swept"]
