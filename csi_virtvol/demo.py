"""`csi-virtvol demo`: the driver's mission on one Linux machine, in about a minute.

Two arrays of different abilities are built for the run: a file pool on a reflink-capable
XFS and a file pool on a plain ext4, each on a loop-mounted sparse image.  The XFS pool is
capped at half the volume, so a concatenated volume has one extent on each.  The volume is
staged with an ext4 filesystem, and while a writer keeps writing, a snapshot is taken: its
plan copies the XFS extent inside the array (a reflink clone, made at the instant of the
cut) and the ext4 extent by a host copy (read from the cut's frozen view while the writer
goes on).  The snapshot is restored into a new volume, and the volume is cloned onto the
ext4 array; both are checked byte for byte against the right reference:

  restore  against the snapshot's own image (its LUNs, read from the arrays), and the
           restored filesystem against the writer's log: every record acknowledged
           before the cut is there, none from after it (one in flight may be);
  clone    against the source, once the writer has stopped and the filesystem is
           unmounted (a volume still being written has no "same bytes" to compare with).

Everything the demo makes (volumes, snapshots, node mounts, the plugin, the pools' mounts,
loop devices, images, the temporary directory) sits on one undo stack that runs on success,
on error, on Ctrl-C and on SIGTERM.  Where loop devices or mounts cannot be had (not root),
the demo says so and falls back to two directory pools without the node steps.

Every step goes through the driver's CSI endpoint (and the virtvol admin API for the plan
and the mapping), so it can be repeated by hand with `csi-virtvol volume|snapshot|pair`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from csi_virtvol import console, errors, records
from csi_virtvol.config import load_config, parse_size
from csi_virtvol.csi import client as C

MiB = 1 << 20
VOLUME = 128 * MiB
IMAGE = 512 * MiB          # sparse; XFS wants 300 MB at least
PAYLOAD = 80 * MiB         # written before the snapshot: more than one extent holds
WRITER_ALONE = 1.0         # seconds the writer runs before the snapshot ...
WRITER_AFTER = 1.0         # ... and after it
ORDER = ["internal", "remote", "host"]
FAST, PLAIN = "xfs", "ext4"


class DemoFailed(errors.VirtvolError):
    """Something the demo set out to show did not hold."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n== {text}")


# -- the undo stack ----------------------------------------------------------------------

class Undo:
    """Steps to take back, run last-in first-out; `now(key)` runs one early (the
    demo's own clean-up of a thing it no longer needs), so it does not run twice."""

    def __init__(self) -> None:
        self._steps: list[tuple[int, str, Callable[[], None]]] = []
        self._next = 0

    def push(self, what: str, fn: Callable[[], None]) -> int:
        self._next += 1
        self._steps.append((self._next, what, fn))
        return self._next

    def now(self, key: int) -> None:
        for i, (k, _, fn) in enumerate(self._steps):
            if k == key:
                del self._steps[i]
                fn()
                return

    def close(self) -> list[str]:
        """Run every step left, whatever fails; what failed, one line each."""
        failed = []
        while self._steps:
            _, what, fn = self._steps.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep taking the rest down
                failed.append(f"{what}: {e}")
        return failed


def run(argv: list[str], *, timeout: float = 120) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errors.BackendError(f"{' '.join(argv)}: {e}") from e
    if proc.returncode != 0:
        raise errors.BackendError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _unmount(mnt: str) -> None:
    for _ in range(20):
        if not os.path.ismount(mnt):
            return
        if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.25)  # a loop device or a process still holding it
    run(["umount", "-l", mnt])
    raise errors.BackendError(f"{mnt} stayed busy; detached lazily")


def _detach(dev: str, image: str) -> None:
    run(["losetup", "-d", dev])
    if image in run(["losetup", "-j", image]):
        raise errors.BackendError(f"{dev} still backs {image}")


# -- the arrays ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Arrays:
    config_file: str
    pools: dict[str, str]     # array id -> pool directory
    real: bool                # loop-mounted XFS and ext4 (else: directories, no node steps)


