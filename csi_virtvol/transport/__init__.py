"""How this host reaches a LUN: its recorded address becomes a local path.

A LUN's `address` says how to reach it: an absolute path (a file-pool image, an
LVM logical volume) is already local; ``nbd://`` and ``nbd+unix://`` URIs (qsd
arrays) become /dev/nbdN where the kernel has nbd (nbd-client), else a regular file
through nbdfuse; ``iscsi://`` addresses
(lio arrays) become a /dev/sdX through open-iscsi (transport.iscsi).  `Attacher` keeps one
record per user (a staged volume) of the addresses it attached, so an address is
detached when its last user lets go, also after a restart of the plugin.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence

from csi_virtvol import errors
from csi_virtvol.transport import iscsi, nbdfuse, nbdkernel

logger = logging.getLogger(__name__)

NBD_SCHEMES = ("nbd://", "nbd+unix://")


def _key(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()[:20]


class Attacher:
    """Attach addresses for named users under `root` (the node's state directory)."""

    def __init__(self, root: str, *, prefer_kernel_nbd: bool = True) -> None:
        self._root = root
        self._users = os.path.join(root, "users")
        self._nbd = os.path.join(root, "nbd")
        self._nbd_devices = os.path.join(root, "nbd-devices")
        self._guard = threading.Lock()
        self._kernel: bool | None = None
        self._prefer_kernel = prefer_kernel_nbd

    def _kernel_nbd(self) -> bool:
        """Kernel nbd where the node has it (the fast path), else nbdfuse; decided once."""
        if self._kernel is None:
            self._kernel = self._prefer_kernel and nbdkernel.available()
            logger.info("NBD LUNs attach through %s", "kernel nbd" if self._kernel else "nbdfuse")
        return self._kernel

    def attach(self, *, user: str, addresses: Sequence[str]) -> list[str]:
        """Local paths for `addresses`, in order; recorded for `user` first, so a crash
        midway leaves nothing that `detach_user` cannot find."""
        with self._guard:
            known = self._load(user)
            self._save(user, sorted(set(known) | set(addresses)))
        return [self._attach_one(a) for a in addresses]

    def detach_user(self, *, user: str) -> None:
        """Detach what `user` attached and no other user still holds; idempotent."""
        with self._guard:
            mine = self._load(user)
            others = {a for u in self._all_users() if u != user for a in self._load(u)}
            for address in mine:
                if address not in others:
                    self._detach_one(address)
            try:
                os.unlink(self._record(user))
            except FileNotFoundError:
                pass

    def users(self) -> list[str]:
        with self._guard:
            return self._all_users()

    # -- one address -------------------------------------------------------------------

    def _attach_one(self, address: str) -> str:
        if address.startswith("/"):
            if not os.path.exists(address):
                raise errors.NotFound(f"LUN path {address} does not exist on this node")
            return address
        if address.startswith(NBD_SCHEMES):
            if self._kernel_nbd():
                return nbdkernel.connect(address, records=self._nbd_devices)
            return nbdfuse.mount(address, os.path.join(self._nbd, _key(address)))
        if address.startswith(iscsi.SCHEME):
            return iscsi.attach(address)
        raise errors.UnsupportedCapability(f"this node cannot reach LUN address {address!r}")

    def _detach_one(self, address: str) -> None:
        if address.startswith(iscsi.SCHEME):
            iscsi.detach(address)
            return
        if address.startswith(NBD_SCHEMES):
            nbdkernel.disconnect(address, records=self._nbd_devices)
            point = os.path.join(self._nbd, _key(address))
            nbdfuse.unmount(point)
            for leftover in (point, os.path.join(self._nbd, f".{_key(address)}.pid")):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
            logger.info("detached %s", address)

    # -- records -------------------------------------------------------------------------

    def _record(self, user: str) -> str:
        return os.path.join(self._users, f"{_key(user)}.json")

    def _load(self, user: str) -> list[str]:
        try:
            with open(self._record(user), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise errors.BackendError(f"attachment record of {user} is unreadable: {e}") from e
        return [str(a) for a in data.get("addresses", [])]

    def _save(self, user: str, addresses: list[str]) -> None:
        os.makedirs(self._users, exist_ok=True)
        tmp = self._record(user) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"user": user, "addresses": addresses}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._record(user))

    def _all_users(self) -> list[str]:
        out = []
        try:
            entries = sorted(os.listdir(self._users))
        except FileNotFoundError:
            return []
        for name in entries:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self._users, name), encoding="utf-8") as f:
                    out.append(str(json.load(f)["user"]))
            except (OSError, ValueError, KeyError):
                continue
        return out


__all__ = ["Attacher", "NBD_SCHEMES"]
