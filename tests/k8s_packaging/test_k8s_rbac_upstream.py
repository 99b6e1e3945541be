"""Each sidecar's RBAC in the chart against the RBAC its own upstream release asks for.

All containers of the controller pod run under one ServiceAccount; the chart gives each
sidecar its own ClusterRole and Role (`<release>-controller-<sidecar>`).  For the sidecar
versions the chart pins, upstream-rbac/ holds the rules of each sidecar's deploy/ RBAC
manifest (see its README.md for where they come from).  With the flags the chart passes:

* every upstream rule the sidecar needs is granted, in the same scope (a Role rule in a
  Role of the release namespace, a ClusterRole rule in a ClusterRole);
* the chart grants a sidecar nothing beyond those rules.

Deliberate differences are listed below, each with its reason (ideally none).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_helpers import CHART, NAMESPACE, Doc, by_kind, containers, load_docs, one

UPSTREAM = Path(__file__).parent / "upstream-rbac"
CONTROLLER = "csi-virtvol-controller"

# container -> (values.yaml sidecars key, suffix of its ClusterRole/Role)
SIDECARS = {
    "csi-provisioner": ("provisioner", "provisioner"),
    "csi-attacher": ("attacher", "attacher"),
    "csi-snapshotter": ("snapshotter", "snapshotter"),
    "csi-resizer": ("resizer", "resizer"),
    "csi-snapshot-metadata": ("snapshotMetadata", "snapshot-metadata"),
}

# Upstream rules (container, scope, group, resource, verb) the chart does not grant, and why.
NARROWER: dict[tuple[str, str, str, str, str], str] = {
    **{("csi-snapshot-metadata", "cluster", "cbt.storage.k8s.io", "snapshotmetadataservices", v):
       "the sidecar only reads the SnapshotMetadataService named after the driver; the chart "
       "creates it at install time (templates/snapshot-metadata.yaml), nothing writes it at run time"
       for v in ("create", "update", "patch", "delete")},
}

# Rules (container, scope, group, resource, verb) the chart grants beyond upstream, and why.
BROADER: dict[tuple[str, str, str, str, str], str] = {}

GATE = "--feature-gates=CSIVolumeGroupSnapshot=true"
VARIANTS = {
    "default": [],
    "group-snapshots-and-cbt": ["--set", "volumeGroupSnapshotClass.create=true",
                                "--set", "snapshotMetadata.enabled=true", "--set", "snapshotMetadata.caCert=Y2E="],
    "one-replica": ["--set", "controller.replicas=1", "--set", "controller.leaderElection.enabled=false"],
}

Key = tuple[str, str, str, str]  # scope, group, resource, verb


def pinned_versions() -> dict[str, str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return {c: values["sidecars"][key]["image"].rpartition(":")[2] for c, (key, _) in SIDECARS.items()}


def upstream(container: str, version: str) -> Doc:
    path = UPSTREAM / f"{container}-{version}.yaml"
    assert path.exists(), (f"no upstream RBAC for {container} {version} (the version the chart pins): "
                           f"add {path.relative_to(CHART.parents[1])}")
    doc: Doc = yaml.safe_load(path.read_text())
    assert doc["sidecar"] == container and doc["version"] == version
    return doc


def active_conditions(docs: list[Doc], args: list[str]) -> set[str]:
    """The `when` of upstream rules that hold for this container as the chart runs it."""
    out = {"vac"}  # VolumeAttributesClass: on by default in these versions where the cluster serves v1
    if "--leader-election=true" in args:
        out.add("leader-election")
    if "--enable-capacity" in args or "--enable-capacity=true" in args:
        out.add("enable-capacity")
        level = [a.partition("=")[2] for a in args if a.startswith("--capacity-ownerref-level=")]
        if level and int(level[0]) > 0:
            out.add("capacity-ownerref")
    if GATE in args:
        out.add("group-snapshots")
    if one(docs, "CSIDriver")["spec"].get("attachRequired", True):
        out.add("attach-required")
    return out


def keys(rules: list[Doc], scope: str) -> set[Key]:
    return {(scope, g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def upstream_keys(doc: Doc, active: set[str] | None) -> set[Key]:
    """Upstream's rules, those needed under `active` (all of them when None)."""
    out: set[Key] = set()
    for scope, field in (("cluster", "clusterRole"), ("namespace", "role")):
        rules = [r for r in doc.get(field) or [] if active is None or r.get("when", "") in active | {""}]
        out |= keys(rules, scope)
    return out


