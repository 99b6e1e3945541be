"""A target that is ready has been verified.

A host copy that says it is done is believed only once its result shows that
the target range holds the source range of this attempt:

* ``blake2b-256``: the copy re-read both ranges after writing (the source is
  frozen for the cut) and compared each chunk's digest (``csi-virtvol copy
  --verify``); a difference exits 3, which is a mismatch here too;
* ``bytes`` (when a copy could not verify): the copy started from 0 in this
  attempt and accounted for every byte of the range (written, zeroed,
  skipped as a hole, or already equal).

Anything else (no result, a result of another attempt, a resumed copy that
did not re-read) is a mismatch: the extent is copied again from 0 under a new
checkpoint identity, and never marked done.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csi_virtvol.copy.runner import JobStatus

MAX_RECOPIES = 2  # copies again from 0 after a mismatch, before the extent (and pair) fails


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    ok: bool
    method: str   # blake2b-256 | bytes | none
    result: str   # "match" or what did not match


def judge(status: JobStatus, *, length: int, checkpoint_id: str) -> Verdict:
    """Whether the finished (or failed) copy `status` of `length` bytes filled its target."""
    ev: Mapping[str, Any] = status.result or {}
    if status.mismatch or ev.get("mismatch"):
        return Verdict(ok=False, method=str(ev.get("verify") or "blake2b-256"),
                       result=f"mismatch at range offset {ev.get('offset', '?')}")
    if not status.done:
        return Verdict(ok=False, method="none", result=f"the copy did not finish: {status.message}")
    if ev.get("event") != "done":
        return Verdict(ok=False, method="none", result="the copy reported no result")
    if str(ev.get("checkpoint_id", "")) != checkpoint_id:
        return Verdict(ok=False, method="none",
                       result=f"the result is of another attempt ({ev.get('checkpoint_id')!r})")
    if int(ev.get("length", -1)) != length:
        return Verdict(ok=False, method="none", result=f"the copy covered {ev.get('length')} of {length} bytes")
    if ev.get("verified") and ev.get("verify"):
        return Verdict(ok=True, method=str(ev["verify"]), result="match")
    accounted = sum(int(ev.get(k, 0)) for k in ("bytes_written", "bytes_zeroed", "bytes_skipped",
                                                 "bytes_unchanged"))
    resumed = int(ev.get("resumed_from", 0))
    if resumed == 0 and accounted == length:
        return Verdict(ok=True, method="bytes", result=f"match: {accounted} of {length} bytes accounted for")
    return Verdict(ok=False, method="bytes",
                   result=f"mismatch: {accounted} of {length} bytes accounted for after resuming at {resumed}")


__all__ = ["Verdict", "judge", "MAX_RECOPIES"]
