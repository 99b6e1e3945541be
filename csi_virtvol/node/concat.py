"""Userspace concatenation: run the concatfs daemon and put a loop device on its file.

For hosts without device-mapper.  The daemon runs detached (its own session, reparented
away from the plugin) so a plugin restart leaves volumes working; everything needed to
find it again lives in the workdir:

    workdir/table.json    the extents it serves (rewritten, then SIGHUP, to grow)
    workdir/concatfs.pid  its pid (written by the daemon)
    workdir/concatfs.log  its log
    workdir/mnt/volume    the concatenated file; the loop device sits on it
    workdir/loop.json     that loop device's name: if the daemon dies, fusermount3 detaches
                          the mount and the loop's backing path reads "/volume", so it
                          cannot be found by path any more
    workdir/mnt/.ctl      the daemon's control file: live cuts (node/cut.py), each cut's
                          frozen view at workdir/mnt/cut-<id>, its copy-on-write store and
                          tracking bitmap under workdir/cuts and workdir/tracking (node/cow.py)
"""
from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from csi_virtvol import errors
from csi_virtvol.node import cow, devices, fs, layout
from csi_virtvol.node.cut import Changed, CutView
from csi_virtvol.node.layout import BackingExtent

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _paths(workdir: str) -> tuple[str, str, str, str, str]:
    mnt = os.path.join(workdir, "mnt")
    return (
        os.path.join(workdir, "table.json"),
        os.path.join(workdir, "concatfs.pid"),
        os.path.join(workdir, "concatfs.log"),
        mnt,
        os.path.join(mnt, layout.CONCAT_FILE_NAME),
    )


def daemon_pid(workdir: str) -> int | None:
    """The daemon's pid when it is alive and is ours."""
    _, pid_file, _, mnt, _ = _paths(workdir)
    try:
        with open(pid_file, encoding="utf-8") as f:
            pid = int(json.load(f))
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return None
    if b"csi_virtvol.node.concatfs" not in cmdline or os.fsencode(mnt) not in cmdline:
        return None
    return pid if _alive(pid) else None


