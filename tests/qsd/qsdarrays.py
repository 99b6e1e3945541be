"""qsd array specs for tests: the driver starts the array's qemu-storage-daemon."""
from __future__ import annotations

from pathlib import Path

from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId


def spec_for(pool: Path, name: str, **params: str) -> ArraySpec:
    return ArraySpec(id=ArrayId(name), kind="qsd", params={"pool": str(pool), "start": "true", **params})
