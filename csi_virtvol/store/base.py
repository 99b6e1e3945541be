"""The StateStore protocol.

Every record kind is a `Table`: a model dataclass, a key function and named
secondary indexes.  Each write is one atomic operation on one record carrying
a revision; a write against a stale revision raises `errors.Conflict`
(optimistic concurrency, as Kubernetes' resourceVersion).  Multi-record
changes are made crash-safe by the services with intent states
(VolumeState.CREATING / DELETING), not by store transactions, so that the CRD
store can honour the same contract.
"""
from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from csi_virtvol.model.array import ArrayInfo, Lun
from csi_virtvol.model.group import GroupSnapshot
from csi_virtvol.model.ids import Revision
from csi_virtvol.model.node import NodeInfo
from csi_virtvol.model.pair import Pair
from csi_virtvol.model.volume import VirtualVolume

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Table(Generic[T]):
    name: str
    type: type[T]
    key: Callable[[T], str]
    indexes: Mapping[str, Callable[[T], str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Versioned(Generic[T]):
    value: T
    revision: Revision


@dataclass(frozen=True, slots=True, kw_only=True)
class Change(Generic[T]):
    """One event from `watch`: kind is "put" or "delete"."""

    kind: str
    key: str
    value: T | None
    revision: Revision


@dataclass(frozen=True, slots=True, kw_only=True)
class Put(Generic[T]):
    """One write of `apply`: create `record` (revision None) or replace it at `revision`."""

    table: Table[T]
    record: T
    revision: Revision | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Remove(Generic[T]):
    """One write of `apply`: delete `key` (at `revision`, when given); a missing key is no error."""

    table: Table[T]
    key: str
    revision: Revision | None = None


Write = Put[Any] | Remove[Any]


ARRAYS: Table[ArrayInfo] = Table(name="arrays", type=ArrayInfo, key=lambda a: a.id)
LUNS: Table[Lun] = Table(
    name="luns", type=Lun, key=lambda lun: lun.key,
    indexes={"array": lambda lun: lun.array, "volume": lambda lun: lun.volume},
)
VOLUMES: Table[VirtualVolume] = Table(
    name="volumes", type=VirtualVolume, key=lambda v: v.id,
    indexes={"name": lambda v: f"{v.kind.value}/{v.name}", "source": lambda v: v.source_volume},
)
PAIRS: Table[Pair] = Table(
    name="pairs", type=Pair, key=lambda p: p.id,
    indexes={"source": lambda p: p.source},
)
NODES: Table[NodeInfo] = Table(name="nodes", type=NodeInfo, key=lambda n: n.id)
GROUPS: Table[GroupSnapshot] = Table(name="groups", type=GroupSnapshot, key=lambda g: g.id)
ALL_TABLES: tuple[Table[ArrayInfo] | Table[Lun] | Table[VirtualVolume] | Table[Pair] | Table[NodeInfo]
                  | Table[GroupSnapshot], ...] = (ARRAYS, LUNS, VOLUMES, PAIRS, NODES, GROUPS)


class StateStore(Protocol):
    def get(self, table: Table[T], key: str) -> Versioned[T] | None:
        """The record with that key, or None."""

    def find(self, table: Table[T], *, index: str, value: str) -> list[Versioned[T]]:
        """Records whose secondary index `index` equals `value`, ordered by key."""

    def list(self, table: Table[T], *, after: str = "", limit: int = 0) -> list[Versioned[T]]:
        """Records ordered by key, starting after key `after`; at most `limit` (0: all)."""

    def create(self, table: Table[T], record: T) -> Revision:
        """Insert; raises Conflict if the key exists."""

    def update(self, table: Table[T], record: T, *, revision: Revision) -> Revision:
        """Replace; raises Conflict on a stale revision, NotFound if missing."""

    def delete(self, table: Table[T], key: str, *, revision: Revision | None = None) -> None:
        """Remove; a missing key is not an error; Conflict on a stale revision."""

    def apply(self, writes: Sequence[Write]) -> builtins.list[Revision | None]:
        """Several writes in order, as one call; the new revision of each (None for a Remove).

        Each write has the semantics of create/update/delete.  The first one that
        fails raises its error.  Whether the writes before it stay is the store's:
        SQLite applies all or none (one transaction, one fsync), the CRD store
        applies them one by one.  So callers keep multi-record changes crash-safe
        with intent states, exactly as for single writes, and use `apply` to pay
        for one durable commit instead of several where the store can.
        """

    def watch(self, table: Table[T], *, timeout: float) -> Iterator[Change[T]]:
        """Changes to the table from now on, until `timeout` seconds pass."""

    def close(self) -> None:
        """Release connections."""


def upsert(store: StateStore, table: Table[T], value: T, *, attempts: int = 5) -> Revision:
    """Create or replace, retrying when another writer wins the race."""
    from csi_virtvol import errors  # local: keep the protocol module import-light

    for _ in range(attempts):
        cur = store.get(table, table.key(value))
        try:
            if cur is None:
                return store.create(table, value)
            return store.update(table, value, revision=cur.revision)
        except (errors.Conflict, errors.NotFound):
            continue
    raise errors.Conflict(f"could not record {table.name}/{table.key(value)}: too many concurrent writers")
