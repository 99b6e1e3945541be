"""An iSCSI LUN as a local block device, through open-iscsi (node side).

A LUN address is ``iscsi://<portal>/<target-iqn>/<lun>``, e.g.
``iscsi://127.0.0.1:3260/iqn.2003-01.org.example:a1/3`` (an IPv6 portal is
bracketed: ``[::1]:3260``).

`attach(address)` logs in to the target when this host has no session to it
(``iscsiadm`` discovery, then login with ``node.session.scan = manual``, so a
login makes no SCSI devices by itself), then scans for that one LUN through
the session's SCSI host and returns its ``/dev/sdX``.  Called again for an
attached LUN it rescans it (a grown LUN shows its new size) and returns the
same device.  `detach(address)` flushes and deletes that LUN's SCSI device,
and logs out when the session has no other SCSI device left: with manual
scanning a SCSI device exists only for a LUN someone attached, so "no device
left" is "no other LUN of this target in use".  Both are idempotent and
serialised on this host by a lock file.

iscsid must be running (a node's iscsid service; the VM tests start it).  This
host's initiator name, which a target's ACL must list, is `initiator_name()`.

Attachments are not reference-counted across callers: two users of the same
LUN on one host (the controller's `open_path` and a node stage on the same
machine) share one device, and either one's detach removes it.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.transport import flock
from csi_virtvol.transport.sysfs import read as _read, write as _write

logger = logging.getLogger(__name__)

SCHEME = "iscsi://"
DEFAULT_PORT = 3260
INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"
LOCK_PATH = "/run/lock/csi-virtvol-iscsi.lock"
COMMAND_TIMEOUT = 60.0
DEVICE_WAIT_SECONDS = 20.0
POLL = 0.05
ISCSI_ERR_SESS_EXISTS = 15   # iscsiadm: already logged in
ISCSI_ERR_NO_OBJS_FOUND = 21  # iscsiadm: no session / node record

_SYS_SESSIONS = "/sys/class/iscsi_session"
_SYS_CONNECTIONS = "/sys/class/iscsi_connection"
_SYS_SCSI_DEVICES = "/sys/class/scsi_device"
_SYS_SCSI_HOSTS = "/sys/class/scsi_host"
_IQN = re.compile(r"(iqn\.\d{4}-\d{2}\.[^\s/]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})")
_HOST = re.compile(r"^host(\d+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class IscsiAddress:
    host: str      # IP or name, without brackets
    port: int
    iqn: str
    lun: int

    @property
    def portal(self) -> str:
        """``host:port`` as iscsiadm and the configfs portal names spell it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return format_address(portal=self.portal, iqn=self.iqn, lun=self.lun)


def format_address(*, portal: str, iqn: str, lun: int) -> str:
    return f"{SCHEME}{portal}/{iqn}/{lun}"


def parse_address(address: str) -> IscsiAddress:
    """``iscsi://portal/iqn/lun`` -> its parts; errors.InvalidRequest when malformed."""
    if not address.startswith(SCHEME):
        raise errors.InvalidRequest(f"not an iSCSI address: {address!r}")
    rest = address[len(SCHEME):]
    parts = rest.split("/")
    if len(parts) != 3 or not parts[0] or not _IQN.fullmatch(parts[1]) or not parts[2].isdigit():
        raise errors.InvalidRequest(f"iSCSI address {address!r} is not iscsi://<portal>/<iqn>/<lun>")
    host, port = split_portal(parts[0])
    return IscsiAddress(host=host, port=port, iqn=parts[1], lun=int(parts[2]))


def split_portal(portal: str) -> tuple[str, int]:
    """``"10.0.0.1:3260"`` / ``"10.0.0.1"`` / ``"[::1]:3260"`` -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", portal)
    if not m:
        raise errors.InvalidRequest(f"not an iSCSI portal: {portal!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise errors.InvalidRequest(f"iSCSI portal {portal!r}: bad port")
    return host, port


def initiator_name(path: str = INITIATOR_FILE) -> str:
    """This host's iSCSI initiator name (``InitiatorName=`` in open-iscsi's file)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "InitiatorName" and value.strip():
                    return value.strip()
    except OSError as e:
        raise errors.BackendUnavailable(f"cannot read the iSCSI initiator name from {path}: {e}") from e
    raise errors.BackendUnavailable(f"{path} has no InitiatorName")


