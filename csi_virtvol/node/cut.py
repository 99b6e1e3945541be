"""The live cut: one small protocol every composition that can cut implements.

A cut fixes a staged volume's image at one instant while the application keeps writing
(the model is Linux dm-snapshot and qemu's copy-before-write filter with a backup job):

    begin_cut(cut_id, store_limit, hold)  the writes are held for an instant (the
                       composition's suspend), the cut's copy-on-write store and change
                       tracking are made, the writes go on (or stay held until release(),
                       so several volumes can be cut at one instant).  Returns the frozen
                       view: a path that reads, for as long as the cut lasts, the volume as
                       it was at the cut.
    release()          let held writes go.
    cut_status(cut_id) whether the cut still stands, and how full its store is.
    end_cut(cut_id)    drop the frozen view and its store; change tracking stays.
    changed(since)     which regions were written since the cut `since` (a persistent
                       bitmap that survives a restart), for resyncs and metadata deltas.
    drop_tracking(since)

Where they live: node/cow.py and node/concatfs.py (FUSE); node/dmcut.py (device-mapper:
`snapshot-origin` and `snapshot` loaded under a suspend/resume of the volume's device,
dm-era for the tracking).  A composition that cannot cut does not implement the protocol;
Stager.can_cut says so and the node falls back to holding the writes for the whole copy
(fsfreeze).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

CHUNK = 64 * 1024  # the granularity of the copy-on-write store and of change tracking


@dataclass(frozen=True, slots=True, kw_only=True)
class CutView:
    cut_id: str
    path: str       # the frozen view: read it at volume offsets
    size: int       # the volume's size at the cut
    limit: int      # bytes the copy-on-write store may take
    used: int       # bytes it takes now
    full: bool      # it filled up: the cut is lost (the volume is untouched)
    at: float = 0.0  # the instant of the cut (wall clock, taken while the writes were held)
    changed: str = ""  # with begin_cut(since=X): a bitmap (one bit per CHUNK of the volume) of
                       # what was written between cut X and this one, fixed at the cut


@dataclass(frozen=True, slots=True, kw_only=True)
class Changed:
    chunk: int
    size: int
    bits: bytes     # bit i: chunk i was written since the cut

    def regions(self) -> list[tuple[int, int]]:
        from csi_virtvol.node import cow
        return list(cow.regions(self.bits, size=self.size, chunk=self.chunk))

    @property
    def bytes_changed(self) -> int:
        return sum(n for _, n in self.regions())


@runtime_checkable
class CutCapable(Protocol):
    def begin_cut(self, *, workdir: str, name: str, cut_id: str, store_limit: int,
                  hold: bool, since: str = "") -> CutView: ...

    def release(self, *, workdir: str, name: str) -> None: ...

    def cut_status(self, *, workdir: str, name: str, cut_id: str) -> CutView | None: ...

    def end_cut(self, *, workdir: str, name: str, cut_id: str) -> None: ...

    def changed(self, *, workdir: str, name: str, since: str) -> Changed: ...

    def drop_tracking(self, *, workdir: str, name: str, since: str) -> None: ...

    def cuts(self, *, workdir: str, name: str) -> tuple[list[str], list[str]]:
        """(cuts that stand, cuts whose writes are tracked)."""
        ...


__all__ = ["CHUNK", "CutView", "Changed", "CutCapable"]
