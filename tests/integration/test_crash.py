"""The controller SIGKILLed at each step of a snapshot's copy, then restarted,
completes the snapshot correctly and leaves nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import yaml

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import mount_cap

MiB = 1 << 20
POINTS = ["copy-recorded-volume", "copy-recorded-pair", "copy-fenced", "copy-luns-made",
          "copy-checkpointed", "copy-verified", "copy-finishing", "copy-released"]


@contextmanager
def served(data: Path, config: Path, *, failpoint: str = "") -> Iterator[tuple[subprocess.Popen[bytes], rpc.ControllerStub]]:
    with serving(data, config, failpoint=failpoint) as (proc, channel):
        yield proc, rpc.ControllerStub(channel)


@contextmanager
def serving(data: Path, config: Path, *, failpoint: str = "") -> Iterator[tuple[subprocess.Popen[bytes], grpc.Channel]]:
    """The plugin as its own process (so a failpoint can kill it), and a channel to it."""
    sock = f"/tmp/virtvol-crash-{uuid.uuid4().hex[:8]}.sock"
    env = dict(os.environ, VIRTVOL_FAILPOINTS=failpoint)
    log = open(data / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "csi_virtvol", "serve", "--endpoint", f"unix://{sock}",
                             "--data-dir", str(data), "--node-id", "crash-node", "--config", str(config)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield proc, channel
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
        if os.path.exists(sock):  # a killed plugin leaves its socket file behind
            os.unlink(sock)


def content(data: Path, pools: dict[str, Path], vid: str) -> bytes:
    with SqliteStore(str(data / "state.db"), readonly=True) as st:
        vol = st.get(S.VOLUMES, vid)
        assert vol is not None
        out = bytearray()
        for e in vol.value.extents:
            with open(pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
                f.seek(e.offset)
                out += f.read(e.length)
        return bytes(out)


@pytest.mark.parametrize("point", POINTS)
def test_snapshot_survives_sigkill(point: str, xfs_mount: Path, ext4_mount: Path, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    pools = {"fast": xfs_mount / f"cf-{tag}", "slow": ext4_mount / f"cs-{tag}"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"arrays": [
        {"id": a, "kind": "file", "params": {"path": str(p), "capacity": str(256 * MiB)}} for a, p in pools.items()]}))
    data = tmp_path / "data"
    data.mkdir()
    with served(data, config) as (_, ctl):
        vol = ctl.CreateVolume(pb.CreateVolumeRequest(
            name="src", capacity_range=pb.CapacityRange(required_bytes=320 * MiB),
            volume_capabilities=[mount_cap()])).volume
        ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"copyBandwidth": "16Mi"}))
    vid = vol.volume_id
    for i, p in enumerate(sorted(pools["fast"].joinpath("luns").glob("*.img")) +
                          sorted(pools["slow"].joinpath("luns").glob("*.img"))):
        with open(p, "r+b") as f:
            f.write(os.urandom(4 * MiB) * (16 if "cs-" in str(p) else 2))
    at_cut = content(data, pools, vid)

    with served(data, config, failpoint=point) as (proc, ctl):
        try:
            ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="snap", source_volume_id=vid), timeout=60)
        except grpc.RpcError:
            pass  # the plugin died under the call
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"failpoint {point} was not reached"

    with served(data, config) as (_, ctl):
        deadline = time.monotonic() + 120
        while True:
            snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="snap", source_volume_id=vid)).snapshot
            if snap.ready_to_use:
                break
            assert time.monotonic() < deadline, "the snapshot never became ready after the restart"
            time.sleep(0.5)
        assert content(data, pools, snap.snapshot_id) == at_cut
        with SqliteStore(str(data / "state.db"), readonly=True) as st:
            luns = {r.value.key: r.value for r in st.list(S.LUNS)}
            pair = st.get(S.PAIRS, snap.snapshot_id)
        assert pair is not None and [e.method.value for e in pair.value.targets[0].extents] == ["internal", "host"]
        assert all(lun.state.value == "in-use" for lun in luns.values()), "the source stayed fenced"
        files = {f"{a}:{f.stem}" for a, p in pools.items() for f in p.joinpath("luns").glob("*.img")}
        assert files == set(luns), "LUN files and LUN records disagree (a leak or a loss)"
        assert len(files) == 4
        ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert [f for p in pools.values() for f in p.joinpath("luns").glob("*")] == []
    assert list((data / "copies").glob("*")) == []
