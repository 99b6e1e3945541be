"""How one host-copy step runs: the seed's volume multiplexing program (150).

`CopyRunner` is how one HOST step runs: a local subprocess in standalone mode
(`LocalCopyRunner`), a Kubernetes Job on a cluster (kube/jobs.py).  Either way
the step is `csi-virtvol copy ... --progress-file F --resume-from auto`, whose
durable checkpoints are read back and written into the pair record, so that a
restarted controller resumes each extent where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Protocol

from csi_virtvol import errors
from csi_virtvol.copy.cli import EXIT_MISMATCH, PARENT_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostCopy:
    job: str          # unique per (pair, extent): "<target id>-<extent index>"
    pair: str
    index: int
    node: str         # a node that reaches both LUNs ("" = this host)
    src: str
    src_offset: int
    dst: str
    dst_offset: int
    length: int
    bwlimit: int = 0
    only_changed: bool = False  # resync: write only what differs from the target
    checksums: bool = False     # keep a page-digest manifest of the target (snapshot targets only)
    checkpoint_id: str = ""     # copy/checkpoint.py: resume only from this attempt's own checkpoint
    verify: bool = False        # re-read source and target and compare them before reporting done
    changed_map: str = ""       # a bitmap of the source's chunks written since the last copy (live cuts)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    running: bool
    done: bool
    bytes_done: int
    message: str = ""
    bytes_written: int = -1  # when done: bytes really written (-1: not known)
    result: Mapping[str, Any] | None = None  # the copy's closing JSON event, when it printed one
    mismatch: bool = False   # the copy's own verification found the target differs (exit 3)


def closing_event(text: str) -> dict[str, Any] | None:
    """The copy's closing JSON event (done / error / cancelled) from its last output line."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    try:
        ev = json.loads(lines[-1])
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("event") not in ("done", "error", "cancelled"):
        return None
    return ev


def copy_args(copy: HostCopy, *, progress_file: str, sums_file: str) -> list[str]:
    """`csi-virtvol copy` arguments for one step (after the `copy` word)."""
    argv = ["--src", f"{copy.src}:{copy.src_offset}:{copy.length}", "--dst", f"{copy.dst}:{copy.dst_offset}",
            "--progress-file", progress_file, "--resume-from", "auto", "--progress"]
    if copy.checkpoint_id:
        argv += ["--checkpoint-id", copy.checkpoint_id]
    if copy.verify:
        argv.append("--verify")
    if copy.bwlimit:
        argv += ["--bwlimit", str(copy.bwlimit)]
    if copy.only_changed:
        argv.append("--only-changed")
    if copy.changed_map:
        argv += ["--changed-map", copy.changed_map]
    if copy.checksums:
        argv += ["--checksums", sums_file]
    return argv


class CopyRunner(Protocol):
    def start(self, copy: HostCopy) -> None:
        """Start (or, if already running, leave running) the copy, resuming from
        its last durable checkpoint."""

    def poll(self, job: str) -> JobStatus: ...

    def stop(self, job: str) -> None:
        """Stop the copy but keep its checkpoint: start() resumes it (possibly reading another
        source path: the same image, e.g. a cut's view of the LUNs it read).  Stopping what is
        not running is fine."""

    def cancel(self, job: str) -> None:
        """Stop the copy and forget it; stopping what is not running is fine."""

    def forget(self, job: str) -> None:
        """Cancel, and drop what outlives a copy (its target's checksum manifest)."""

    def finished(self, job: str) -> None:
        """The step succeeded and its result is recorded: tidy up what only served it."""

    def close(self) -> None:
        """Stop what follows the copies (the process ends)."""


class LocalCopyRunner:
    """Host copies as child processes of this controller (standalone mode)."""

    def __init__(self, *, work_dir: str) -> None:
        self._dir = work_dir
        os.makedirs(work_dir, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _progress(self, job: str) -> str:
        return os.path.join(self._dir, f"{job}.progress.json")

    def _sums(self, job: str) -> str:
        return os.path.join(self._dir, f"{job}.sums")

    def _log(self, job: str) -> str:
        return os.path.join(self._dir, f"{job}.log")

    def start(self, copy: HostCopy) -> None:
        proc = self._procs.get(copy.job)
        if proc is not None and proc.poll() is None:
            return
        argv = [sys.executable, "-m", "csi_virtvol", "copy",
                *copy_args(copy, progress_file=self._progress(copy.job), sums_file=self._sums(copy.job))]
        with open(self._log(copy.job), "ab") as out:
            try:
                self._procs[copy.job] = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, PARENT_ENV: str(os.getpid())})
            except OSError as e:
                raise errors.BackendError(f"cannot start host copy {copy.job}: {e}") from e
        log.info("host copy %s started: %s -> %s (%d bytes)", copy.job, copy.src, copy.dst, copy.length)

    def _done_bytes(self, job: str) -> int:
        try:
            with open(self._progress(job)) as fh:
                return int(json.load(fh).get("bytes_done", 0))
        except (OSError, ValueError):
            return 0

    def poll(self, job: str) -> JobStatus:
        proc = self._procs.get(job)
        done = self._done_bytes(job)
        if proc is None:
            return JobStatus(running=False, done=False, bytes_done=done, message="not running")
        rc = proc.poll()
        if rc is None:
            return JobStatus(running=True, done=False, bytes_done=done)
        ev = closing_event(self._tail(job))
        if rc == 0:
            written = int(ev.get("bytes_written", -1)) if ev is not None and ev["event"] == "done" else -1
            return JobStatus(running=False, done=True, bytes_done=done, bytes_written=written, result=ev)
        return JobStatus(running=False, done=False, bytes_done=done, result=ev, mismatch=rc == EXIT_MISMATCH,
                         message=f"copy exited with {rc}: {self._tail(job)}")

    def _tail(self, job: str) -> str:
        try:
            with open(self._log(job), "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 1000))
                return fh.read().decode(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return ""

    def stop(self, job: str) -> None:
        proc = self._procs.pop(job, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    def cancel(self, job: str) -> None:
        self.stop(job)
        for path in (self._progress(job), self._log(job)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def finished(self, job: str) -> None:
        self.cancel(job)  # a finished child: its progress file and log are no longer needed

    def forget(self, job: str) -> None:
        self.cancel(job)
        try:
            os.unlink(self._sums(job))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for job in list(self._procs):
            proc = self._procs.pop(job)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
