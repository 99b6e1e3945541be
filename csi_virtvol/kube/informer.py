"""Following copy Jobs and their pods cheaply: one LIST + one watch per kind per
process, a local cache read by every copy, and retries for the API's passing faults.

`Informer` keeps the objects of one namespaced kind that match a label
selector: it LISTs once, then watches from that resourceVersion, and LISTs
again only when the watch's history is gone (410) or the connection broke.
Reading it makes no request.

Its requests are retried through the API's passing faults (kube/retry.py,
re-exported here: `retrying`, `transient`, `DELAYS`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import kubernetes.client as k8s
import kubernetes.watch as _k8s_watch
import urllib3.exceptions

from csi_virtvol.kube.crdstore import wrap_api_error
from csi_virtvol.kube.retry import DELAYS, retrying, transient

Obj = dict[str, Any]
k8s_watch: Any = _k8s_watch

log = logging.getLogger(__name__)


class Informer:
    """The objects of one kind in `namespace` matching `label_selector`, kept by name."""

    def __init__(self, list_fn: Callable[..., Any], client: Any, *, namespace: str, label_selector: str,
                 what: str, request_timeout: float = 30.0, watch_seconds: int = 300,
                 delays: Sequence[float] = DELAYS) -> None:
        self._list = list_fn
        self._client = client
        self._ns = namespace
        self._selector = label_selector
        self._what = what
        self._timeout = request_timeout
        self._watch_seconds = watch_seconds
        self._delays = delays
        self._objs: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._w: Any = None  # the watch being followed
        self.synced = threading.Event()
        self.lists = 0    # how many LISTs it made (a test reads them)
        self.watches = 0  # how many watches it opened

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"informer-{self._what}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop following; wakes the watch blocked on the server (a controller's stop used to
        wait out each informer's open watch, ~20 s)."""
        self._stop.set()
        t = self._thread
        deadline = time.monotonic() + 10
        while t is not None and t.is_alive() and time.monotonic() < deadline:
            w = self._w
            if w is not None:
                w.stop()  # the client shuts the watch's socket down: the blocked read returns
            t.join(timeout=0.05)

    def get(self, name: str) -> Obj | None:
        with self._lock:
            return self._objs.get(name)

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._objs.values())

    def wait_changed(self, seconds: float) -> None:
        with self._changed:
            self._changed.wait(seconds)

    def put(self, obj: Obj) -> None:
        """Take an object this process just read or wrote (newer than the watch may have told)."""
        self._apply("MODIFIED", obj)

    def forget(self, name: str) -> None:
        with self._changed:
            self._objs.pop(name, None)
            self._changed.notify_all()

    def _apply(self, type_: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        with self._changed:
            have = self._objs.get(name)
            if type_ == "DELETED":
                if have is not None and (have.get("metadata") or {}).get("uid") == meta.get("uid"):
                    del self._objs[name]
            elif have is None or _rv(obj) >= _rv(have) or \
                    (have.get("metadata") or {}).get("uid") != meta.get("uid"):
                self._objs[name] = obj
            self._changed.notify_all()

    def _relist(self) -> str:
        out = retrying(lambda: self._list(self._ns, label_selector=self._selector, _request_timeout=self._timeout),
                       what=f"list {self._what}", delays=self._delays)
        self.lists += 1
        body = cast(Obj, self._client.sanitize_for_serialization(out))
        objs = {str(o["metadata"]["name"]): o for o in body.get("items") or []}
        with self._changed:
            self._objs = objs
            self._changed.notify_all()
        self.synced.set()
        return str((body.get("metadata") or {}).get("resourceVersion", ""))

    def _run(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._relist()
                rv = self._watch(rv)
            except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
                if isinstance(e, k8s.ApiException) and e.status == 410:
                    rv = ""
                    continue
                log.warning("%s informer: %s", self._what, wrap_api_error(e, f"watch {self._what}"))
                rv = ""
                self._stop.wait(1.0)
            except Exception:  # keep following: a copy must never be left without its informer
                log.exception("%s informer failed; starting again", self._what)
                rv = ""
                self._stop.wait(1.0)

    def _watch(self, rv: str) -> str:
        """Follow changes from `rv`; return the resourceVersion to go on from."""
        w = self._w = k8s_watch.Watch()
        self.watches += 1
        try:
            for ev in w.stream(self._list, self._ns, label_selector=self._selector, resource_version=rv,
                               timeout_seconds=self._watch_seconds, allow_watch_bookmarks=True,
                               _request_timeout=(self._timeout, self._watch_seconds + 30)):
                if self._stop.is_set():
                    break
                obj = ev.get("raw_object") or {}
                if ev.get("type") == "ERROR":
                    if int(obj.get("code") or 0) == 410:
                        return ""
                    raise k8s.ApiException(status=int(obj.get("code") or 500), reason=str(obj.get("reason")))
                new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if ev.get("type") != "BOOKMARK":
                    self._apply(str(ev.get("type")), obj)
                rv = new_rv
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            pass  # the server ended the watch: go on from where it was
        finally:
            w.stop()
            self._w = None
        return rv


def _rv(obj: Obj) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


__all__ = ["Informer", "retrying", "transient", "DELAYS"]
