"""Every StateStore implementation the contract suite runs against.

Each entry is (id, factory): the factory takes a scratch directory owned by
the test and returns a context manager that yields a fresh, empty store and
releases it (and anything it started, such as a fake API server) on exit.
Append new stores here; the suite in test_store_contract.py picks them up.

Points of the contract a new store must mind (the suite checks them):
* `watch` fixes its starting point when it returns, not at the first next():
  writes made between the call and the first next() are delivered.
* Revisions are opaque strings; every write (delete included) makes a new one,
  and a revision from before a delete never matches the re-created record.
* `list` orders by key in Python string order (code points), so a key works
  as a pagination token even after that record is deleted.
* `find` on an index the Table does not declare raises InvalidRequest.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from csi_virtvol.store.base import StateStore
from csi_virtvol.store.sqlite import SqliteStore

StoreFactory = Callable[[Path], AbstractContextManager[StateStore]]


@contextlib.contextmanager
def sqlite_store(scratch: Path) -> Iterator[StateStore]:
    store = SqliteStore(str(scratch / "state.db"))
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def crd_store(scratch: Path) -> Iterator[StateStore]:
    """The CRD store against the fake API server (tests/kube/fakeapi.py) serving the chart's CRDs."""
    import sys

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "kube"))
    from fakeapi import FakeApiServer

    from csi_virtvol.kube.crdstore import CrdStore, api_client

    with FakeApiServer(crd_dir=here.parents[1] / "charts" / "csi-virtvol" / "crds") as api:
        store = CrdStore(api_client(host=api.url))
        try:
            yield store
        finally:
            store.close()


STORE_FACTORIES: list[tuple[str, StoreFactory]] = [
    ("sqlite", sqlite_store),
    ("crd", crd_store),
]
