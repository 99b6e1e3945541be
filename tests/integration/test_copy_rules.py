"""Issue 12's rules on the copy path, on the controller's services over real file pools
(reflink XFS and ext4) with real host copies (LocalCopyRunner subprocesses):

* a target that is ready has been verified: a copy whose checkpoint lies is caught and
  copied again from 0, and the pair records how each host extent was checked;
* a second worker never starts on a pair that a request is undoing (item 6).
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_virtvol import app, errors
from csi_virtvol.config import load_config
from csi_virtvol.copy import cli
from csi_virtvol.copy.runner import HostCopy, LocalCopyRunner
from csi_virtvol.model.capability import AccessMode, AccessType, Capability
from csi_virtvol.model.pair import CopyMethod
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.volumes import CreateVolume
from csi_virtvol.store import base as S

MiB = 1 << 20
pytestmark = pytest.mark.root


class Core:
    def __init__(self, core: app.ControllerCore, store: S.StateStore, pools: dict[str, Path]) -> None:
        self.core, self.store, self.pools = core, store, pools

    def content(self, vid: str) -> bytes:
        vol = self.store.get(S.VOLUMES, vid)
        assert vol is not None
        out = bytearray()
        for e in vol.value.extents:
            with open(self.pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
                f.seek(e.offset)
                out += f.read(e.length)
        return bytes(out)

    def lun_files(self) -> set[str]:
        return {f"{a}:{f.stem}" for a, p in self.pools.items() for f in p.joinpath("luns").glob("*.img")}


@pytest.fixture
def controller(xfs_mount: Path, ext4_mount: Path, tmp_path: Path) -> Iterator[tuple[Core, Any]]:
    tag = uuid.uuid4().hex[:8]
    pools = {"fast": xfs_mount / f"rf-{tag}", "slow": ext4_mount / f"rs-{tag}"}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"arrays": [
        {"id": a, "kind": "file", "params": {"path": str(p), "capacity": str(256 * MiB)}} for a, p in pools.items()]}))
    config = load_config(endpoint="unix:///tmp/unused.sock", data_dir=str(tmp_path / "data"), node_id="n1",
                         mode="controller", config_file=str(cfg))
    store = app.open_store(config)
    runner = Lying(work_dir=str(tmp_path / "data" / "copies"))
    core = app.build_controller(config, store, KeyedLocks(), runner=runner)
    try:
        yield Core(core, store, pools), runner
    finally:
        core.snapshots.close()
        runner.close()
        store.close()
        for p in pools.values():
            for f in p.rglob("*"):
                if f.is_file():
                    f.unlink()


class Lying(LocalCopyRunner):
    """A host copy whose first attempt finds a checkpoint that claims the whole range is done:
    what a checkpoint of a discarded attempt did to a fresh target (issue 12 item 1)."""

    def __init__(self, *, work_dir: str) -> None:
        super().__init__(work_dir=work_dir)
        self.lie = False
        self.starts: list[HostCopy] = []

    def start(self, copy: HostCopy) -> None:
        self.starts.append(copy)
        if self.lie and len(self.starts) == 1:
            cli.write_progress_file(self._progress(copy.job), {
                "src": copy.src, "src_offset": copy.src_offset, "dst": copy.dst, "dst_offset": copy.dst_offset,
                "length": copy.length, "checkpoint_id": copy.checkpoint_id, "bytes_done": copy.length})
        super().start(copy)


def _source(c: Core, *, data: int = 2 * MiB) -> str:
    cap = Capability(access_type=AccessType.MOUNT, access_mode=AccessMode.SINGLE_NODE_WRITER)
    vol = c.core.volumes.create(CreateVolume(name=f"src-{uuid.uuid4().hex[:6]}", required_bytes=320 * MiB,
                                             capabilities=(cap,)))
    for e in vol.extents:  # data on both arrays: the ext4 part is host-copied
        with open(c.pools[e.array] / "luns" / f"{e.lun}.img", "r+b") as f:
            f.seek(e.offset)
            f.write(os.urandom(data))
    return str(vol.id)


def _ready(c: Core, name: str, source: str) -> str:
    for _ in range(600):
        snap, _prog = c.core.snapshots.create_snapshot(name=name, source_volume_id=source, parameters={})
        if snap.state.value == "available":
            return str(snap.id)
        threading.Event().wait(0.2)
    raise AssertionError("the snapshot never became ready")


def test_a_lying_checkpoint_is_caught_and_copied_again(controller: tuple[Core, Lying]) -> None:
    c, runner = controller
    src = _source(c)
    at_cut = hashlib.sha256(c.content(src)).hexdigest()
    runner.lie = True
    sid = _ready(c, "snap-lie", src)
    assert hashlib.sha256(c.content(sid)).hexdigest() == at_cut, "a ready snapshot holds the source's bytes"
    pair = c.store.get(S.PAIRS, sid)
    assert pair is not None
    host = [e for e in pair.value.targets[0].extents if e.method is CopyMethod.HOST]
    assert host and all((e.verify_method, e.verify_result) == ("blake2b-256", "match") for e in host)
    assert all(e.bytes_written > 0 for e in host)
    ids = [s.checkpoint_id for s in runner.starts]
    assert len(ids) == 2 and ids[0] != ids[1], "re-copied under a new checkpoint identity"
    assert list(Path(runner._dir).glob("*.progress.json")) == [], "no checkpoint outlives its copy"


def test_no_worker_starts_on_a_pair_being_undone(controller: tuple[Core, Lying],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 6: CreateSnapshot's undo (its cut failed) raced the reconcile loop, which started a
    worker on the half-undone pair; that worker made the pair's LUNs again."""
    c, _ = controller
    src = _source(c)
    svc = c.core.snapshots
    before = c.lun_files()
    made_by: list[str] = []
    real_make, real_release = svc._make_luns, svc._release

    def make_luns(source: Any, target: Any, **which: bool) -> None:
        made_by.append(threading.current_thread().name)
        if len(made_by) == 1:
            raise errors.BackendError("injected: the cut cannot be made")
        real_make(source, target, **which)

    request = threading.current_thread()

    def release(pair: Any) -> None:  # in the undo: the reconcile loop comes by now
        if threading.current_thread() is not request:
            return real_release(pair)
        svc.resume()
        with svc._guard:
            workers = [w[0] for w in svc._workers.values()]
        for t in workers:
            t.join(timeout=60)
        return real_release(pair)

    monkeypatch.setattr(svc, "_make_luns", make_luns)
    monkeypatch.setattr(svc, "_release", release)
    with pytest.raises(errors.BackendError):
        svc.create_snapshot(name="snap-undone", source_volume_id=src, parameters={})
    assert made_by == [threading.current_thread().name], f"a worker made LUNs of a pair being undone: {made_by}"
    monkeypatch.undo()
    assert c.lun_files() == before, "the undo left LUNs behind"
    assert c.store.list(S.PAIRS) == []


