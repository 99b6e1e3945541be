"""Issue 12 item 7: StorageArray objects are array configuration.  The ones an
administrator or the chart made are read at start-up, in place of the --config entry
of the same id or added to them; the ones the driver records from --config carry their
real params (secrets left out) and are not read back as configuration."""
from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from csi_virtvol import app
from csi_virtvol.config import load_config
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.kube.crdstore import RECORDED_ANNOTATION
from fakeapi import FakeApiServer

MiB = 1 << 20
GROUP = "virtvol.csi.example.org"
pytestmark = pytest.mark.root


def _start(fake_api: FakeApiServer, cfg: Path, tmp_path: Path) -> tuple[threading.Event, threading.Thread,
                                                                          grpc.Channel]:
    sock = f"/tmp/virtvol-sa-{uuid.uuid4().hex[:8]}.sock"
    config = load_config(endpoint=f"unix://{sock}", data_dir=str(tmp_path / "data"), node_id="node-1",
                         mode="controller", config_file=str(cfg))
    stop = threading.Event()
    server = threading.Thread(target=app.serve, args=(config,), kwargs={"stop": stop}, daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return stop, server, channel


@pytest.fixture
def pools(xfs_mount: Path, ext4_mount: Path) -> Iterator[dict[str, Path]]:
    tag = uuid.uuid4().hex[:8]
    out = {"fast": xfs_mount / f"sa-f-{tag}", "slow": ext4_mount / f"sa-s-{tag}",
           "extra": ext4_mount / f"sa-e-{tag}"}
    yield out
    for p in out.values():
        shutil.rmtree(p, ignore_errors=True)


def test_storage_array_objects_configure_the_driver(fake_api: FakeApiServer, pools: dict[str, Path],
                                                    tmp_path: Path) -> None:
    # what the chart (helm) makes before the controller starts: one array only as an object,
    # and one that overrides a --config entry's labels
    for name, labels in (("extra", {"tier": "extra"}), ("fast", {"tier": "gold"})):
        fake_api.put(GROUP, "storagearrays", {
            "apiVersion": f"{GROUP}/v1alpha1", "kind": "StorageArray",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "Helm"}},
            "spec": {"kind": "file", "params": {"path": str(pools[name]), "capacity": "128Mi"},
                     "labels": labels}})
    cfg = tmp_path / "controller.yaml"
    cfg.write_text(yaml.safe_dump({"store": "crd", "kubeApi": fake_api.url, "namespace": "csi-virtvol",
                                   "copyImage": "csi-virtvol:test", "arrays": [
        {"id": "fast", "kind": "file", "params": {"path": str(pools["fast"]), "capacity": "128Mi"},
         "labels": {"tier": "fast"}},
        {"id": "slow", "kind": "file", "labels": {"tier": "slow"},
         "params": {"path": str(pools["slow"]), "capacity": "128Mi", "chapSecret": "hunter2"}}]}))
    stop, server, channel = _start(fake_api, cfg, tmp_path)
    try:
        ctl = rpc.ControllerStub(channel)
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER), mount=pb.VolumeCapability.MountVolume())

        def create(name: str, **params: str) -> list[str]:
            v = ctl.CreateVolume(pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(
                required_bytes=16 * MiB), volume_capabilities=[cap], parameters=params)).volume
            vv = [o for o in fake_api.objects(GROUP, "virtualvolumes") if o["spec"]["name"] == name][0]
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
            return [e["array"] for e in vv["spec"]["extents"]]

        assert create("v-extra", arrays="extra") == ["extra"]      # known only from its object
        assert create("v-gold", arraySelector="tier=gold") == ["fast"]  # the object's labels won
        with pytest.raises(grpc.RpcError):
            create("v-fast-label", arraySelector="tier=fast")
        arrays = {o["metadata"]["name"]: o for o in fake_api.objects(GROUP, "storagearrays")}
        slow = arrays["slow"]
        assert slow["spec"]["params"] == {"path": str(pools["slow"]), "capacity": "128Mi"}  # no secret
        assert "hunter2" not in str(slow)
        assert slow["metadata"]["annotations"][RECORDED_ANNOTATION] == "config"
        assert RECORDED_ANNOTATION not in arrays["extra"]["metadata"]["annotations"]
        assert arrays["extra"]["status"]["identity"]["model"] == "ext4"
    finally:
        channel.close()
        stop.set()
        server.join(timeout=30)

    # the next start without "slow" in --config: its recorded object is not configuration
    doc = yaml.safe_load(cfg.read_text())
    doc["arrays"] = [a for a in doc["arrays"] if a["id"] != "slow"]
    cfg.write_text(yaml.safe_dump(doc))
    stop, server, channel = _start(fake_api, cfg, tmp_path)
    try:
        ctl = rpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            ctl.CreateVolume(pb.CreateVolumeRequest(name="v-slow", capacity_range=pb.CapacityRange(
                required_bytes=16 * MiB), volume_capabilities=[pb.VolumeCapability(
                    access_mode=pb.VolumeCapability.AccessMode(
                        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
                    mount=pb.VolumeCapability.MountVolume())], parameters={"arrays": "slow"}))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "unknown array" in (e.value.details() or "")
    finally:
        channel.close()
        stop.set()
        server.join(timeout=30)
