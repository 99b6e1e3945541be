"""What the command line shows of copies: the per-extent plan, the mapping, and progress.

Everything here is a CSI (or virtvol admin API) client: a snapshot is taken with
CreateSnapshot and a clone or restore made with CreateVolume and a content source,
each re-issued (as the Kubernetes sidecars do) until the driver answers ready.
Meanwhile the pair's bytes done/total (virtvol.v1.Pairs) drive a progress bar
(rich) when stdout is a terminal, or plain progress lines when it is not.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TextIO

from csi_virtvol import errors
from csi_virtvol.csi import client as C

POLL = 0.25          # seconds between two looks at the pair
LINE_EVERY = 1.0     # plain progress lines: at most one a second ...
LINE_STEP = 10       # ... or one per this many percent, whichever comes first

# proto3 JSON leaves out fields at their default (0, ""), and writes int64 as strings
Json = Mapping[str, Any]


def num(d: Json, key: str) -> int:
    return int(d.get(key, 0) or 0)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def array_of(lun_key: str) -> str:
    return lun_key.partition(":")[0] if lun_key else "?"


def table(header: list[str], rows: list[list[str]], *, indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header, *rows])


def plan_table(pair: Json) -> str:
    """The pair's per-extent plan: which piece goes where by which method, and how far."""
    rows = []
    for e in pair.get("extents", []):
        total, done = num(e, "bytes_total"), num(e, "bytes_done")
        src, dst = array_of(e.get("source_lun", "")), array_of(e.get("target_lun", ""))
        rows.append([str(num(e, "index")), e.get("method", "?"), src if src == dst else f"{src} -> {dst}",
                     mib(total), f"{100 * done // max(total, 1)}%", e.get("state", "?")])
    return table(["extent", "method", "array", "bytes", "progress", "state"], rows)


def pair_summary(pair: Json) -> str:
    cut = float(pair.get("cut_at", 0) or 0)
    when = time.strftime("%H:%M:%S", time.localtime(cut)) + f".{int(cut * 1000) % 1000:03d}" if cut else "not yet"
    return (f"{pair.get('source', '?')} -> {pair.get('target', '?')}: {pair.get('state', '?')}, "
            f"cut at {when}, fence {pair.get('fence', 'none')}")


def mapping_table(mapping: Json) -> str:
    rows = []
    for e in mapping.get("extents", []):
        rows.append([str(num(e, "index")), e.get("array", "?"), e.get("lun", "?"), mib(num(e, "offset")),
                     mib(num(e, "length")), ",".join(e.get("array_abilities", [])) or "none"])
    return table(["extent", "array", "LUN", "offset", "length", "array abilities"], rows)


def find_pair(cl: C.Client, *, source: str, target: str) -> Json | None:
    out = cl.call(cl.pairs.ListPairs, C.vpb_.ListPairsRequest(source=source))
    for p in out.get("pairs", []):
        if p.get("target") == target:
            return dict(p)
    return None