def test_resume_logs_only_what_it_starts(controller: tuple[Core, Lying], caplog: pytest.LogCaptureFixture) -> None:
    """Item 7: `resuming copy ...` was logged by every reconcile pass (5 s) while the copy ran."""
    c, _ = controller
    src = _source(c, data=24 * MiB)
    c.core.volumes.modify(src, mutable={"copyBandwidth": "8Mi"})
    snap, _p = c.core.snapshots.create_snapshot(name="snap-log", source_volume_id=src, parameters={})
    caplog.set_level("INFO", logger="csi_virtvol.services.snapshots")
    assert snap.state.value == "copying"
    for _ in range(3):
        c.core.snapshots.resume()
    assert [r for r in caplog.records if "resuming copy" in r.getMessage()] == []
    _ready(c, "snap-log", src)


def test_the_node_sweeps_checkpoints_no_copy_will_resume(controller: tuple[Core, Lying], tmp_path: Path) -> None:
    """Item 7: node progress files were never removed.  A checkpoint of a discarded pair, or of an
    earlier cut, goes; one of the present cut stays (its copy resumes from it)."""
    from csi_virtvol.copy import checkpoint
    from csi_virtvol.services import checkpoints

    c, _ = controller
    src = _source(c)
    sid = _ready(c, "snap-sweep", src)
    pair = c.store.get(S.PAIRS, sid)
    assert pair is not None
    d = tmp_path / "copy"
    d.mkdir()

    def ck(name: str, pair_id: str, cut: float) -> Path:
        p = d / f"{name}.json"
        cli.write_progress_file(str(p), {"checkpoint_id": checkpoint.identity(
            pair=pair_id, target="slow:x-1", cut_at=cut, attempt=1), "bytes_done": 4096})
        return p

    present = ck("present", sid, pair.value.cut_at)
    earlier = ck("earlier", sid, pair.value.cut_at - 10)
    gone = ck("gone", "vs-discarded", 1.0)
    legacy = d / "legacy.json"
    cli.write_progress_file(str(legacy), {"bytes_done": 1})
    assert checkpoints.sweep(store=c.store, directory=str(d), grace=60) == []  # all too young
    removed = checkpoints.sweep(store=c.store, directory=str(d), grace=0)
    assert sorted(removed) == sorted([str(earlier), str(gone)])
    assert present.exists() and legacy.exists() and not earlier.exists() and not gone.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the stop, in the worker
def test_a_failing_copy_never_lets_its_source_go_while_in_flight(controller: tuple[Core, Lying],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that fails records the failure before it lets the source go.  The other order left,
    when the controller stopped (or the store failed, tests/kube/test_copy_matrix.py) in between,
    a pair still in flight over a source already let go: the copy was then resumed and finished
    on a source that could be written meanwhile, and reported ready."""
    from csi_virtvol.model.pair import Fence, PairState

    c, _ = controller
    src = _source(c)
    svc = c.core.snapshots
    real_release = svc._release

    def host_copy(*a: Any, **kw: Any) -> None:
        raise errors.BackendError("injected: the copy cannot be made")

    def release_then_stop(pair: Any) -> None:  # the release is made, then the controller stops
        real_release(pair)
        raise errors.BackendUnavailable("injected: the controller stops here")

    monkeypatch.setattr(svc, "_host_copy", host_copy)
    monkeypatch.setattr(svc, "_release", release_then_stop)
    try:
        svc.create_snapshot(name="snap-fail", source_volume_id=src, parameters={})
    except errors.VirtvolError:
        pass  # the copy failed within the call
    with svc._guard:
        workers = [w[0] for w in svc._workers.values()]
    for t in workers:
        t.join(timeout=60)
    pair = next(r.value for r in c.store.list(S.PAIRS))
    assert not (pair.state in (PairState.COPYING, PairState.RESYNCING) and pair.fence is Fence.RELEASED), \
        f"a pair in flight over a source let go: {pair.state}, fence {pair.fence}"
    assert pair.state is PairState.FAILED
    monkeypatch.undo()
    svc.delete_snapshot(pair.id)
    assert c.store.list(S.PAIRS) == []
    luns = [r.value for r in c.store.list(S.LUNS)]
    assert luns and all(lun.state.value == "in-use" for lun in luns), "the source stayed fenced"
