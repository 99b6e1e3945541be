"""A real csi-virtvol plugin on a real unix socket, for integration and conformance tests."""
from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from csi_virtvol import app
from csi_virtvol.config import load_config
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore

NODE_ID = "test-node"


@dataclass
class Plugin:
    endpoint: str
    data_dir: Path
    pools: dict[str, Path]
    channel: grpc.Channel
    identity: rpc.IdentityStub
    controller: rpc.ControllerStub
    node: rpc.NodeStub
    groups: rpc.GroupControllerStub

    def lun_files(self) -> list[str]:
        out = []
        for name, path in self.pools.items():
            luns = path / "luns"
            if luns.is_dir():
                out += [f"{name}/{f}" for f in sorted(os.listdir(luns))]
        return out

    def records(self) -> dict[str, int]:
        with SqliteStore(str(self.data_dir / "state.db"), readonly=True) as st:
            return {t.name: len(st.list(t)) for t in (S.VOLUMES, S.LUNS, S.PAIRS, S.GROUPS)}

    def footprint(self) -> tuple[list[str], dict[str, int]]:
        """Everything a failed request must leave unchanged."""
        return self.lun_files(), self.records()


def mount_cap(fs: str = "", mode: int = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))
    cap.mount.fs_type = fs
    return cap


def block_cap(mode: int = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))
    cap.block.SetInParent()
    return cap


def _teardown_node(state_dir: str, workdir: Path) -> None:
    """Whatever a failed test left staged or mounted under its directory goes away."""
    from csi_virtvol.node.stager import Stager

    def mounts() -> list[str]:
        with open("/proc/self/mountinfo") as f:
            found = [line.split()[4] for line in f]
        return sorted((m for m in found if m.startswith(str(workdir) + "/")), reverse=True)

    stager = Stager(state_dir) if os.path.isdir(state_dir) else None
    staged = stager.list_staged() if stager is not None else []
    for m in mounts():  # published targets first: they hold the staged devices
        if m not in {rec.staging_path for rec in staged}:
            subprocess.run(["umount", "-l", m], check=False)
    for rec in staged:
        assert stager is not None
        stager.unstage(rec.volume_id, rec.staging_path, keep_cuts=False)
    for m in mounts():
        subprocess.run(["umount", "-l", m], check=False)


def unique(prefix: str = "vol") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def running_plugin(workdir: Path, pools: Sequence[tuple[str, Path, int, dict[str, str]]],
                   extra_arrays: Sequence[dict[str, object]] = (), *,
                   settings: Mapping[str, object] | None = None,
                   teardown_node: bool = True) -> Iterator[Plugin]:
    """pools: (array id, directory, capacity bytes (0: the filesystem's), labels) of file
    pools; extra_arrays: more entries of the config's `arrays` (other driver kinds);
    settings: more top-level keys of the config file (maxVolumesPerNode, ...).
    teardown_node=False leaves what is staged and published in place when the plugin
    stops, as a restart of the plugin does (a later running_plugin on the same workdir
    takes it over and tears it down)."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    arrays = []
    for aid, path, cap, labels in pools:
        params = {"path": str(path)}
        if cap:
            params["capacity"] = str(cap)
        arrays.append({"id": aid, "kind": "file", "params": params, "labels": labels})
    arrays += [dict(a) for a in extra_arrays]
    cfg_file = workdir / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({"arrays": arrays, **(settings or {})}))
    sock = f"/tmp/virtvol-{uuid.uuid4().hex[:12]}.sock"  # short: unix socket paths are limited
    endpoint = f"unix://{sock}"
    config = load_config(endpoint=endpoint, data_dir=str(data), node_id=NODE_ID, config_file=str(cfg_file))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.serve(config, stop=stop)
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        stop.set()
        raise RuntimeError(f"plugin did not start: {errors}")
    try:
        yield Plugin(endpoint=endpoint, data_dir=data, pools={a: p for a, p, _, _ in pools}, channel=channel,
                     identity=rpc.IdentityStub(channel), controller=rpc.ControllerStub(channel),
                     node=rpc.NodeStub(channel), groups=rpc.GroupControllerStub(channel))
    finally:
        channel.close()
        stop.set()
        t.join(timeout=30)
        if os.path.exists(sock):
            os.unlink(sock)
        if teardown_node:
            _teardown_node(config.node_state_dir, workdir)
    if errors:
        raise errors[0]