def chart_keys(docs: list[Doc], suffix: str) -> set[Key]:
    """What the chart grants one sidecar: its ClusterRole and its Role in the release namespace,
    each bound to the controller's ServiceAccount."""
    name = f"{CONTROLLER}-{suffix}"
    out: set[Key] = set()
    for kind, binding, scope in (("ClusterRole", "ClusterRoleBinding", "cluster"), ("Role", "RoleBinding", "namespace")):
        roles = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
        if not roles:
            continue
        role = roles[0]
        if kind == "Role":
            assert role["metadata"]["namespace"] == NAMESPACE
        b = one(docs, binding, name)
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}]
        out |= keys(role["rules"], scope)
    return out


def sidecar_cases() -> list[Any]:
    return [pytest.param(v, c, id=f"{v}-{c}") for v in VARIANTS for c in SIDECARS]


@pytest.fixture(scope="module")
def rendered(render: Callable[..., str]) -> dict[str, list[Doc]]:
    return {v: load_docs(render(*opts)) for v, opts in VARIANTS.items()}


def _setup(rendered: dict[str, list[Doc]], variant: str,
           container: str) -> tuple[list[Doc], Doc, set[str]] | None:
    """The rendered install, the sidecar's upstream rules and the chart's active flags; None
    (having checked that the chart grants that sidecar nothing) where the install does not run it."""
    docs = rendered[variant]
    pod = containers(one(docs, "Deployment")["spec"]["template"]["spec"])
    if container not in pod:
        assert not [d for d in by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
                    if d["metadata"]["name"] == f"{CONTROLLER}-{SIDECARS[container][1]}"], \
            f"RBAC for {container}, which this install does not run"
        return None
    c = pod[container]
    version = c["image"].rpartition(":")[2]
    assert version == pinned_versions()[container]
    return docs, upstream(container, version), active_conditions(docs, c["args"])


@pytest.mark.parametrize("variant,container", sidecar_cases())
def test_sidecar_is_granted_what_its_upstream_release_asks_for(rendered: dict[str, list[Doc]], variant: str,
                                                               container: str) -> None:
    setup = _setup(rendered, variant, container)
    if setup is None:
        return
    docs, up, active = setup
    granted = chart_keys(docs, SIDECARS[container][1])
    missing = sorted(k for k in upstream_keys(up, active) - granted if (container, *k) not in NARROWER)
    assert missing == [], f"{container} {up['version']} needs these (scope, group, resource, verb), " \
                          f"which the chart does not grant it: {missing}"


@pytest.mark.parametrize("variant,container", sidecar_cases())
def test_sidecar_is_granted_nothing_beyond_its_upstream_release(rendered: dict[str, list[Doc]], variant: str,
                                                                container: str) -> None:
    setup = _setup(rendered, variant, container)
    if setup is None:
        return
    docs, up, active = setup
    granted = chart_keys(docs, SIDECARS[container][1])
    extra = sorted(k for k in granted - upstream_keys(up, active) if (container, *k) not in BROADER)
    assert extra == [], f"the chart grants {container} more than its upstream release asks for " \
                        f"with these flags: {extra}"


def test_every_pinned_sidecar_with_api_access_has_upstream_rbac() -> None:
    """Bumping a sidecar's image without its upstream RBAC fails here (node-driver-registrar and
    livenessprobe use no API)."""
    for container, version in pinned_versions().items():
        up = upstream(container, version)
        assert up["base"]["repo"].startswith("kubernetes-csi/") and len(up["base"]["commit"]) == 40
        for rule in (up.get("clusterRole") or []) + (up.get("role") or []):
            assert rule.get("source"), rule
    assert NARROWER.keys() <= {(c, *k) for c in SIDECARS for k in upstream_keys(
        upstream(c, pinned_versions()[c]), None)}, "NARROWER lists a rule upstream does not have"
