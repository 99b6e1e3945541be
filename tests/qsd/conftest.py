"""Fixtures for the qsd tests: arrays whose qemu-storage-daemon the driver starts."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol.backends.qsd import QsdDriver
from qsdarrays import spec_for


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[QsdDriver]]:
    """Two arrays, each its own qemu-storage-daemon started by the driver."""
    drivers = [QsdDriver(spec_for(tmp_path / n, n)) for n in ("qa", "qb")]
    try:
        yield drivers
    finally:
        for d in drivers:
            d.shutdown()


@pytest.fixture
def daemon(daemons: list[QsdDriver]) -> QsdDriver:
    return daemons[0]
