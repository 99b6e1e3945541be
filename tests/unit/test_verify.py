"""Issue 12's rule "a target that is ready has been verified": services/verify.judge believes a
host copy's "done" only when its result proves the target holds this attempt's range."""
from __future__ import annotations

from typing import Any

import pytest

from csi_virtvol.copy.runner import JobStatus
from csi_virtvol.services.verify import judge

MiB = 1 << 20
ID = "vs-1/slow:vs-1-0@1700000000.5"


def done(**result: Any) -> JobStatus:
    ev = {"event": "done", "length": 4 * MiB, "resumed_from": 0, "bytes_written": 4 * MiB,
          "checkpoint_id": ID, **result}
    return JobStatus(running=False, done=True, bytes_done=4 * MiB, bytes_written=4 * MiB, result=ev)


def test_a_verified_copy_of_this_attempt_is_believed() -> None:
    v = judge(done(verified=True, verify="blake2b-256", resumed_from=3 * MiB, bytes_written=MiB),
              length=4 * MiB, checkpoint_id=ID)
    assert (v.ok, v.method, v.result) == (True, "blake2b-256", "match")


def test_an_unverified_copy_from_0_that_accounts_for_every_byte_is_believed() -> None:
    v = judge(done(bytes_written=MiB, bytes_zeroed=MiB, bytes_skipped=MiB, bytes_unchanged=MiB),
              length=4 * MiB, checkpoint_id=ID)
    assert v.ok and v.method == "bytes"


@pytest.mark.parametrize(("status", "why"), [
    (JobStatus(running=False, done=False, bytes_done=0, mismatch=True,
               result={"event": "error", "mismatch": True, "offset": 0}), "mismatch"),
    (JobStatus(running=False, done=False, bytes_done=4 * MiB, message="exited 1"), "did not finish"),
    (JobStatus(running=False, done=True, bytes_done=4 * MiB), "no result"),
    (done(verified=True, verify="blake2b-256", checkpoint_id="vs-1/slow:vs-1-0@1600000000.0"), "another attempt"),
    (done(verified=True, verify="blake2b-256", length=2 * MiB), "covered"),
    # resumed (from a checkpoint that may not be this target's) and not re-read: not believed
    (done(resumed_from=3 * MiB, bytes_written=MiB), "mismatch"),
    # from 0, but bytes unaccounted for (what a lying checkpoint or a short copy leaves)
    (done(bytes_written=3 * MiB), "mismatch"),
    # says verified, but names no method: not a verification this driver asked for
    (done(verified=True, resumed_from=3 * MiB, bytes_written=MiB), "mismatch"),
], ids=["mismatch", "unfinished", "no-result", "other-attempt", "other-length", "resumed-unverified",
        "unaccounted", "verified-without-method"])
def test_anything_else_is_not_believed(status: JobStatus, why: str) -> None:
    v = judge(status, length=4 * MiB, checkpoint_id=ID)
    assert not v.ok and why in v.result, v
