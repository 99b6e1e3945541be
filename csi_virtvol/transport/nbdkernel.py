"""An NBD export as a kernel block device (/dev/nbdN), through nbd-client.

The production path where the node's kernel has the nbd module; hosts without it use
`nbdfuse` instead.  Which device serves which export is recorded in a small file per
device under the caller's directory, so `connect` is idempotent and `disconnect`
finds the device again after a restart of the plugin.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import subprocess
import time

from csi_virtvol import errors
from csi_virtvol.transport.nbduri import parse_nbd_uri

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0


def available() -> bool:
    """The kernel can do NBD (loading the module if needed) and nbd-client is installed."""
    if not os.path.exists("/sys/module/nbd"):
        subprocess.run(["modprobe", "nbd", "nbds_max=64"], capture_output=True, check=False)
    return os.path.exists("/sys/module/nbd") and bool(glob.glob("/dev/nbd*")) and _has_client()


def _has_client() -> bool:
    return any(os.access(os.path.join(d, "nbd-client"), os.X_OK)
               for d in os.environ.get("PATH", "/usr/sbin:/sbin").split(":") + ["/usr/sbin", "/sbin"])


def _busy(dev: str) -> bool:
    name = os.path.basename(dev)
    if os.path.exists(f"/sys/block/{name}/pid"):
        return True
    try:
        with open(f"/sys/block/{name}/size", encoding="ascii") as f:
            return int(f.read().strip()) > 0
    except (OSError, ValueError):
        return True


def _record(records: str, dev: str) -> str:
    return os.path.join(records, os.path.basename(dev))


def _device_of(records: str, uri: str) -> str | None:
    try:
        names = os.listdir(records)
    except FileNotFoundError:
        return None
    for name in names:
        try:
            with open(os.path.join(records, name), encoding="utf-8") as f:
                if f.read() == uri:
                    return f"/dev/{name}"
        except OSError:
            continue
    return None


def connect(uri: str, *, records: str) -> str:
    """The /dev/nbdN serving `uri`, connecting a free device if none does yet."""
    dev = _device_of(records, uri)
    if dev is not None and _busy(dev):
        return dev
    if dev is not None:  # recorded, but the connection is gone (a reboot): connect it again
        os.unlink(_record(records, dev))
    server, export = parse_nbd_uri(uri)
    where = ["-u", server.unix] if server.unix else [server.host, str(server.port)]
    os.makedirs(records, exist_ok=True)
    last = ""
    for candidate in sorted(glob.glob("/dev/nbd[0-9]*"), key=lambda d: int(d[len("/dev/nbd"):])):
        if _busy(candidate) or os.path.exists(_record(records, candidate)):
            continue
        with open(_record(records, candidate), "w", encoding="utf-8") as f:  # claim it first
            f.write(uri)
        argv = ["nbd-client", "-N", export, "-b", "4096", *where, candidate]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=CONNECT_TIMEOUT)
        if proc.returncode == 0 and _wait_size(candidate):
            logger.info("connected %s as %s", uri, candidate)
            return candidate
        last = (proc.stderr or proc.stdout).strip()
        os.unlink(_record(records, candidate))
        if "already" not in last.lower() and "busy" not in last.lower():
            break
    raise errors.BackendError(f"nbd-client could not connect {uri}: {last or 'no free /dev/nbd device'}")


def _wait_size(dev: str) -> bool:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        if _busy(dev):
            return True
        time.sleep(0.05)
    return False


def disconnect(uri: str, *, records: str) -> None:
    """Disconnect the device serving `uri`; none is fine."""
    dev = _device_of(records, uri)
    if dev is None:
        return
    if _busy(dev):
        proc = subprocess.run(["nbd-client", "-d", dev], capture_output=True, text=True, check=False)
        if proc.returncode != 0 and _busy(dev):
            raise errors.BackendError(f"nbd-client -d {dev}: {proc.stderr.strip()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record(records, dev))
    logger.info("disconnected %s from %s", uri, dev)


__all__ = ["available", "connect", "disconnect"]
