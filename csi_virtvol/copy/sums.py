"""Per-page checksums of what a copy target holds, so that a resync reads only
the source (seed [0090]: copy only the difference).

The manifest is a file: MAGIC, the range length, then an 8-byte BLAKE2b digest
per RESYNC page.  It describes the target *as the last copy or resync left
it*; it is valid only while nothing else writes the target, so the services
keep manifests for snapshot targets only (immutable by contract).
"""
from __future__ import annotations

import hashlib
import os
import struct

GRAIN = 4096
DIGEST = 8
MAGIC = b"VVSUMS1\n"
_HEAD = struct.Struct("<8sQQ")


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


ZERO = _digest(bytes(GRAIN))


class Sums:
    def __init__(self, length: int, table: bytearray | None = None) -> None:
        self.length = length
        self.count = -(-length // GRAIN)
        self.table = table if table is not None else self._zeros()

    def _zero(self, i: int) -> bytes:
        n = min(GRAIN, self.length - i * GRAIN)
        return ZERO if n == GRAIN else _digest(bytes(n))

    def _zeros(self) -> bytearray:
        table = bytearray(ZERO * self.count)
        tail = self.length % GRAIN
        if tail and self.count:
            table[-DIGEST:] = _digest(bytes(tail))
        return table

    @classmethod
    def load(cls, path: str, *, length: int) -> "Sums | None":
        try:
            with open(path, "rb") as fh:
                head = fh.read(_HEAD.size)
                body = bytearray(fh.read())
        except OSError:
            return None
        if len(head) != _HEAD.size:
            return None
        magic, size, grain = _HEAD.unpack(head)
        if magic != MAGIC or size != length or grain != GRAIN or len(body) != -(-length // GRAIN) * DIGEST:
            return None
        return cls(length, body)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(_HEAD.pack(MAGIC, self.length, GRAIN))
            fh.write(self.table)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def update(self, pos: int, data: memoryview) -> list[tuple[int, int]]:
        """Record `data` at range offset `pos` (a multiple of GRAIN); return the
        (start, end) runs, relative to `pos`, whose digest changed."""
        runs: list[tuple[int, int]] = []
        start = -1
        n = len(data)
        for off in range(0, n, GRAIN):
            i = (pos + off) // GRAIN
            d = _digest(data[off:off + GRAIN])
            changed = self.table[i * DIGEST:(i + 1) * DIGEST] != d
            if changed:
                self.table[i * DIGEST:(i + 1) * DIGEST] = d
                if start < 0:
                    start = off
            elif start >= 0:
                runs.append((start, off))
                start = -1
        if start >= 0:
            runs.append((start, n))
        return runs

    def set_zero(self, pos: int, n: int) -> bool:
        """Record zeros over [pos, pos+n); return whether any page held other data."""
        changed = False
        for off in range(0, n, GRAIN):
            i = (pos + off) // GRAIN
            z = self._zero(i)
            if self.table[i * DIGEST:(i + 1) * DIGEST] != z:
                self.table[i * DIGEST:(i + 1) * DIGEST] = z
                changed = True
        return changed