def _serving(mnt: str) -> bool:
    info = fs.mount_info(mnt)
    return info is not None and info.fs_type.startswith("fuse")


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class FuseComposer:
    kind = "fuse"

    def assemble(
        self, *, workdir: str, name: str, extents: Sequence[BackingExtent], readonly: bool
    ) -> str:
        layout.validate(extents)
        table_path, _, _, mnt, file = _paths(workdir)
        os.makedirs(mnt, exist_ok=True)
        table = layout.Table(extents=tuple(extents), readonly=readonly)
        try:
            current: layout.Table | None = layout.Table.load(table_path)
        except FileNotFoundError:
            current = None
        if current is not None and current.extents != table.extents:
            if not layout.is_extension(current.extents, table.extents):
                raise errors.InvalidRequest(
                    f"volume {name}: the new extents would move bytes already in place"
                )
        if current is not None and current.readonly != readonly and daemon_pid(workdir):
            raise errors.PreconditionFailed(
                f"volume {name} is assembled {'read-only' if current.readonly else 'read-write'}"
            )
        if current != table:
            table.save(table_path)
        pid = daemon_pid(workdir)
        if pid is None:
            self._start(workdir)
        elif current is not None and current.extents != table.extents:
            os.kill(pid, signal.SIGHUP)
        self._wait_size(workdir, table.size)
        loop = devices.attach(file, direct_io=True, readonly=readonly)
        layout.write_json_atomic(os.path.join(workdir, "loop.json"), loop)
        if devices.device_size(loop) != table.size:
            devices.refresh_capacity(loop)
        return loop

    def grow(self, *, workdir: str, name: str, extents: Sequence[BackingExtent]) -> str:
        table_path, _, _, _, file = _paths(workdir)
        try:
            readonly = layout.Table.load(table_path).readonly
        except FileNotFoundError as e:
            raise errors.NotFound(f"volume {name} is not assembled") from e
        loop = self.assemble(workdir=workdir, name=name, extents=extents, readonly=readonly)
        size = devices.refresh_capacity(loop)
        want = layout.total_size(extents)
        if size != want:
            raise errors.BackendError(f"{loop} has {size} bytes after growing, expected {want}")
        return loop

    def device(self, *, workdir: str, name: str) -> str | None:
        file = _paths(workdir)[4]
        loops = devices.find_all(file)
        return loops[0].name if loops else None

    def teardown(self, *, workdir: str, name: str) -> None:
        _, pid_file, _, mnt, file = _paths(workdir)
        for lo in devices.find_all(file):
            devices.detach(lo.name)
        orphan = _recorded_loop(workdir)
        if orphan is not None and devices.backing_file(orphan) == "/" + layout.CONCAT_FILE_NAME:
            logger.warning("%s: detaching %s, left on the concatenation of a dead daemon", name, orphan)
            devices.detach(orphan)
        pid = daemon_pid(workdir)
        if _serving(mnt) or fs.mount_info(mnt) is not None:
            # The kernel drops the loop's hold on the file a moment after the detach.
            fs.unmount(mnt, busy_retries=20)
        if pid is not None:
            self._wait_exit(pid, STOP_TIMEOUT, signal.SIGTERM)
            if daemon_pid(workdir) is not None:
                self._wait_exit(pid, STOP_TIMEOUT, signal.SIGKILL)
        if fs.mount_info(mnt) is not None:  # the daemon died: a stale mount is left
            fs.unmount(mnt)
        for leftover in (pid_file, os.path.join(workdir, "loop.json")):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        logger.info("concatenation of %s torn down", name)

    def problem(self, *, workdir: str, name: str) -> str | None:
        table_path, _, _, mnt, file = _paths(workdir)
        if daemon_pid(workdir) is None:
            return f"the concatenation daemon of {name} is not running"
        if not _serving(mnt):
            return f"the concatenation of {name} is not mounted at {mnt}"
        try:
            os.stat(file)
        except OSError as e:
            return f"the concatenation of {name} does not answer: {e.strerror}"
        if not devices.find_all(file):
            return f"no loop device sits on the concatenation of {name}"
        return None

    # -- live cuts (node/cut.CutCapable) ---------------------------------------------------

    def _ctl(self, workdir: str, name: str, req: dict[str, object]) -> dict[str, object]:
        mnt = _paths(workdir)[3]
        if daemon_pid(workdir) is None or not _serving(mnt):
            raise errors.PreconditionFailed(
                f"the concatenation daemon of {name} is not running (it died or was killed): the volume's "
                "device on this node is broken until it is staged again, and its cuts are lost")
        try:
            fd = os.open(os.path.join(mnt, layout.CONCAT_CTL_NAME), os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise errors.PreconditionFailed(f"the daemon of {name} takes no commands: {e.strerror}") from e
        try:
            os.write(fd, json.dumps(req).encode())
            out = b""
            while True:
                got = os.pread(fd, 1 << 20, len(out))
                if not got:
                    break
                out += got
        except OSError as e:
            raise errors.BackendError(f"the daemon of {name} failed {req.get('op')}: {e}") from e
        finally:
            try:
                os.close(fd)
            except OSError as e:   # the daemon died meanwhile (ENOTCONN)
                logger.warning("closing the control file of %s: %s", name, e)
        try:
            answer = json.loads(out)
        except ValueError as e:
            raise errors.BackendError(f"the daemon of {name} gave no answer to {req.get('op')} "
                                      f"({out[:80]!r}): did it die?") from e
        if not isinstance(answer, dict):
            raise errors.BackendError(f"the daemon of {name} answered {answer!r}")
        if "error" in answer:
            if answer.get("kind") == "KeyError":
                raise errors.NotFound(f"{name}: {answer['error']}")
            raise errors.BackendError(f"{name}: {req.get('op')} failed: {answer['error']}")
        return answer

    @staticmethod
    def _view(workdir: str, answer: dict[str, object]) -> CutView | None:
        if not answer.get("exists"):
            return None
        return CutView(cut_id=str(answer["id"]), path=os.path.join(_paths(workdir)[3], layout.CONCAT_CUT_PREFIX
                                                                    + str(answer["id"])),
                       size=int(str(answer["size"])), limit=int(str(answer["limit"])),
                       used=int(str(answer["used"])), full=bool(answer["full"]),
                       at=float(str(answer.get("at", 0.0))), changed=str(answer.get("changed", "")))

    def begin_cut(self, *, workdir: str, name: str, cut_id: str, store_limit: int, hold: bool,
                  since: str = "") -> CutView:
        view = self._view(workdir, self._ctl(workdir, name, {"op": "cut", "id": cut_id, "since": since,
                                                             "limit": store_limit, "hold": hold}))
        if view is None:
            raise errors.BackendError(f"{name}: the daemon made no cut {cut_id}")
        return view

    def release(self, *, workdir: str, name: str) -> None:
        self._ctl(workdir, name, {"op": "release"})

    def cut_status(self, *, workdir: str, name: str, cut_id: str) -> CutView | None:
        return self._view(workdir, self._ctl(workdir, name, {"op": "status", "id": cut_id}))

    def end_cut(self, *, workdir: str, name: str, cut_id: str) -> None:
        if daemon_pid(workdir) is None:  # nobody serves the cut: its store is only files now
            cow.remove_cut(workdir, cut_id)
            return
        self._ctl(workdir, name, {"op": "end", "id": cut_id})

    def changed(self, *, workdir: str, name: str, since: str) -> Changed:
        a = self._ctl(workdir, name, {"op": "changed", "id": since})
        return Changed(chunk=int(str(a["chunk"])), size=int(str(a["size"])),
                       bits=base64.b64decode(str(a["bits"])))

    def drop_tracking(self, *, workdir: str, name: str, since: str) -> None:
        if daemon_pid(workdir) is None:
            cow.remove_tracking(workdir, since)
            return
        self._ctl(workdir, name, {"op": "untrack", "id": since})

    def cuts(self, *, workdir: str, name: str) -> tuple[list[str], list[str]]:
        if daemon_pid(workdir) is None:  # a dead daemon's cuts are still on disk, to be ended
            cow.remove_unfinished(workdir)
            return cow.list_cuts(workdir), cow.list_tracking(workdir)
        a = self._ctl(workdir, name, {"op": "list"})
        return [str(c) for c in a["cuts"]], [str(t) for t in a["tracking"]]  # type: ignore[attr-defined]

    def retire(self, *, workdir: str, name: str) -> None:
        """Unstaged while a cut stands: take the device away (nothing writes the volume here
        any more) but keep the daemon serving the cut's view to the copy; teardown() later."""
        _, _, _, _, file = _paths(workdir)
        for lo in devices.find_all(file):
            devices.detach(lo.name)
        orphan = _recorded_loop(workdir)
        if orphan is not None and devices.backing_file(orphan) == "/" + layout.CONCAT_FILE_NAME:
            devices.detach(orphan)
        try:
            os.unlink(os.path.join(workdir, "loop.json"))
        except FileNotFoundError:
            pass
        logger.info("%s: device taken away; the daemon stays for its cuts", name)

    # -- the daemon ----------------------------------------------------------------------

    def _start(self, workdir: str) -> None:
        table_path, pid_file, log_path, mnt, _ = _paths(workdir)
        if fs.mount_info(mnt) is not None:
            logger.warning("stale concatenation mount at %s (daemon gone); unmounting", mnt)
            fs.unmount(mnt)
        argv = [
            "setsid", "--fork", sys.executable, "-m", "csi_virtvol.node.concatfs",
            "--table", table_path, "--mount", mnt, "--pid-file", pid_file,
        ]
        logger.info("starting the concatenation daemon for %s", workdir)
        with open(log_path, "ab") as log:
            try:
                subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               check=True, cwd="/", timeout=30)
            except (subprocess.SubprocessError, OSError) as e:
                raise errors.BackendError(f"cannot start the concatenation daemon: {e}") from e
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if daemon_pid(workdir) is not None and _serving(mnt):
                return
            time.sleep(0.05)
        raise errors.BackendError(
            f"the concatenation daemon did not come up at {mnt}: {_tail(log_path)}"
        )

    def _wait_size(self, workdir: str, size: int) -> None:
        _, _, log_path, _, file = _paths(workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if _file_size(file) == size:
                return
            if daemon_pid(workdir) is None:
                break
            time.sleep(0.05)
        raise errors.BackendError(
            f"the concatenation at {file} has {_file_size(file)} bytes, expected {size}: "
            f"{_tail(log_path)}"
        )

    @staticmethod
    def _wait_exit(pid: int, timeout: float, sig: signal.Signals) -> None:
        """Wait half the timeout for pid to go, then send sig and wait the other half."""
        half = time.monotonic() + timeout / 2
        deadline = half + timeout / 2
        signalled = False
        while _alive(pid):
            now = time.monotonic()
            if now > deadline:
                return
            if now > half and not signalled:
                logger.warning("concatenation daemon %d still running; sending %s", pid, sig.name)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return
                signalled = True
            time.sleep(0.05)


def _recorded_loop(workdir: str) -> str | None:
    try:
        with open(os.path.join(workdir, "loop.json"), encoding="utf-8") as f:
            return str(json.load(f))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e.strerror})"

