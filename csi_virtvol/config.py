"""The driver's configuration: flags and an optional YAML file, validated once."""
from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from csi_virtvol import errors
from csi_virtvol.model.array import ABILITY_NAMES, ArraySpec
from csi_virtvol.model.ids import ArrayId, NodeId

TOPOLOGY_NODE_KEY = "topology.virtvol.csi.example.org/node"


class Mode(enum.Enum):
    ALL = "all"
    CONTROLLER = "controller"
    NODE = "node"

    @property
    def controller(self) -> bool:
        return self in (Mode.ALL, Mode.CONTROLLER)

    @property
    def node(self) -> bool:
        return self in (Mode.ALL, Mode.NODE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    endpoint: str
    data_dir: str
    node_id: NodeId
    mode: Mode = Mode.ALL
    store: str = "sqlite"
    arrays: tuple[ArraySpec, ...] = ()
    ability_table: str = ""  # "" = the built-in table
    max_volumes_per_node: int = 0
    node_topology: Mapping[str, str] = field(default_factory=dict)
    copy_bandwidth: int = 0  # bytes/s for host copies, 0 = unlimited
    kube_namespace: str = "kube-system"
    copy_image: str = ""
    leader_election: bool = False
    lease_name: str = "csi-virtvol-controller"
    copy_job: Mapping[str, Any] = field(default_factory=dict)
    pod_name: str = ""
    kube_api: str = ""  # an API server URL (no auth): out-of-cluster use and tests; "" = in-cluster/kubeconfig
    kubeconfig: str = ""  # a kubeconfig file (server and credentials) instead of the pod's ServiceAccount

    @property
    def state_path(self) -> str:
        return os.path.join(self.data_dir, "state.db")

    @property
    def node_state_dir(self) -> str:
        return os.path.join(self.data_dir, "node")


def default_arrays(data_dir: str, node_id: NodeId) -> tuple[ArraySpec, ...]:
    """The embedded default: two file pools inside the data dir, local to this node."""
    topo = {TOPOLOGY_NODE_KEY: node_id}
    return tuple(
        ArraySpec(id=ArrayId(name), kind="file",
                  params={"path": os.path.join(data_dir, "arrays", name)},
                  labels={"pool": name}, topology=topo)
        for name in ("pool-a", "pool-b")
    )


def parse_size(value: object) -> int:
    """'10Gi', '512M', 1048576 -> bytes."""
    if isinstance(value, bool):
        raise errors.InvalidRequest(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise errors.InvalidRequest(f"negative size: {value}")
        return value
    text = str(value).strip()
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}
    for suffix in sorted(units, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        suffix, number = "", text
    try:
        n = int(number)
    except ValueError as e:
        raise errors.InvalidRequest(f"not a size: {value!r}") from e
    if n < 0:
        raise errors.InvalidRequest(f"negative size: {value!r}")
    return n * units[suffix]


def array_from_item(item: Mapping[str, Any], *, node_id: NodeId) -> ArraySpec:
    """One `arrays` entry of the config file (or a StorageArray's spec, with `id` = its
    name), validated; a file pool without topology is local to `node_id`."""
    return _array_from_yaml(item, node_id=node_id)


def merge_arrays(base: tuple[ArraySpec, ...], overrides: list[ArraySpec] | tuple[ArraySpec, ...]
                 ) -> tuple[ArraySpec, ...]:
    """`base` (--config) with each array of `overrides` (StorageArray objects) put in place
    of the one of the same id, or added after them."""
    by_id = {a.id: a for a in overrides}
    out = [by_id.pop(a.id, a) for a in base]
    return tuple(out + [a for a in overrides if a.id in by_id])


def _array_from_yaml(item: Mapping[str, Any], *, node_id: NodeId) -> ArraySpec:
    try:
        aid = str(item["id"])
        kind = str(item["kind"])
    except KeyError as e:
        raise errors.InvalidRequest(f"array entry needs {e.args[0]!r}: {dict(item)}") from e
    overrides = {str(k): bool(v) for k, v in (item.get("abilityOverrides") or {}).items()}
    unknown = set(overrides) - set(ABILITY_NAMES)
    if unknown:
        raise errors.InvalidRequest(f"array {aid}: unknown abilities {sorted(unknown)}; known: {ABILITY_NAMES}")
    topology = {str(k): str(v) for k, v in (item.get("topology") or {}).items()}
    if item.get("local", kind == "file" and not topology):
        topology.setdefault(TOPOLOGY_NODE_KEY, node_id)
    return ArraySpec(
        id=ArrayId(aid), kind=kind,
        params={str(k): str(v) for k, v in (item.get("params") or {}).items()},
        labels={str(k): str(v) for k, v in (item.get("labels") or {}).items()},
        ability_overrides=overrides, topology=topology,
    )


def load_config(*, endpoint: str, data_dir: str, node_id: str, mode: str = "all",
                config_file: str = "", store: str = "") -> Config:
    if not endpoint:
        raise errors.InvalidRequest("--endpoint is required")
    if not node_id:
        raise errors.InvalidRequest("--node-id is required")
    nid = NodeId(node_id)
    doc: Mapping[str, Any] = {}
    if config_file:
        try:
            with open(config_file) as fh:
                doc = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as e:
            raise errors.InvalidRequest(f"cannot read config {config_file}: {e}") from e
    data_dir = data_dir or str(doc.get("dataDir", ""))
    if not data_dir:
        raise errors.InvalidRequest("--data-dir is required")
    data_dir = os.path.abspath(data_dir)
    arrays = tuple(_array_from_yaml(a, node_id=nid) for a in doc.get("arrays") or ())
    if not arrays and "arrays" not in doc:
        arrays = default_arrays(data_dir, nid)
    ids = [a.id for a in arrays]
    if len(set(ids)) != len(ids):
        raise errors.InvalidRequest(f"duplicate array ids in {ids}")
    try:
        m = Mode(mode)
    except ValueError as e:
        raise errors.InvalidRequest(f"--mode must be one of all, controller, node, not {mode!r}") from e
    try:
        max_volumes = int(doc.get("maxVolumesPerNode", 0))
    except (TypeError, ValueError) as e:
        raise errors.InvalidRequest(f"maxVolumesPerNode must be a whole number: {e}") from e
    if max_volumes < 0:
        raise errors.InvalidRequest(f"maxVolumesPerNode must be 0 (what the node can hold) or more, not {max_volumes}")
    topo: dict[str, str] = {TOPOLOGY_NODE_KEY: nid}
    topo.update({str(k): str(v) for k, v in (doc.get("nodeTopology") or {}).items()})
    return Config(
        endpoint=endpoint, data_dir=data_dir, node_id=nid, mode=m,
        store=store or str(doc.get("store", "sqlite")), arrays=arrays,
        ability_table=str(doc.get("abilityTable", "")),
        max_volumes_per_node=max_volumes,
        node_topology=topo,
        copy_bandwidth=parse_size(doc.get("copyBandwidth", 0)),
        kube_namespace=str(doc.get("namespace", os.environ.get("POD_NAMESPACE", "kube-system"))),
        copy_image=str(doc.get("copyImage", os.environ.get("VIRTVOL_IMAGE", ""))),
        leader_election=bool((doc.get("leaderElection") or {}).get("enabled", False)),
        lease_name=str((doc.get("leaderElection") or {}).get("leaseName", "csi-virtvol-controller")),
        copy_job=dict(doc.get("copyJob") or {}),
        pod_name=os.environ.get("POD_NAME", "") or f"{nid}-{os.getpid()}",
        kube_api=str(doc.get("kubeApi", "")),
        kubeconfig=str(doc.get("kubeconfig", "")),
    )
