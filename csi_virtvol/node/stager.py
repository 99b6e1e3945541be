"""Stager: the node's use cases over one state directory, without any transport.

    stage     extents -> one block device (composer) -> filesystem made if blank -> mounted
              at the staging path (mount access), or just the device (block access)
    publish   bind the staging dir onto the target dir, or the device onto a target file
    expand    grow the device online to the new extents, then the filesystem
    unpublish / unstage  undo; what is already gone is fine
    stats / condition    NodeGetVolumeStats
    begin_cut ... drop_tracking   live cuts of a staged volume (node/cut.py): the
              filesystem is frozen (fsfreeze) only around the composition's cut (dm's
              suspend freezes it itself)

A JSON record per staged volume under state_dir/volumes/ lets unstage and expand work
after a plugin restart; next to it, publications.json keeps each target path's
NodePublishVolume arguments, so the spec's rules for a second publish hold after a restart
too (a recorded target that is no longer mounted is not in effect).  Every step is idempotent: a stage retried after a crash halfway
finds what the first attempt made and finishes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

from csi_virtvol import errors, failpoints
from csi_virtvol.model import codec
from csi_virtvol.model.capability import Publication
from csi_virtvol.node import composer as composing
from csi_virtvol.node import commands, devices, fs, layout
from csi_virtvol.node.cut import Changed, CutCapable, CutView
from csi_virtvol.node.fs import VolumeStats
from csi_virtvol.node.layout import BackingExtent

logger = logging.getLogger(__name__)

Access = Literal["block", "mount"]
Phase = Literal["staging", "staged", "retired"]
# "retired": unstaged while a cut of it stands (a copy reads its frozen view): no mount and no
# device any more, but the composition keeps serving the view until the last cut ends (reap()).


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedVolume:
    volume_id: str
    staging_path: str
    access: Access
    fs_type: str                  # "" for block access
    mount_flags: tuple[str, ...]
    readonly: bool
    mount_group: str              # "" = none
    extents: tuple[BackingExtent, ...]
    composer: str                 # "fuse" | "dm"
    device: str                   # "" until assembled
    phase: Phase

    @property
    def size(self) -> int:
        return layout.total_size(self.extents)

    def to_dict(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id, "staging_path": self.staging_path,
            "access": self.access, "fs_type": self.fs_type,
            "mount_flags": list(self.mount_flags), "readonly": self.readonly,
            "mount_group": self.mount_group, "extents": [e.to_dict() for e in self.extents],
            "composer": self.composer, "device": self.device, "phase": self.phase,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagedVolume:
        return cls(
            volume_id=d["volume_id"], staging_path=d["staging_path"], access=d["access"],
            fs_type=d.get("fs_type", ""), mount_flags=tuple(d.get("mount_flags", ())),
            readonly=bool(d.get("readonly", False)), mount_group=d.get("mount_group", ""),
            extents=tuple(BackingExtent.from_dict(x) for x in d["extents"]),
            composer=d["composer"], device=d.get("device", ""), phase=d.get("phase", "staging"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeCondition:
    abnormal: bool
    message: str


class Stager:
    def __init__(self, state_dir: str, *, composer: composing.Kind = "auto") -> None:
        self._root = os.path.join(os.path.abspath(state_dir), "volumes")
        os.makedirs(self._root, exist_ok=True)
        self._kind = composing.resolve_kind(composer)
        self._composer = composing.make(self._kind)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        if isinstance(self._composer, composing.Settles):
            # A plugin killed in the middle of a cut may have left a device suspended: the
            # application's writes wait until someone resumes it.
            for rec in self.list_staged():
                if rec.composer == self._kind:
                    try:
                        self._composer.settle(workdir=self._workdir(rec.volume_id), name=rec.volume_id)
                    except errors.VirtvolError as e:
                        logger.error("volume %s: could not settle its device: %s", rec.volume_id, e)

    @property
    def composer_kind(self) -> str:
        return self._kind

    # -- records -------------------------------------------------------------------------

    def _workdir(self, volume_id: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", volume_id)[:64]
        digest = hashlib.sha256(volume_id.encode()).hexdigest()[:10]
        return os.path.join(self._root, f"{safe}-{digest}")

    def get(self, volume_id: str) -> StagedVolume | None:
        try:
            with open(os.path.join(self._workdir(volume_id), "record.json"), encoding="utf-8") as f:
                return StagedVolume.from_dict(json.load(f))
        except FileNotFoundError:
            return None

    def list_staged(self) -> list[StagedVolume]:
        out = []
        for entry in sorted(os.listdir(self._root)):
            try:
                with open(os.path.join(self._root, entry, "record.json"), encoding="utf-8") as f:
                    out.append(StagedVolume.from_dict(json.load(f)))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return out

    def _save(self, rec: StagedVolume) -> None:
        workdir = self._workdir(rec.volume_id)
        os.makedirs(workdir, exist_ok=True)
        layout.write_json_atomic(os.path.join(workdir, "record.json"), rec.to_dict())

    # -- publications ----------------------------------------------------------------------

    def _publications_file(self, volume_id: str) -> str:
        return os.path.join(self._workdir(volume_id), "publications.json")

    def _recorded(self, volume_id: str) -> list[Publication]:
        try:
            with open(self._publications_file(volume_id), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise errors.BackendError(f"the publications of {volume_id} are unreadable: {e}") from e
        return [codec.from_dict(Publication, d) for d in data]

    def _record_publications(self, volume_id: str, pubs: Sequence[Publication]) -> None:
        layout.write_json_atomic(self._publications_file(volume_id), [codec.to_dict(p) for p in pubs])

    def publications(self, volume_id: str) -> list[Publication]:
        """The volume's publications in effect: recorded, and their target still mounted."""
        return [p for p in self._recorded(volume_id) if fs.mount_info(p.target) is not None]

    @contextmanager
    def _locked(self, volume_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(volume_id, threading.Lock())
        if not lock.acquire(blocking=False):
            raise errors.OperationPending(f"an operation on volume {volume_id} is in progress")
        try:
            yield
        finally:
            lock.release()

    # -- stage / unstage -------------------------------------------------------------------

    def stage(
        self,
        volume_id: str,
        extents: Sequence[BackingExtent],
        staging_path: str,
        *,
        access: Access = "mount",
        fs_type: str = "",
        mount_flags: Sequence[str] = (),
        readonly: bool = False,
        mount_group: str = "",
        before_use: Callable[[], None] | None = None,
    ) -> StagedVolume:
        """`before_use` runs once the device is assembled and before anything writes it (no
        filesystem made or mounted yet): the moment to cut a volume a copy reads (cut_staging)."""
        if not volume_id:
            raise errors.InvalidRequest("volume id missing")
        if not staging_path:
            raise errors.InvalidRequest("staging path missing")
        if access not in ("block", "mount"):
            raise errors.InvalidRequest(f"access type {access!r}")
        if access == "mount":
            fs_type = fs_type or fs.DEFAULT_FS
            if fs_type not in fs.SUPPORTED_FS:
                raise errors.UnsupportedCapability(
                    f"filesystem {fs_type!r}; supported: {', '.join(fs.SUPPORTED_FS)}"
                )
        else:
            fs_type = ""
        gid = fs.parse_group(mount_group) if mount_group else None
        extents = tuple(extents)
        layout.validate(extents)
        staging_path = os.path.normpath(staging_path)
        with self._locked(volume_id):
            old = self.get(volume_id)
            grown = False
            if old is not None:
                if old.staging_path != staging_path and fs.is_mounted(old.staging_path):
                    raise errors.AlreadyExists(
                        f"volume {volume_id} is staged at {old.staging_path}, not {staging_path}"
                    )
                if old.readonly != readonly or old.phase != "retired" and (old.access != access or (
                    access == "mount" and old.fs_type != fs_type and old.phase == "staged"
                )):  # a retired volume has no device or mount left to disagree with
                    raise errors.AlreadyExists(
                        f"volume {volume_id} is staged with other capabilities "
                        f"({old.access}, {old.fs_type or '-'}, readonly={old.readonly})"
                    )
                if old.extents != extents:
                    if not layout.is_extension(old.extents, extents):
                        raise errors.AlreadyExists(
                            f"volume {volume_id} is staged over other extents"
                        )
                    grown = True
                if old.composer != self._kind:
                    raise errors.PreconditionFailed(
                        f"volume {volume_id} was assembled by {old.composer}, not {self._kind}"
                    )
            rec = StagedVolume(
                volume_id=volume_id, staging_path=staging_path, access=access,
                fs_type=fs_type, mount_flags=tuple(mount_flags), readonly=readonly,
                mount_group=mount_group, extents=extents, composer=self._kind,
                device=old.device if old else "", phase="staging",
            )
            self._save(rec)
            workdir = self._workdir(volume_id)
            device = self._composer.assemble(
                workdir=workdir, name=volume_id, extents=extents, readonly=readonly
            )
            rec = replace(rec, device=device)
            self._save(rec)
            if before_use is not None:
                before_use()
            if access == "mount":
                if readonly:
                    found = fs.probe(device)
                    if found is None:
                        raise errors.PreconditionFailed(
                            f"volume {volume_id} is blank and cannot be formatted read-only"
                        )
                    actual = found
                else:
                    actual = fs.ensure_fs(device, fs_type)
                    if not fs.is_mounted(staging_path):
                        fs.grow_offline(device, actual)
                fs.mount(device, staging_path, fs_type=actual, flags=mount_flags,
                         readonly=readonly)
                if grown and not readonly:
                    fs.grow(device=device, mount_point=staging_path, fs_type=actual)
                if gid is not None and not readonly:
                    fs.set_mount_group(staging_path, gid)
                rec = replace(rec, fs_type=actual)
            else:
                os.makedirs(staging_path, exist_ok=True)
            rec = replace(rec, phase="staged")
            self._save(rec)
            logger.info("staged %s on %s at %s (%s, %d bytes)",
                        volume_id, device, staging_path, access, rec.size)
            return rec

    def unstage(self, volume_id: str, staging_path: str, *, keep_cuts: bool = True) -> None:
        """Unmount, take the device apart, forget the volume.  Missing = done.  While a cut
        of the volume stands (a copy reads its frozen view), only the mount and the device go:
        the volume is "retired" and reap() takes the rest once the last cut ends (unless
        `keep_cuts` is False: then the cuts go too, and their copies fail)."""
        if not volume_id:
            raise errors.InvalidRequest("volume id missing")
        if not staging_path:
            raise errors.InvalidRequest("staging path missing")
        staging_path = os.path.normpath(staging_path)
        with self._locked(volume_id):
            rec = self.get(volume_id)
            workdir = self._workdir(volume_id)
            if rec is not None and rec.composer == self._kind and isinstance(self._composer, composing.Settles):
                self._composer.settle(workdir=workdir, name=volume_id)  # nothing suspended under the unmount
            fs.unmount(staging_path)
            if rec is not None and rec.staging_path != staging_path:
                fs.unmount(rec.staging_path)
            # a composition that can keep a volume's cuts without its device keeps them for the
            # copies that read them; any other ends them here (their copies fail cleanly)
            if (rec is not None and keep_cuts and isinstance(self._composer, composing.Retirable)
                    and self._standing_cuts(rec)):
                if rec.device:
                    for lo in devices.find_all(rec.device):  # read-only publish loops
                        devices.detach(lo.name)
                self._composer.retire(workdir=workdir, name=volume_id)
                self._clear_hold(volume_id)
                self._save(replace(rec, phase="retired", device=""))
                logger.info("unstaged %s from %s; its composition stays for the cuts a copy reads",
                            volume_id, staging_path)
                return
            self._teardown(volume_id, rec)
            logger.info("unstaged %s from %s", volume_id, staging_path)

    def _standing_cuts(self, rec: StagedVolume) -> list[str]:
        if not isinstance(self._composer, CutCapable) or rec.composer != self._kind:
            return []
        try:
            return self._composer.cuts(workdir=self._workdir(rec.volume_id), name=rec.volume_id)[0]
        except errors.VirtvolError as e:
            logger.warning("%s: cannot list its cuts (%s); unstaging it whole", rec.volume_id, e)
            return []

    def reapable(self, volume_id: str) -> bool:
        """A retired volume whose cuts have all ended (no lock: reap() checks again)."""
        rec = self.get(volume_id)
        return rec is not None and rec.phase == "retired" and not self._standing_cuts(rec)

    def reap(self, volume_id: str) -> bool:
        """Take apart a retired volume whose cuts have all ended; True once it is gone."""
        with self._locked(volume_id):
            rec = self.get(volume_id)
            if rec is None:
                return True
            if rec.phase != "retired" or self._standing_cuts(rec):
                return False
            self._teardown(volume_id, rec)
            logger.info("%s: its last cut ended; its composition is gone", volume_id)
            return True

    def _teardown(self, volume_id: str, rec: StagedVolume | None) -> None:
        workdir = self._workdir(volume_id)
        if rec is not None or os.path.isdir(workdir):
            composer = self._composer
            if rec is not None and rec.composer != self._kind:
                composer = composing.make(rec.composer)  # type: ignore[arg-type]
            if rec is not None and rec.device:
                for lo in devices.find_all(rec.device):  # read-only publish loops
                    devices.detach(lo.name)
            composer.teardown(workdir=workdir, name=volume_id)
            if fs.mount_info(os.path.join(workdir, "mnt")) is not None:
                raise errors.BackendError(f"{workdir}/mnt is still mounted")
            shutil.rmtree(workdir, ignore_errors=True)

    # -- expand ------------------------------------------------------------------------------

    def expand(self, volume_id: str, new_extents: Sequence[BackingExtent]) -> int:
        """Grow the staged device to new_extents (the old ones plus more) and its filesystem
        online; return the device's new size in bytes."""
        new = tuple(new_extents)
        layout.validate(new)
        with self._locked(volume_id):
            rec = self.get(volume_id)
            if rec is None or rec.phase == "retired":
                raise errors.NotFound(f"volume {volume_id} is not staged on this node")
            if new != rec.extents and not layout.is_extension(rec.extents, new):
                raise errors.InvalidRequest(
                    f"volume {volume_id}: new extents must keep the old ones in place and add to them"
                )
            if rec.readonly and new != rec.extents:
                raise errors.PreconditionFailed(f"volume {volume_id} is staged read-only")
            device = self._composer.grow(workdir=self._workdir(volume_id), name=volume_id,
                                         extents=new)
            rec = replace(rec, extents=new, device=device)
            self._save(rec)
            if rec.access == "mount" and not rec.readonly and fs.is_mounted(rec.staging_path):
                fs.grow(device=device, mount_point=rec.staging_path, fs_type=rec.fs_type)
            size = devices.device_size(device)
            logger.info("expanded %s to %d bytes", volume_id, size)
            return size

    # -- publish / unpublish -------------------------------------------------------------------

    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        *,
        access: Access = "mount",
        readonly: bool = False,
        mount_flags: Sequence[str] = (),
        mount_group: str = "",
        publication: Publication | None = None,
    ) -> None:
        """Bind the staged volume at target_path.  `publication` (the request's arguments) is
        recorded before the mount, and dropped again if the mount fails."""
        if not target_path:
            raise errors.InvalidRequest("target path missing")
        target_path = os.path.normpath(target_path)
        staged = self.get(volume_id)
        if staged is None or staged.phase != "staged":
            raise errors.PreconditionFailed(f"volume {volume_id} is not staged on this node")
        if publication is None:
            self._publish(volume_id, staging_path, target_path, access=access, readonly=readonly,
                          mount_flags=mount_flags, mount_group=mount_group)
            return
        keep = [p for p in self._recorded(volume_id) if p.target != target_path]
        self._record_publications(volume_id, keep + [replace(publication, target=target_path)])
        try:
            self._publish(volume_id, staging_path, target_path, access=access, readonly=readonly,
                          mount_flags=mount_flags, mount_group=mount_group)
        except BaseException:
            if fs.mount_info(target_path) is None:
                self._record_publications(volume_id, keep)
            raise

    def _publish(self, volume_id: str, staging_path: str, target_path: str, *, access: Access,
                 readonly: bool, mount_flags: Sequence[str], mount_group: str) -> None:
        rec = self.get(volume_id)
        if rec is None or rec.phase != "staged":
            raise errors.PreconditionFailed(f"volume {volume_id} is not staged on this node")
        if access != rec.access:
            raise errors.InvalidRequest(f"volume {volume_id} is staged for {rec.access} access")
        if staging_path and os.path.normpath(staging_path) != rec.staging_path:
            raise errors.InvalidRequest(
                f"volume {volume_id} is staged at {rec.staging_path}, not {staging_path}"
            )
        existing = fs.mount_info(target_path)
        if existing is not None:
            if readonly != existing.readonly:
                raise errors.AlreadyExists(
                    f"{target_path} is already published {'read-only' if existing.readonly else 'read-write'}"
                )
            return
        if access == "block":
            if not devices.is_block_device(rec.device):
                raise errors.PreconditionFailed(f"the device {rec.device} of {volume_id} is gone")
            device = rec.device
            if readonly and not rec.readonly:
                # A read-only bind does not stop writes through a device node; a read-only
                # loop device over the volume's device does.
                device = devices.attach(rec.device, readonly=True, direct_io=False)
            fs.bind_mount(device, target_path, readonly=readonly)
        else:
            if not fs.is_mounted(rec.staging_path):
                raise errors.PreconditionFailed(f"{rec.staging_path} is not mounted")
            fs.bind_mount(rec.staging_path, target_path, readonly=readonly, flags=mount_flags)
            if mount_group and not readonly and not rec.readonly:
                fs.set_mount_group(target_path, fs.parse_group(mount_group))
        logger.info("published %s at %s", volume_id, target_path)

    def unpublish(self, target_path: str, *, volume_id: str = "") -> None:
        """Unmount the target and remove it (a file for block, a directory for mount), and
        forget it among `volume_id`'s publications."""
        if not target_path:
            raise errors.InvalidRequest("target path missing")
        target_path = os.path.normpath(target_path)
        self._unpublish(target_path)
        if volume_id and os.path.isdir(self._workdir(volume_id)):
            recorded = self._recorded(volume_id)
            keep = [p for p in recorded if p.target != target_path]
            if keep != recorded:
                self._record_publications(volume_id, keep)

    def _unpublish(self, target_path: str) -> None:
        info = fs.mount_info(target_path)
        fs.unmount(target_path)
        if info is not None and info.root.startswith("/loop"):
            # the read-only loop device publish() put over a volume's device
            loop = "/dev" + info.root
            back = devices.backing_file(loop)
            if back is not None and back.startswith("/dev/"):
                devices.detach(loop)
        try:
            if os.path.isdir(target_path):
                os.rmdir(target_path)
            else:
                os.unlink(target_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise errors.BackendError(f"cannot remove {target_path}: {e}") from e

    # -- live cuts ---------------------------------------------------------------------------------

    @property
    def can_cut(self) -> bool:
        return isinstance(self._composer, CutCapable)

    def _cutter(self, volume_id: str, *, phases: tuple[Phase, ...] = ("staging", "staged", "retired")
                ) -> tuple[StagedVolume, CutCapable, str]:
        rec = self.get(volume_id)
        if rec is None or rec.phase not in phases:
            raise errors.NotFound(f"volume {volume_id} is not staged on this node")
        if not isinstance(self._composer, CutCapable) or rec.composer != self._kind:
            raise errors.UnsupportedCapability(f"the {rec.composer} composition of {volume_id} cannot cut")
        return rec, self._composer, self._workdir(volume_id)

    def begin_cut(self, volume_id: str, cut_id: str, *, store_limit: int, hold: bool = False,
                  since: str = "") -> CutView:
        """Cut the volume's image at this instant.  A mounted filesystem is frozen (its
        acknowledged writes flushed, new ones held) only around the composition's cut.  With
        `hold`, the writes stay held until release_cut (a cut of several volumes).

        A marker in the workdir says the writes are held, so a plugin killed meanwhile lets
        them go when it starts again (release_leftover_holds)."""
        with self._locked(volume_id):
            rec, cutter, workdir = self._cutter(volume_id, phases=("staged",))
            frozen = False
            self._mark_hold(rec)
            if rec.access == "mount" and not rec.readonly and not getattr(cutter, "freezes_filesystem", False):
                commands.run(["fsfreeze", "--freeze", rec.staging_path])
                frozen = True
            try:
                failpoints.hit("cut-node-frozen")
                view = cutter.begin_cut(workdir=workdir, name=volume_id, cut_id=cut_id,
                                        store_limit=store_limit, hold=hold, since=since)
                failpoints.hit("cut-node-made")
            except BaseException:
                if frozen:
                    self._thaw(rec.staging_path)
                self._clear_hold(volume_id)
                raise
            if not hold:
                if frozen:
                    self._thaw(rec.staging_path)
                self._clear_hold(volume_id)
            return view

    def cut_staging(self, volume_id: str, cut_id: str, *, store_limit: int) -> CutView:
        """Cut a volume being staged, from stage()'s `before_use`: nothing has written its
        device yet, so nothing is frozen, and the cut's view is the volume as it was."""
        _, cutter, workdir = self._cutter(volume_id, phases=("staging",))
        return cutter.begin_cut(workdir=workdir, name=volume_id, cut_id=cut_id, store_limit=store_limit,
                                hold=False)

    def release_cut(self, volume_id: str) -> None:
        """Let the writes a held cut keeps waiting go (idempotent)."""
        rec, cutter, workdir = self._cutter(volume_id)
        try:
            cutter.release(workdir=workdir, name=volume_id)
        finally:
            if rec.access == "mount" and not rec.readonly and rec.phase == "staged":
                self._thaw(rec.staging_path)
            self._clear_hold(volume_id)

    def release_leftover_holds(self) -> list[str]:
        """At start-up: let go the writes a killed plugin left held (its filesystem frozen, or
        the daemon holding), since no cut of this process holds them.  Returns the volumes."""
        out = []
        for rec in self.list_staged():
            if not os.path.exists(self._hold_marker(rec.volume_id)):
                continue
            logger.warning("%s: its writes were left held by a plugin that died; letting them go",
                           rec.volume_id)
            try:
                if rec.phase == "staged" and isinstance(self._composer, CutCapable):
                    self.release_cut(rec.volume_id)
                else:
                    if rec.access == "mount" and not rec.readonly and fs.is_mounted(rec.staging_path):
                        self._thaw(rec.staging_path)
                    self._clear_hold(rec.volume_id)
            except errors.VirtvolError as e:
                logger.error("%s: could not let its writes go: %s", rec.volume_id, e)
                continue
            out.append(rec.volume_id)
        return out

    def _hold_marker(self, volume_id: str) -> str:
        return os.path.join(self._workdir(volume_id), "held")

    def _mark_hold(self, rec: StagedVolume) -> None:
        layout.write_json_atomic(self._hold_marker(rec.volume_id), rec.staging_path)

    def _clear_hold(self, volume_id: str) -> None:
        try:
            os.unlink(self._hold_marker(volume_id))
        except FileNotFoundError:
            pass

    @staticmethod
    def _thaw(path: str) -> None:
        r = commands.run(["fsfreeze", "--unfreeze", path], check=False)
        if r.returncode != 0 and "Invalid argument" not in (r.stderr or ""):  # EINVAL: not frozen
            raise errors.BackendError(f"cannot thaw {path}: {(r.stderr or '').strip()}")

    def cut_status(self, volume_id: str, cut_id: str) -> CutView | None:
        _, cutter, workdir = self._cutter(volume_id)
        return cutter.cut_status(workdir=workdir, name=volume_id, cut_id=cut_id)

    def end_cut(self, volume_id: str, cut_id: str) -> None:
        """Drop the frozen view and its copy-on-write store; a volume not staged any more
        has nothing left to drop (unstage removes the workdir)."""
        try:
            _, cutter, workdir = self._cutter(volume_id)
        except errors.NotFound:
            return
        cutter.end_cut(workdir=workdir, name=volume_id, cut_id=cut_id)

    def changed_since(self, volume_id: str, cut_id: str) -> Changed:
        _, cutter, workdir = self._cutter(volume_id)
        return cutter.changed(workdir=workdir, name=volume_id, since=cut_id)

    def drop_tracking(self, volume_id: str, cut_id: str) -> None:
        try:
            _, cutter, workdir = self._cutter(volume_id)
        except errors.NotFound:
            return
        cutter.drop_tracking(workdir=workdir, name=volume_id, since=cut_id)

    def cuts(self, volume_id: str) -> tuple[list[str], list[str]]:
        _, cutter, workdir = self._cutter(volume_id)
        return cutter.cuts(workdir=workdir, name=volume_id)

    # -- stats / health --------------------------------------------------------------------------

    def stats(self, path: str) -> VolumeStats:
        return fs.stats(path)

    def condition(self, volume_id: str) -> VolumeCondition:
        rec = self.get(volume_id)
        if rec is None:
            raise errors.NotFound(f"volume {volume_id} is not staged on this node")
        if rec.phase != "staged":
            return VolumeCondition(abnormal=True, message="staging did not finish")
        problem = self._composer.problem(workdir=self._workdir(volume_id), name=volume_id)
        if problem is None and not devices.is_block_device(rec.device):
            problem = f"device {rec.device} is gone"
        if problem is None and rec.access == "mount":
            problem = fs.mount_problem(rec.staging_path, expect_readonly=rec.readonly)
        if problem is not None:
            return VolumeCondition(abnormal=True, message=problem)
        return VolumeCondition(abnormal=False, message="healthy")