class _Progress:
    """A rich progress bar on a terminal; plain lines elsewhere."""

    def __init__(self, title: str, *, stream: TextIO, tty: bool | None = None) -> None:
        self._title = title
        self._stream = stream
        self._bar: Any = None
        self._task: Any = None
        self._last: tuple[float, int] = (0.0, -LINE_STEP)
        if stream.isatty() if tty is None else tty:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

            # no speed or time left: an internal copy's bytes are done at once and would skew both
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                 TimeElapsedColumn(), console=Console(file=stream))
            self._task = self._bar.add_task(title, total=None)
            self._bar.start()

    def update(self, done: int, total: int, detail: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total or None,
                             description=f"{self._title} [{detail}]" if detail else self._title)
            return
        pct = 100 * done // max(total, 1)
        now = time.monotonic()
        if pct == self._last[1] or (now - self._last[0] < LINE_EVERY and pct - self._last[1] < LINE_STEP
                                    and pct < 100):
            return
        self._last = (now, pct)
        print(f"  {self._title}: {pct:3d}% ({mib(done)} of {mib(total)}){'  ' + detail if detail else ''}",
              file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _detail(pair: Json) -> str:
    parts = []
    for e in pair.get("extents", []):
        parts.append(f"{num(e, 'index')}:{e.get('method', '?')} {100 * num(e, 'bytes_done') // max(num(e, 'bytes_total'), 1)}%")
    return ", ".join(parts)


def follow_copy(cl: C.Client, *, source: str, target: str, title: str, stream: TextIO,
                timeout: float = 0.0, tty: bool | None = None) -> Json:
    """Show the copy into `target` until it ends; the pair as it ended.
    Raises BackendError when the copy failed, NotFound when its pair is gone,
    OperationPending after `timeout` seconds (0: no limit; the copy goes on)."""
    deadline = time.monotonic() + timeout if timeout else None
    bar = _Progress(title, stream=stream, tty=tty)
    try:
        while True:
            pair = find_pair(cl, source=source, target=target)
            if pair is None:
                raise errors.NotFound(f"no copy of {source} into {target} (deleted meanwhile?)")
            total = sum(num(e, "bytes_total") for e in pair.get("extents", []))
            done = sum(num(e, "bytes_done") for e in pair.get("extents", []))
            bar.update(done, total, _detail(pair))
            state = pair.get("state", "")
            if state == "failed":
                raise errors.BackendError(f"the copy into {target} failed: {pair.get('reason', '')}")
            if state not in ("copying", "resyncing"):
                return pair
            if deadline is not None and time.monotonic() > deadline:
                raise errors.OperationPending(
                    f"{target} is still being copied after {timeout:.0f}s; the copy goes on "
                    f"(csi-virtvol pair list --source {source})")
            time.sleep(POLL)
    finally:
        bar.close()


def create_snapshot(cl: C.Client, *, name: str, volume_id: str, parameters: Mapping[str, str],
                    wait: bool = True, stream: TextIO, timeout: float = 0.0,
                    tty: bool | None = None) -> Json:
    """CreateSnapshot, re-issued until ready_to_use (unless not `wait`); the response."""
    req = C.pb_.CreateSnapshotRequest(name=name, source_volume_id=volume_id, parameters=dict(parameters))
    out = cl.call(cl.controller.CreateSnapshot, req)
    snap = out.get("snapshot", {})
    if not wait or snap.get("ready_to_use"):
        return out
    sid = snap.get("snapshot_id", "")
    follow_copy(cl, source=volume_id, target=sid, title=f"snapshot {name}", stream=stream, timeout=timeout,
                tty=tty)
    while True:  # the driver marks the snapshot ready right after the pair splits
        out = cl.call(cl.controller.CreateSnapshot, req)
        if out.get("snapshot", {}).get("ready_to_use"):
            return out
        time.sleep(POLL)


def create_volume(cl: C.Client, req: Any, *, target_id: str, wait: bool = True, stream: TextIO,
                  timeout: float = 0.0, tty: bool | None = None) -> Json:
    """CreateVolume; with a content source, re-issued while the driver answers ABORTED
    (still filling it) until it answers with the volume.  `target_id` is the id the
    driver gives the volume (the copy's pair target), for the progress."""
    kind = req.volume_content_source.WhichOneof("type")
    source = (req.volume_content_source.snapshot.snapshot_id if kind == "snapshot"
              else req.volume_content_source.volume.volume_id if kind == "volume" else "")
    waits = 0
    while True:
        try:
            return cl.call(cl.controller.CreateVolume, req)
        except C.CallFailed as e:
            if e.code != "ABORTED" or not source or not wait:
                raise
            pair = find_pair(cl, source=source, target=target_id)
            if pair is None or pair.get("state") not in ("copying", "resyncing"):
                waits += 1  # not copying (yet, or any more): the driver says why it waits
                if waits > 100:
                    raise
                time.sleep(POLL)
                continue
        follow_copy(cl, source=source, target=target_id, title=f"volume {req.name} from {kind} {source}",
                    stream=stream, timeout=timeout, tty=tty)


__all__ = ["plan_table", "pair_summary", "mapping_table", "find_pair", "follow_copy", "create_snapshot",
           "create_volume", "mib", "num", "table"]