# ---- attach / detach ---------------------------------------------------------------------

def attach(address: str) -> str:
    """The LUN at `address` as a local block device (``/dev/sdX``); idempotent.
    errors.NotFound when the target does not show that LUN to this initiator."""
    addr = parse_address(address)
    with _locked():
        host = _session_host(addr)
        if host is None:
            _login(addr)
            host = _session_host(addr)
            if host is None:
                raise errors.BackendError(f"{address}: logged in, but no iSCSI session appeared")
        hctl = _scsi_device(host, addr.lun)
        if hctl is None:
            _load_sd()
            _write(os.path.join(_SYS_SCSI_HOSTS, f"host{host}", "scan"), f"- - {addr.lun}")
            hctl = _scsi_device(host, addr.lun)
            if hctl is None:
                raise errors.NotFound(f"{address}: target {addr.iqn} shows no LUN {addr.lun} to this "
                                      f"initiator (no ACL mapping?)")
        else:  # already there: pick up a new size
            _write(os.path.join(_SYS_SCSI_DEVICES, hctl, "device", "rescan"), "1")
        dev = _wait_block_device(hctl, address)
    logger.info("attached %s as %s", address, dev)
    return dev


def detach(address: str) -> None:
    """Remove the LUN's local device; log out when it was the target's last one here."""
    addr = parse_address(address)
    with _locked():
        host = _session_host(addr)
        if host is None:
            return
        hctl = _scsi_device(host, addr.lun)
        if hctl is not None:
            dev = _block_device(hctl)
            if dev:
                _flush(dev)
            with contextlib.suppress(FileNotFoundError):
                _write(os.path.join(_SYS_SCSI_DEVICES, hctl, "device", "delete"), "1")
            logger.info("detached %s (%s)", address, dev or hctl)
        if not _host_devices(host):
            _iscsiadm(["-m", "node", "-T", addr.iqn, "-p", addr.portal, "--logout"],
                      what=f"log out of {addr.iqn}", ok=(ISCSI_ERR_NO_OBJS_FOUND,))
            logger.info("logged out of %s at %s", addr.iqn, addr.portal)


def device_of(address: str) -> str | None:
    """The local block device of an attached LUN, or None (no login, no scan)."""
    addr = parse_address(address)
    host = _session_host(addr)
    if host is None:
        return None
    hctl = _scsi_device(host, addr.lun)
    if hctl is None:
        return None
    dev = _block_device(hctl)
    return dev or None


