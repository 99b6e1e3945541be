"""Retrying what the API server could not answer now.

`retrying` runs one API call, retrying with backoff on what a healthy API
server can answer for a while (5xx, 429, a refused or broken connection):
such an error is never taken as the answer.  It is used for every request of
the copy path (kube/jobs.py, kube/informer.py) and of the CRD store
(kube/crdstore.py).  A write whose answer was lost may have happened: the
writes are conditional (a resourceVersion, a create), so sent again it answers
409 (or a delete 404), and the caller reads what is there now.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import kubernetes.client as k8s
import urllib3.exceptions

R = TypeVar("R")

log = logging.getLogger(__name__)

DELAYS: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # about 6 s in all, then the error is raised


def transient(e: BaseException) -> bool:
    """An error that says nothing about the request, only that the API server could not answer now."""
    if isinstance(e, k8s.ApiException):
        status = int(e.status or 0)
        return status == 0 or status == 429 or status >= 500
    return isinstance(e, (urllib3.exceptions.HTTPError, OSError))


def retrying(call: Callable[[], R], *, what: str, delays: Sequence[float] = DELAYS,
             failures: list[BaseException] | None = None) -> R:
    """`call()`, retried after each of `delays` while it fails transiently; other errors go through.
    The transient errors met are appended to `failures` (a write that met one may have happened)."""
    for i in range(len(delays) + 1):
        try:
            return call()
        except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            if not transient(e) or i == len(delays):
                raise
            if failures is not None:
                failures.append(e)
            log.info("%s: %s; retrying in %.1fs", what, _short(e), delays[i])
            time.sleep(delays[i])
    raise AssertionError("unreachable")  # pragma: no cover


def _short(e: BaseException) -> str:
    if isinstance(e, k8s.ApiException):
        return f"{e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"


__all__ = ["retrying", "transient", "DELAYS"]
