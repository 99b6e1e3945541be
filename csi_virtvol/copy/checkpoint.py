"""A host copy's checkpoint belongs to one target and one cut.

A copy's progress file (``--progress-file``) is named after its step, and a
step's name is deterministic (the pair id and the extent index): a copy that
is discarded and made again, or re-copied after a failed verification, gets
the same name and the same file.  Resuming from the previous attempt's
checkpoint would skip writing into a freshly made, empty target.

So each checkpoint carries an identity (`identity`): the pair, the target LUN,
the pair's cut time (a new image of the source is a new cut) and the attempt.
`--resume-from auto` resumes only from a checkpoint of the same identity; any
other checkpoint is stale, and the copy starts from 0 and overwrites it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from csi_virtvol import errors

log = logging.getLogger(__name__)

KEY = "checkpoint_id"


def identity(*, pair: str, target: str, cut_at: float, attempt: int = 0) -> str:
    """The identity of one attempt at copying into `target` (array:lun) of `pair` cut at `cut_at`."""
    base = f"{pair}/{target}@{cut_at!r}"
    return f"{base}#{attempt}" if attempt else base


def parse(ident: str) -> tuple[str, float] | None:
    """(pair, cut time) of an identity made by `identity`; None if it is not one."""
    pair, sep, rest = ident.partition("/")
    if not sep or not pair or "@" not in rest:
        return None
    cut = rest.rpartition("@")[2].partition("#")[0]
    try:
        return pair, float(cut)
    except ValueError:
        return None


def resume_offset(data: Mapping[str, Any] | None, *, where: Mapping[str, Any], checkpoint_id: str,
                  path: str) -> int:
    """Where to resume, from the checkpoint `data` read from `path` (None: there is none).

    `where` is what the copy copies (paths, offsets, length): a checkpoint of
    another range is a mistake in the caller's arguments and is refused.  A
    checkpoint of the same range but another identity is a previous attempt's:
    it is ignored (0), and the copy's first checkpoint replaces it.

    With an identity, where the source is read from (`src`, `src_offset`) is not
    compared: the identity names the image, and one image may be read through
    several paths (a source's LUNs, then the view of a cut its node made before
    anything wrote them, services/cut.publish_mid_copy)."""
    if data is None:
        return 0
    for k, v in where.items():
        if checkpoint_id and k in ("src", "src_offset"):
            continue
        if data.get(k) != v:
            raise errors.InvalidRequest(
                f"progress file {path} is for another copy ({k}={data.get(k)!r}, not {v!r})")
    have = str(data.get(KEY, ""))
    if have != checkpoint_id:
        log.warning("progress file %s is of another attempt (%r, not %r): copying from the start",
                    path, have, checkpoint_id)
        return 0
    done = data.get("bytes_done", 0)
    if not isinstance(done, int) or done < 0:
        raise errors.InvalidRequest(f"progress file {path}: bad bytes_done {done!r}")
    return done


def remove(path: str) -> None:
    """Drop a checkpoint (and a leftover temporary of it); missing is fine."""
    for p in (path, f"{path}.tmp.{os.getpid()}"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove checkpoint %s: %s", p, e)


__all__ = ["identity", "parse", "resume_offset", "remove", "KEY"]