def sessions() -> list[tuple[str, str]]:
    """(target IQN, portal) of every iSCSI session of this host."""
    out = []
    for sdir in sorted(glob.glob(os.path.join(_SYS_SESSIONS, "session*"))):
        iqn = _read(os.path.join(sdir, "targetname"))
        for host, port in _session_portals(sdir):
            out.append((iqn, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    return out


# ---- internals -----------------------------------------------------------------------------

def _login(addr: IscsiAddress) -> None:
    _iscsiadm(["-m", "discovery", "-t", "sendtargets", "-p", addr.portal],
              what=f"discover targets at {addr.portal}")
    _iscsiadm(["-m", "node", "-T", addr.iqn, "-p", addr.portal, "-o", "update",
               "-n", "node.session.scan", "-v", "manual"], what=f"configure {addr.iqn}")
    _iscsiadm(["-m", "node", "-T", addr.iqn, "-p", addr.portal, "--login"],
              what=f"log in to {addr.iqn} at {addr.portal}", ok=(ISCSI_ERR_SESS_EXISTS,))
    logger.info("logged in to %s at %s", addr.iqn, addr.portal)


def _load_sd() -> None:
    """sd_mod is loaded by udev when the first disk appears; without udev, here."""
    if os.path.isdir("/sys/module/sd_mod"):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["modprobe", "sd_mod"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=COMMAND_TIMEOUT, check=False)


def _session_portals(sdir: str) -> Iterator[tuple[str, int]]:
    sid = os.path.basename(sdir)[len("session"):]
    for cdir in glob.glob(os.path.join(_SYS_CONNECTIONS, f"connection{sid}:*")):
        host = _read(os.path.join(cdir, "persistent_address")) or _read(os.path.join(cdir, "address"))
        port = _read(os.path.join(cdir, "persistent_port")) or _read(os.path.join(cdir, "port"))
        if host and port.isdigit():
            yield host, int(port)


def _session_host(addr: IscsiAddress) -> int | None:
    """The SCSI host number of this host's session to (addr.iqn, addr.portal), or None."""
    for sdir in glob.glob(os.path.join(_SYS_SESSIONS, "session*")):
        if _read(os.path.join(sdir, "targetname")) != addr.iqn:
            continue
        if not any(h == addr.host and p == addr.port for h, p in _session_portals(sdir)):
            continue
        if _read(os.path.join(sdir, "state")) not in ("", "LOGGED_IN"):
            continue
        for part in reversed(os.path.realpath(os.path.join(sdir, "device")).split(os.sep)):
            m = _HOST.match(part)
            if m:
                return int(m.group(1))
    return None


def _host_devices(host: int) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(os.path.join(_SYS_SCSI_DEVICES, f"{host}:*"))]


def _scsi_device(host: int, lun: int) -> str | None:
    """The ``H:C:T:L`` of `lun` on SCSI host `host`, or None."""
    for hctl in _host_devices(host):
        if hctl.rsplit(":", 1)[-1] == str(lun):
            return hctl
    return None


def _block_device(hctl: str) -> str:
    try:
        names = os.listdir(os.path.join(_SYS_SCSI_DEVICES, hctl, "device", "block"))
    except OSError:
        return ""
    return f"/dev/{names[0]}" if names else ""


def _wait_block_device(hctl: str, address: str) -> str:
    """sd probes asynchronously: the disk (and its /dev node) follows the scan."""
    deadline = time.monotonic() + DEVICE_WAIT_SECONDS
    while True:
        dev = _block_device(hctl)
        if dev and _openable(dev):
            return dev
        if time.monotonic() > deadline:
            raise errors.BackendError(f"{address}: SCSI device {hctl} has no block device "
                                      f"after {DEVICE_WAIT_SECONDS:g} s (is sd_mod loaded?)")
        time.sleep(POLL)


def _openable(dev: str) -> bool:
    """The disk is registered and has its size (its sysfs entry comes a little earlier)."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_END) > 0
    finally:
        os.close(fd)


def _flush(dev: str) -> None:
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        logger.warning("cannot open %s to flush it: %s", dev, e)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        logger.warning("flush %s: %s", dev, e)
    finally:
        os.close(fd)




def _iscsiadm(args: Sequence[str], *, what: str, ok: tuple[int, ...] = ()) -> str:
    argv = ["iscsiadm", *args]
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise errors.BackendUnavailable("iscsiadm is not installed (open-iscsi)") from e
    except subprocess.TimeoutExpired as e:
        raise errors.BackendError(f"{what}: iscsiadm timed out") from e
    if res.returncode == 0 or res.returncode in ok:
        return res.stdout
    msg = (res.stderr.strip() or res.stdout.strip()).replace("\n", "; ")
    if "iscsid" in msg.lower() and ("connect" in msg.lower() or "socket" in msg.lower()):
        raise errors.BackendUnavailable(f"{what}: iscsid is not running: {msg}")
    raise errors.BackendError(f"{what}: iscsiadm rc={res.returncode}: {msg}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with flock.exclusive(LOCK_PATH, what="iSCSI"):
        yield


__all__ = ["SCHEME", "IscsiAddress", "parse_address", "format_address", "split_portal",
           "initiator_name", "attach", "detach", "device_of", "sessions"]
