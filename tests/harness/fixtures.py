from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.plugin import Plugin, running_plugin

MiB = 1 << 20
POOL_CAPACITY = 256 * MiB


@pytest.fixture
def plugin(xfs_mount: Path, ext4_mount: Path, tmp_path: Path) -> Iterator[Plugin]:
    """A plugin with a reflink XFS pool ("fast") and an ext4 pool ("slow"), 256 MiB each."""
    tag = uuid.uuid4().hex[:8]
    fast, slow = xfs_mount / f"fast-{tag}", ext4_mount / f"slow-{tag}"
    with running_plugin(tmp_path, [("fast", fast, POOL_CAPACITY, {"tier": "fast"}),
                                   ("slow", slow, POOL_CAPACITY, {"tier": "slow"})]) as p:
        yield p
    shutil.rmtree(fast, ignore_errors=True)
    shutil.rmtree(slow, ignore_errors=True)