def loop_filesystem(fstype: str, work: str, undo: Undo) -> str:
    """A sparse image with `fstype` on a loop device, mounted; all of it on the undo stack."""
    image, mnt = os.path.join(work, f"{fstype}.img"), os.path.join(work, fstype)
    os.makedirs(mnt)
    with open(image, "wb") as fh:
        fh.truncate(IMAGE)
    undo.push(f"remove {image}", lambda: os.unlink(image))
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
            "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]}[fstype]
    run([*mkfs, image])
    dev = run(["losetup", "--find", "--show", image]).strip()
    undo.push(f"detach {dev}", lambda: _detach(dev, image))
    run(["mount", "-t", fstype, dev, mnt])
    undo.push(f"unmount {mnt}", lambda: _unmount(mnt))
    say(f"  {fstype:<5} {IMAGE // MiB} MiB sparse image {image} on {dev}, mounted at {mnt}")
    return mnt


def build_arrays(work: str, undo: Undo) -> Arrays:
    pools: dict[str, str] = {}
    real = False
    why = "not root (loop devices and mount(2) need root)" if os.geteuid() != 0 else ""
    if not why:
        try:
            for fstype in (FAST, PLAIN):
                pools[fstype] = os.path.join(loop_filesystem(fstype, work, undo), "pool")
            real = True
        except errors.VirtvolError as e:
            why = str(e)
    if not real:
        base = os.path.join(work, "pools")
        say(f"  (cannot build loop-mounted arrays: {why})")
        say(f"  FALLING BACK to two directory pools under {base}: one filesystem, so both arrays have\n"
            f"  the same abilities, and the node steps (stage, writer) are skipped")
        pools = {"pool-a": os.path.join(base, "pool-a"), "pool-b": os.path.join(base, "pool-b")}
    first, second = list(pools)
    arrays = [
        {"id": first, "kind": "file", "labels": {"tier": "fast"},
         # the fast array is small: the volume spills over onto the other one
         "params": {"path": pools[first], "capacity": str(VOLUME // 2)}},
        {"id": second, "kind": "file", "labels": {"tier": "plain"}, "params": {"path": pools[second]}},
    ]
    cfg = os.path.join(work, "arrays.yaml")
    with open(cfg, "w") as fh:
        yaml.safe_dump({"arrays": arrays}, fh)
    say(f"  arrays ({cfg}): {first} (capacity capped at {VOLUME // 2 // MiB} MiB), {second}")
    return Arrays(config_file=cfg, pools=pools, real=real)


# -- reading images and the writer -------------------------------------------------------------

def read_image(mapping: console.Json, length: int) -> tuple[bytes, list[str]]:
    """The first `length` bytes of a volume or snapshot, read from its LUNs on the arrays
    (file pools: a LUN's address is its file), and the arrays they came from."""
    out = bytearray()
    arrays = []
    for e in mapping.get("extents", []):
        if len(out) >= length:
            break
        n = min(console.num(e, "length"), length - len(out))
        with open(e["lun_address"], "rb") as fh:
            fh.seek(console.num(e, "offset"))
            piece = fh.read(n)
        out += piece + bytes(n - len(piece))  # past a sparse file's end: zeros
        arrays.append(e.get("array", "?"))
    return bytes(out), arrays


def compare(a: bytes, b: bytes) -> str:
    """"" when identical, else where they first differ."""
    if len(a) != len(b):
        return f"{len(a)} bytes against {len(b)}"
    if a == b:
        return ""
    step_ = MiB
    for off in range(0, len(a), step_):
        if a[off:off + step_] != b[off:off + step_]:
            first = next(i for i in range(off, min(off + step_, len(a))) if a[i] != b[i])
            return f"they differ from byte {first}"
    return "they differ"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# -- the demo ----------------------------------------------------------------------------------

class Demo:
    def __init__(self, cl: C.Client, *, node_id: str, work: str, undo: Undo, arrays: Arrays,
                 bandwidth: int) -> None:
        self.cl = cl
        self.pb = C.pb_
        self.node_id = node_id
        self.work = work
        self.undo = undo
        self.arrays = arrays
        self.bandwidth = bandwidth
        self.shown: list[str] = []

    def call(self, method: Any, req: Any) -> console.Json:
        return self.cl.call(method, req)

    def mapping(self, vid: str) -> console.Json:
        return self.call(self.cl.mapping.GetMapping, C.vpb_.GetMappingRequest(volume_id=vid))

    def later(self, method: Any, req: Any) -> Callable[[], None]:
        """A call to make when the step is taken back (its errors are reported there)."""
        def call() -> None:
            self.call(method, req)
        return call

    def create_volume(self, name: str, *, parameters: dict[str, str], source: str = "",
                      mutable: dict[str, str] | None = None) -> str:
        from csi_virtvol.services.volumes import volume_id_for

        req = C.create_volume(name, VOLUME, parameters=parameters, fs_type="ext4", source=source)
        req.mutable_parameters.update(mutable or {})
        vid = volume_id_for(name)
        # on the stack before the call: a Ctrl-C while it copies still deletes what it made
        self.undo.push(f"delete volume {name}", self.later(
            self.cl.controller.DeleteVolume, self.pb.DeleteVolumeRequest(volume_id=vid)))
        out = console.create_volume(self.cl, req, target_id=vid, stream=sys.stdout)
        if out["volume"]["volume_id"] != vid:
            raise DemoFailed(f"volume {name} got id {out['volume']['volume_id']}, not {vid}")
        return vid

    def stage(self, vid: str, name: str) -> tuple[str, Callable[[], None]]:
        """ControllerPublish, NodeStage (mkfs ext4 the first time), NodePublish; the target
        path, and how to take it all back."""
        cap = C.capability(fs_type="ext4")
        staging, target = os.path.join(self.work, f"{name}-staging"), os.path.join(self.work, f"{name}-target")
        os.makedirs(staging, exist_ok=True)
        keys = [self.undo.push(f"controller-unpublish {name}", self.later(
            self.cl.controller.ControllerUnpublishVolume,
            self.pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=self.node_id)))]
        ctx = self.call(self.cl.controller.ControllerPublishVolume, self.pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=self.node_id, volume_capability=cap))
        keys.append(self.undo.push(f"unstage {name}", self.later(
            self.cl.node.NodeUnstageVolume, self.pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                                             staging_target_path=staging))))
        self.call(self.cl.node.NodeStageVolume, self.pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap,
            publish_context=ctx.get("publish_context", {})))
        keys.append(self.undo.push(f"unpublish {name}", self.later(
            self.cl.node.NodeUnpublishVolume, self.pb.NodeUnpublishVolumeRequest(volume_id=vid,
                                                                                 target_path=target))))
        self.call(self.cl.node.NodePublishVolume, self.pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap))

        def release() -> None:
            for k in reversed(keys):
                self.undo.now(k)
        return target, release

    def plan(self, source: str, target: str, what: str) -> console.Json:
        pair = console.find_pair(self.cl, source=source, target=target)
        if pair is None:
            raise DemoFailed(f"no pair for the {what}")
        say(f"  the {what}'s plan (csi-virtvol pair list --source {source} --table):")
        say(console.plan_table(pair))
        return pair

    # -- the steps ---------------------------------------------------------------------------
    def run(self) -> None:
        fast, plain = list(self.arrays.pools)
        step(f"one {VOLUME // MiB} MiB volume over both arrays (layout=concat, arrays={fast},{plain})")
        mutable = {"copyBandwidth": str(self.bandwidth)} if self.bandwidth else {}
        vid = self.create_volume("demo-volume", parameters={"layout": "concat", "arrays": f"{fast},{plain}"},
                                 mutable=mutable)
        m = self.mapping(vid)
        say(f"  volume {vid} (csi-virtvol volume map {vid}):")
        say(console.mapping_table(m))
        on = list(dict.fromkeys(e.get("array", "") for e in m.get("extents", [])))
        if set(on) != {fast, plain}:
            raise DemoFailed(f"the volume's extents are on {on}, not on both {fast} and {plain}")
        say(f"extents on both arrays: {', '.join(on)}")
        kinds = {tuple(e.get("array_abilities", [])) for e in m["extents"]}
        self.shown.append(f"one volume, extents on two arrays of {'different' if len(kinds) > 1 else 'the SAME'} "
                          "abilities: " + "; ".join(f"{e['array']} ({','.join(e.get('array_abilities', [])) or 'none'})"
                                      for e in m["extents"]))
        if self.bandwidth:
            say(f"  (its copyBandwidth is {console.mib(self.bandwidth)}/s, so the host copies can be watched;"
                f" --copy-bandwidth 0 copies at full speed)")

        writer: records.Writer | None = None
        wkey = 0
        release_source: Callable[[], None] = lambda: None
        payload = b""
        if self.arrays.real:
            step("publish and stage it on this node (one block device over both extents, ext4), write data")
            target, release_source = self.stage(vid, "demo-volume")
            payload = os.urandom(PAYLOAD)
            with open(os.path.join(target, "data.bin"), "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            say(f"  wrote {PAYLOAD // MiB} MiB to {target}/data.bin (sha256 {sha(payload)})")
            writer = records.Writer(os.path.join(target, "log.bin"))
            wkey = self.undo.push("stop the writer", functools.partial(writer.stop, timeout=2))
            say(f"  a writer appends a {records.RECORD}-byte record to {target}/log.bin every "
                f"{records.PERIOD * 1000:.0f} ms and fdatasyncs it")
            time.sleep(WRITER_ALONE)  # its pace without a snapshot, to compare with
            if writer.error is not None:
                raise DemoFailed(f"the writer failed: {writer.error}")
        else:
            say("\n  (fallback: the volume is not staged and nothing writes to it; it stays zeros)")

        step("snapshot it" + (" while the writer keeps writing" if writer else ""))
        from csi_virtvol.model.volume import VolumeKind
        from csi_virtvol.services.volumes import volume_id_for

        sid = volume_id_for("demo-snapshot", VolumeKind.SNAPSHOT)
        self.undo.push("delete snapshot demo-snapshot", self.later(
            self.cl.controller.DeleteSnapshot, self.pb.DeleteSnapshotRequest(snapshot_id=sid)))
        t0 = time.time()
        snap = console.create_snapshot(self.cl, name="demo-snapshot", volume_id=vid, parameters={},
                                       stream=sys.stdout)["snapshot"]
        t1 = time.time()
        if snap["snapshot_id"] != sid:
            raise DemoFailed(f"the snapshot got id {snap['snapshot_id']}, not {sid}")
        if writer is not None:
            time.sleep(WRITER_AFTER)
            if writer.stalled() > WRITER_AFTER:
                raise DemoFailed(f"the writer has not written for {writer.stalled():.1f}s since the snapshot "
                                 "was ready: the node did not let its writes go after the cut")
            self.undo.now(wkey)
            if writer.error is not None:
                raise DemoFailed(f"the writer failed: {writer.error}")
        say(f"  snapshot {sid} ready_to_use={snap.get('ready_to_use', False)} after {t1 - t0:.1f}s")
        pair = self.plan(vid, sid, "snapshot")
        cut = float(pair.get("cut_at", 0) or 0)
        say(f"  {console.pair_summary(pair)}")
        methods = {e.get("method") for e in pair.get("extents", [])}
        if self.arrays.real and not {"internal", "host"} <= methods:
            raise DemoFailed(f"the snapshot's plan uses {sorted(methods)}, not internal and host copies")
        if writer is not None:
            during = [i for i, t in writer.acked if t0 <= t <= t1]
            pause = writer.longest_pause(t0, t1)
            alone = writer.longest_pause(writer.acked[0][1], t0)
            say(f"  the writer acknowledged {len(during)} records while the snapshot was taken; its longest pause "
                f"was {pause * 1000:.0f} ms ({alone * 1000:.0f} ms in the {WRITER_ALONE:.0f} s before): writes are "
                "held only for the instant of the cut, never for the copy")
            self.shown.append(f"a snapshot of the volume in use, planned per extent ({' and '.join(sorted(methods, key=ORDER.index))} "
                              f"copy), the writer paused at most {pause * 1000:.0f} ms")
        else:
            self.shown.append(f"a snapshot planned per extent: {' and '.join(sorted(methods, key=ORDER.index))} copy")

        step("restore the snapshot into a new volume")
        rid = self.create_volume("demo-restore", parameters={}, source=f"snapshot:{sid}")
        self.plan(sid, rid, "restore")
        snap_image, _ = read_image(self.mapping(sid), VOLUME)
        restored, _ = read_image(self.mapping(rid), VOLUME)
        diff = compare(restored, snap_image)
        if diff:
            raise DemoFailed(f"the restored volume is not the snapshot's image: {diff}")
        say(f"restore: byte-identical to the snapshot's image ({VOLUME // MiB} MiB, sha256 {sha(restored)})")
        if writer is not None:
            say("  and the snapshot's image is the volume as it was at the cut: the restored filesystem says")
            rtarget, release_restore = self.stage(rid, "demo-restore")
            with open(os.path.join(rtarget, "data.bin"), "rb") as fh:
                if fh.read() != payload:
                    raise DemoFailed("data.bin in the restored volume differs from what was written")
            with open(os.path.join(rtarget, "log.bin"), "rb") as fh:
                try:
                    verdict = records.check_image(fh.read(), writer.acked, cut)
                except records.NotThePointInTime as e:
                    raise DemoFailed(f"the restored log: {e}") from e
            release_restore()
            say(f"  data.bin: identical; log.bin: {verdict}")
            self.shown.append(f"restore: byte-identical to the snapshot; its log.bin holds {verdict.split(':')[0]}, "
                              "exactly what was acknowledged before the cut")
        else:
            self.shown.append("restore: byte-identical to the snapshot")

        step(f"clone the volume onto the {plain} array")
        if writer is not None:
            release_source()
            say("  the writer has stopped and the volume is unpublished and unstaged, so the clone can be\n"
                "  compared with the source as it is now")
        cid = self.create_volume("demo-clone", parameters={"arrays": plain}, source=f"volume:{vid}")
        self.plan(vid, cid, "clone")
        cm = self.mapping(cid)
        clone, clone_arrays = read_image(cm, VOLUME)
        source_image, _ = read_image(self.mapping(vid), VOLUME)
        if set(clone_arrays) != {plain}:
            raise DemoFailed(f"the clone is on {sorted(set(clone_arrays))}, not on {plain}")
        diff = compare(clone, source_image)
        if diff:
            raise DemoFailed(f"the clone is not the source: {diff}")
        say(f"clone: byte-identical to the source ({VOLUME // MiB} MiB on {plain}, sha256 {sha(clone)})")
        self.shown.append(f"clone onto {plain}: byte-identical to the source")

        step("delete everything through CSI")
        self.undo.close()  # the volumes and snapshot, newest first; the arrays stay for the check
        left = sorted(f"{a}/{f}" for a, p in self.arrays.pools.items() if os.path.isdir(os.path.join(p, "luns"))
                      for f in os.listdir(os.path.join(p, "luns")) if not f.startswith("."))
        say(f"  LUN files left on the arrays: {len(left)}{' ' + ', '.join(left) if left else ''}")
        if left:
            raise DemoFailed(f"deleting left LUN files behind: {left}")


def main(args: argparse.Namespace) -> int:
    from csi_virtvol import app

    bandwidth = parse_size(args.copy_bandwidth)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # both, explicitly: a shell starts a background job with SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    undo = Undo()  # the machine's side: temp dir, images, loop devices, mounts, the plugin
    work = tempfile.mkdtemp(prefix="virtvol-demo-")
    undo.push(f"remove {work}", lambda: shutil.rmtree(work))
    csi = Undo()   # the driver's side: what the plugin made, taken back through CSI first
    status = 1
    real: bool | None = None   # loop-mounted arrays (None: not that far)
    try:
        say(f"csi-virtvol demo (work dir {work})")
        step("two arrays of different abilities")
        arrays = build_arrays(work, undo)
        real = arrays.real
        data = os.path.join(work, "plugin")
        config = load_config(endpoint=f"unix://{work}/csi.sock", data_dir=data, node_id=args.node_id,
                             mode="all", config_file=arrays.config_file)
        stop = threading.Event()
        server = threading.Thread(target=app.serve, args=(config,), kwargs={"stop": stop}, name="plugin",
                                  daemon=True)
        server.start()

        def stop_server() -> None:
            stop.set()
            server.join(timeout=30)
            if server.is_alive():
                raise errors.BackendError("the plugin did not stop within 30 s")
        undo.push("stop the plugin", stop_server)
        cl = C.Client(config.endpoint)
        undo.push("close the client", cl.close)
        cl.wait_ready()
        say(f"  the plugin serves CSI on {config.endpoint} (data dir {data})")
        demo = Demo(cl, node_id=args.node_id, work=work, undo=csi, arrays=arrays, bandwidth=bandwidth)
        demo.run()
        step("what this showed")
        for line in demo.shown:
            say(f"  - {line}")
        status = 0
    except KeyboardInterrupt as e:
        say(f"\ninterrupted ({e or 'Ctrl-C'}): cleaning up")
        status = 130
    except errors.VirtvolError as e:
        say(f"\ndemo FAILED: {e}")
        status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the clean-up is not to be cut short
            signal.signal(sig, signal.SIG_IGN)
        failed = csi.close() + undo.close()
        for line in failed:
            say(f"  clean-up: {line}")
        made = {True: "volumes, snapshot, node mounts, plugin, pools' mounts, loop devices, images",
                False: "volumes, snapshot, plugin, pools", None: "what was made"}[real]
        say(f"\ncleaned up: {made}, {work}" if not failed else "\nclean-up had problems (above)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if status == 0 and not failed:
        say("demo finished: OK" if real else
            "demo finished: OK, but only as the FALLBACK (directory pools on one filesystem, no node steps);\n"
            "run it as root on a machine with loop devices to see arrays of different abilities")
    return status if not failed else max(status, 1)


__all__ = ["main"]
