"""`csi-virtvol copy`: the host copy a copy pod runs.

    copy --src PATH[:OFFSET[:LENGTH]] --dst PATH[:OFFSET] [--resume-from N|auto]
         [--verify] [--bwlimit 100M] [--progress-file F] [--progress]

Sizes take binary suffixes (K, M, G, T; "100M" = 100 MiB).  With --progress
the copy reports on stdout: a bar on a terminal, else one JSON object per line
(`{"event": "progress", "bytes_done": ...}`, then `{"event": "done", ...}`).
--progress-file keeps the last durable checkpoint as a JSON file (replaced
atomically), and `--resume-from auto` continues from it after a restart.
SIGTERM/SIGINT stop the copy at a checkpoint.

Exit status: 0 done, 1 failed, 2 bad usage, 3 verification mismatch,
130/143 stopped by SIGINT/SIGTERM.

Importable without grpc; the main CLI adds it with `add_arguments` + `run`.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any, TextIO

from csi_virtvol import errors, failpoints
from csi_virtvol.copy import checkpoint, engine

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3
VERIFY_METHOD = "blake2b-256"  # what --verify compares: each chunk of source and target re-read

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4096', '4k', '100M', '1GiB', '2G' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _is_size(text: str) -> bool:
    return text == "" or _SIZE.match(text) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    path: str
    offset: int = 0
    length: int | None = None


def parse_endpoint(spec: str, *, with_length: bool) -> Endpoint:
    """PATH[:OFFSET[:LENGTH]]; trailing fields are taken only when they are
    sizes, so a path with colons (/dev/disk/by-path/pci-0000:00:...) stays whole."""
    parts = spec.split(":")
    nums: list[str] = []
    limit = 2 if with_length else 1
    while len(parts) > 1 and len(nums) < limit and _is_size(parts[-1]):
        nums.insert(0, parts.pop())
    path = ":".join(parts)
    if not path:
        raise ValueError(f"no path in {spec!r}")
    offset = parse_size(nums[0]) if nums and nums[0] else 0
    length = parse_size(nums[1]) if len(nums) > 1 and nums[1] else None
    return Endpoint(path=path, offset=offset, length=length)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, metavar="PATH[:OFFSET[:LENGTH]]",
                   help="source file or block device, optional byte offset and length")
    p.add_argument("--dst", required=True, metavar="PATH[:OFFSET]",
                   help="target file or block device, optional byte offset")
    p.add_argument("--resume-from", default="0", metavar="N|auto",
                   help="bytes into the range to start at; 'auto' reads --progress-file")
    p.add_argument("--verify", action="store_true", help="re-read both and compare hashes")
    p.add_argument("--bwlimit", type=parse_size, default=None, metavar="RATE",
                   help="bytes per second, e.g. 100M")
    p.add_argument("--progress-file", default=None, metavar="F",
                   help="keep the last durable checkpoint in F (JSON)")
    p.add_argument("--checkpoint-id", default="", metavar="ID",
                   help="the identity of this attempt (target and cut): --resume-from auto "
                        "resumes only from a checkpoint of the same identity")
    p.add_argument("--result-file", default=None, metavar="F",
                   help="also write the closing JSON event to F (a pod's /dev/termination-log)")
    p.add_argument("--progress", action="store_true",
                   help="report progress on stdout (bar on a TTY, else JSON lines)")
    p.add_argument("--chunk-size", type=parse_size, default=engine.DEFAULT_CHUNK)
    p.add_argument("--checkpoint-bytes", type=parse_size, default=256 << 20)
    p.add_argument("--checkpoint-seconds", type=float, default=None)
    p.add_argument("--no-direct", action="store_true", help="never use O_DIRECT")
    p.add_argument("--no-zero-copy", action="store_true", help="never use copy_file_range")
    p.add_argument("--no-sparse", action="store_true", help="write holes and zeros too")
    p.add_argument("--target-zeroed", action="store_true",
                   help="the target range already reads as zeros: skip writing zeros")
    p.add_argument("--only-changed", action="store_true",
                   help="resync: write only the pages that differ from the target")
    p.add_argument("--changed-map", default="", metavar="BITMAP",
                   help="copy only the 64 KiB chunks of the source set in this bitmap (a live cut's "
                        "record of what was written since the last copy)")
    p.add_argument("--checksums", default="",
                   help="a page-digest manifest of the target: written after a copy, and with "
                        "--only-changed used to resync reading the source only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csi-virtvol copy",
                                description="Copy a byte range between files or block devices.")
    add_arguments(p)
    return p


class _Reporter:
    def __init__(self, *, out: TextIO, enabled: bool, total: int, start: int,
                 progress_file: str | None, ident: dict[str, Any], result_file: str | None = None) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = out.isatty()
        self.total = total
        self.start = start
        self.progress_file = progress_file
        self.ident = ident
        self.result_file = result_file
        self.t0 = time.monotonic()

    def checkpoint(self, done: int) -> None:
        if self.progress_file:
            write_progress_file(self.progress_file, {**self.ident, "bytes_done": done,
                                                     "bytes_total": self.total,
                                                     "time": time.time()})
            if done < self.total:
                failpoints.hit("copier-checkpointed")
        if not self.enabled:
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        rate = (done - self.start) / dt
        if self.tty:
            frac = done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            self.out.write(f"\r[{bar:<30}] {frac * 100:5.1f}% {done >> 20}/{self.total >> 20} "
                           f"MiB {rate / (1 << 20):7.1f} MiB/s")
        else:
            self.out.write(json.dumps({"event": "progress", "bytes_done": done,
                                       "bytes_total": self.total, "rate": round(rate),
                                       "elapsed": round(dt, 3)}) + "\n")
        self.out.flush()

    def finish(self, event: dict[str, Any]) -> None:
        if self.result_file:  # small: a termination message holds at most 4 KiB
            try:
                with open(self.result_file, "w", encoding="utf-8") as f:
                    json.dump(event, f)
            except OSError as e:
                logger.warning("could not write the result to %s: %s", self.result_file, e)
        if self.tty and self.enabled:
            self.out.write("\n")
        if self.tty:
            self.out.write(" ".join(f"{k}={v}" for k, v in event.items()) + "\n")
        else:
            self.out.write(json.dumps(event) + "\n")
        self.out.flush()


def write_progress_file(path: str, data: dict[str, Any]) -> None:
    """Replace `path` atomically (write, fsync, rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_progress_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise errors.InvalidRequest(f"unreadable progress file {path}: {e}") from e
    if not isinstance(data, dict):
        raise errors.InvalidRequest(f"progress file {path} does not hold an object")
    return data


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        src = parse_endpoint(args.src, with_length=True)
        dst = parse_endpoint(args.dst, with_length=False)
    except ValueError as e:
        print(f"csi-virtvol copy: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        length = src.length if src.length is not None else \
            max(0, engine.path_size(src.path) - src.offset)
        where = {"src": src.path, "src_offset": src.offset, "dst": dst.path,
                 "dst_offset": dst.offset, "length": length}
        ident = {**where, checkpoint.KEY: args.checkpoint_id}
        resume = _resume_offset(args.resume_from, args.progress_file, where, args.checkpoint_id)
    except ValueError as e:
        print(f"csi-virtvol copy: {e}", file=sys.stderr)
        return EXIT_USAGE
    except errors.VirtvolError as e:
        print(f"csi-virtvol copy: {e}", file=sys.stderr)
        return EXIT_FAILED
    tty = out.isatty()
    opts = engine.CopyOptions(
        chunk_size=args.chunk_size, direct=not args.no_direct,
        zero_copy=not args.no_zero_copy, sparse=not args.no_sparse,
        target_zeroed=args.target_zeroed, only_changed=args.only_changed, checksums=args.checksums, changed_map=args.changed_map, verify=args.verify, bwlimit=args.bwlimit,
        checkpoint_bytes=args.checkpoint_bytes,
        checkpoint_seconds=(args.checkpoint_seconds if args.checkpoint_seconds is not None
                            else (0.5 if tty and args.progress else 2.0)))
    rep = _Reporter(out=out, enabled=args.progress, total=length, start=resume,
                    progress_file=args.progress_file, ident=ident, result_file=args.result_file)
    cancel = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        cancel.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        failpoints.hit("copier-started")
        res = engine.copy_range(src=src.path, dst=dst.path, src_offset=src.offset,
                                dst_offset=dst.offset, length=length, resume_from=resume,
                                options=opts, on_progress=rep.checkpoint, cancel=cancel)
        failpoints.hit("copier-verified" if res.verified else "copier-done")
    except engine.CopyCancelled as e:
        rep.finish({"event": "cancelled", "bytes_done": e.bytes_done, "bytes_total": length})
        return 128 + (got[0] if got else signal.SIGTERM)
    except engine.VerifyMismatch as e:
        if args.progress_file:  # what the checkpoint promised is not on the target: never resume from it
            checkpoint.remove(args.progress_file)
        rep.finish({"event": "error", "error": str(e), "offset": e.offset, "mismatch": True,
                    "verify": VERIFY_METHOD})
        return EXIT_MISMATCH
    except errors.VirtvolError as e:
        rep.finish({"event": "error", "error": str(e)})
        return EXIT_FAILED
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.progress_file:  # finished: the checkpoint only served this copy
        checkpoint.remove(args.progress_file)
    method = VERIFY_METHOD + (" of the changed chunks" if args.changed_map else "")
    rep.finish({"event": "done", **asdict(res), "checkpoint_id": args.checkpoint_id,
                **({"verify": method} if res.verified else {})})
    return EXIT_OK


def _resume_offset(value: str, progress_file: str | None, where: dict[str, Any], checkpoint_id: str) -> int:
    if value != "auto":
        return parse_size(value)
    if not progress_file:
        raise ValueError("--resume-from auto needs --progress-file")
    return checkpoint.resume_offset(read_progress_file(progress_file), where=where,
                                    checkpoint_id=checkpoint_id, path=progress_file)


PARENT_ENV = "VIRTVOL_COPY_PARENT"


def die_with_parent() -> None:
    """A copy started by a controller must not outlive it (its pair record would
    then have two writers).  The controller names itself in VIRTVOL_COPY_PARENT;
    the copy asks the kernel for SIGKILL when its parent goes, and checks the
    parent did not already go between fork and here.  (Done here, not in a
    preexec_fn: forking a threaded gRPC process through Python code crashes.)"""
    want = os.environ.get(PARENT_ENV)
    if not want:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != int(want):
        os._exit(EXIT_FAILED)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; `argv` excludes the program name (and the `copy` word)."""
    die_with_parent()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
