"""charts/csi-virtvol: lint, schema validation for two Kubernetes versions, and
the contract with the driver (flags, config file, parameters, RBAC)."""
from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import crdschema
from k8s_helpers import CHART, NAMESPACE, ROOT, Doc, by_kind, containers, load_docs, one

KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
VALIDATOR = str(Path(sys.executable).parent / "kubernetes-validate")
GROUP = "virtvol.csi.example.org"

# A PEM CA bundle, base64 (the form SnapshotMetadataService spec.caCert takes); never dialled.
CA_B64 = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n").decode()

# Non-default renders, so every branch of the templates is validated too.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "single-sqlite": ["--set", "store=sqlite", "--set", "controller.replicas=1",
                      "--set", "controller.leaderElection.enabled=false",
                      "--set", "controller.privileged=false", "--set", "node.hostNetwork=false",
                      "--set", "node.iscsi.enabled=false"],
    "everything-set": ["--set", "storageClass.maxExtentSize=4Gi", "--set", "storageClass.arraySelector=tier=fast",
                       "--set", "storageClass.isDefault=true", "--set", "volumeSnapshotClass.isDefault=true",
                       "--set", "storageClass.extraParameters.fsType=xfs",
                       "--set", "volumeSnapshotClass.parameters.arrays=pool-b",
                       "--set", "imagePullSecrets[0].name=regcred", "--set", "copyJob.priorityClassName=low",
                       "--set", "node.maxVolumesPerNode=64",
                       "--set", "controller.hostNetwork=true", "--set", "controller.iscsi.enabled=true",
                       "--set", "controller.lvm.enabled=true",
                       "--set-json", 'arrays=[{"name":"lvm-1","kind":"lvm","params":{"volumeGroup":"vg0"},'
                                     '"abilityOverrides":{"internal-copy":true},'
                                     '"topology":{"topology.virtvol.csi.example.org/node":"n1"}},'
                                     '{"name":"san-a","kind":"lio","params":{"iqn":"iqn.2003-01.org.example:san-a",'
                                     '"pool":"/srv/san-a","portal":"10.0.0.5:3260"}},'
                                     '{"name":"q1","kind":"qsd","params":{"pool":"/srv/q1","start":"true",'
                                     '"nbd":"10.0.0.5:10809"}}]'],
    "snapshot-metadata": ["--set", "snapshotMetadata.enabled=true", "--set", f"snapshotMetadata.caCert={CA_B64}"],
    "nothing-optional": ["--set", "storageClass.create=false", "--set", "volumeSnapshotClass.create=false",
                         "--set-json", "arrays=[]", "--set", "controller.podDisruptionBudget.enabled=false"],
}


def test_helm_lint_strict(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    p = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in p.stdout


@pytest.mark.parametrize("bad", [
    ["--set", "storageClass.layout=diagonal"],
    ["--set", "controller.replicas=0"],
    ["--set", "image.pullPolicy=Sometimes"],
    ["--set", "storageClass.maxExtentSize=1.5Gi"],
    ["--set", "unknownTopLevelKey=1"],
    ["--set", "controller.leaderElection.enabeld=true"],
    ["--set-json", 'arrays=[{"name":"Bad_Name","kind":"file"}]'],
])
def test_values_schema_rejects(helm: Callable[..., subprocess.CompletedProcess[str]], bad: list[str]) -> None:
    p = helm("lint", "--strict", str(CHART), *bad, check=False)
    assert p.returncode != 0
    assert "values don't meet the specifications of the schema" in p.stdout + p.stderr


def test_sqlite_store_needs_a_single_replica(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    p = helm("template", "x", str(CHART), "--set", "store=sqlite", check=False)
    assert p.returncode != 0 and "controller.replicas: 1" in p.stderr
    helm("template", "x", str(CHART), "--set", "store=sqlite", "--set", "controller.replicas=1")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kubernetes_validate_strict(render: Callable[..., str], tmp_path: Path, version: str, variant: str) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(render(*VARIANTS[variant]))
    p = subprocess.run([VALIDATOR, "--strict", "-k", version, str(manifest)],
                       capture_output=True, text=True, timeout=300)
    lines = (p.stdout + p.stderr).splitlines()
    assert p.returncode == 0, "\n".join(x for x in lines if not x.startswith("INFO"))
    assert not [x for x in lines if x.startswith("ERROR")]
    # kinds it has no schema for are checked against their CRDs below
    for w in (x for x in lines if x.startswith("WARN")):
        assert re.search(r"kind (StorageArray|VolumeSnapshotClass|SnapshotMetadataService) with api version", w), w
    assert sum("passed for resource" in x for x in lines) >= 25


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_custom_resources_validate_against_their_crds(render: Callable[..., str], all_crds: dict[Any, Doc],
                                                     variant: str) -> None:
    docs = load_docs(render(*VARIANTS[variant]))
    checked = 0
    for d in docs:
        group = d["apiVersion"].split("/")[0]
        if (group, d["kind"]) in all_crds:
            assert crdschema.validate(all_crds[(group, d["kind"])], d) == [], d["metadata"]["name"]
            checked += 1
    expected = {"nothing-optional": 0, "snapshot-metadata": len(by_kind(docs, "StorageArray")) + 2}
    assert checked == expected.get(variant, len(by_kind(docs, "StorageArray")) + 1)


def test_csidriver(default_docs: list[Doc]) -> None:
    spec = one(default_docs, "CSIDriver", GROUP)["spec"]
    assert spec == {"attachRequired": True, "podInfoOnMount": True, "volumeLifecycleModes": ["Persistent"],
                    "fsGroupPolicy": "File", "storageCapacity": True}


def args_of(c: Doc) -> list[str]:
    return list(c.get("args", []))


def test_controller_runs_two_replicas_with_leader_election(default_docs: list[Doc]) -> None:
    dep = one(default_docs, "Deployment", "csi-virtvol-controller")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    cs = containers(pod)
    assert set(cs) == {"csi-virtvol", "csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer",
                       "liveness-probe"}
    for name in ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"):
        a = args_of(cs[name])
        assert "--leader-election=true" in a and "--csi-address=/csi/csi.sock" in a, name
        assert "--leader-election-namespace=$(NAMESPACE)" in a, name
    prov = args_of(cs["csi-provisioner"])
    for flag in ("--extra-create-metadata", "--enable-capacity", "--capacity-ownerref-level=2",
                 "--feature-gates=Topology=true"):
        assert flag in prov
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in cs["csi-provisioner"]["env"]}
    assert env == {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    assert "--extra-create-metadata" in args_of(cs["csi-snapshotter"])
    drv = args_of(cs["csi-virtvol"])
    assert drv[0] == "serve"
    assert {"--endpoint=unix:///csi/csi.sock", "--mode=controller", "--store=crd",
            "--config=/etc/csi-virtvol/controller.yaml", "--node-id=$(NODE_NAME)"} <= set(drv)
    cfg = controller_config(default_docs)
    assert cfg["leaderElection"] == {"enabled": True, "leaseName": "csi-virtvol-controller", "namespace": NAMESPACE}
    # the driver's Lease must not be one of the sidecars' (provisioner: the driver name with dashes)
    assert cfg["leaderElection"]["leaseName"] != GROUP.replace(".", "-")
    probe = cs["csi-virtvol"]["livenessProbe"]["httpGet"]
    assert f"--http-endpoint=:{cs['csi-virtvol']['ports'][0]['containerPort']}" in args_of(cs["liveness-probe"])
    assert probe["port"] == "healthz"
    assert pod["serviceAccountName"] == "csi-virtvol-controller"


def test_node_daemonset(default_docs: list[Doc]) -> None:
    ds = one(default_docs, "DaemonSet", "csi-virtvol-node")
    pod = ds["spec"]["template"]["spec"]
    cs = containers(pod)
    assert set(cs) == {"csi-virtvol", "node-driver-registrar", "liveness-probe"}
    drv = cs["csi-virtvol"]
    assert drv["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in drv["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert {"/dev", "/sys", "/csi"} <= set(mounts)
    assert "--mode=node" in args_of(drv)
    vols = {v["name"]: v for v in pod["volumes"]}
    plugin = "/var/lib/kubelet/plugins/virtvol.csi.example.org"
    assert vols["plugin-dir"]["hostPath"]["path"] == plugin
    assert vols["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"
    assert f"--kubelet-registration-path={plugin}/csi.sock" in args_of(cs["node-driver-registrar"])
    ports = [p["containerPort"] for c in cs.values() for p in c.get("ports", [])]
    assert len(ports) == len(set(ports)), "hostNetwork: every port must be distinct"
    assert pod["serviceAccountName"] == "csi-virtvol-node"


SIDECARS = {"csi-provisioner": 6, "csi-attacher": 4, "csi-snapshotter": 8, "csi-resizer": 2,
            "livenessprobe": 2, "csi-node-driver-registrar": 2}


def test_sidecar_images_are_pinned_releases(default_docs: list[Doc]) -> None:
    images = {c["image"] for d in default_docs if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    sidecars = {i for i in images if i.startswith("registry.k8s.io/")}
    seen = {}
    for i in sidecars:
        m = re.fullmatch(r"registry\.k8s\.io/sig-storage/([a-z-]+):v(\d+)\.(\d+)\.(\d+)", i)
        assert m, f"{i} is not a sig-storage release tag"
        seen[m.group(1)] = int(m.group(2))
    assert set(seen) == set(SIDECARS)
    for name, major in SIDECARS.items():
        assert seen[name] >= major, f"{name} v{seen[name]} is older than the late-2026 major v{major}"


def controller_config(docs: list[Doc]) -> Doc:
    cm = one(docs, "ConfigMap", "csi-virtvol-config")
    return yaml.safe_load(cm["data"]["controller.yaml"])  # type: ignore[no-any-return]


def test_driver_loads_the_rendered_config(default_docs: list[Doc], tmp_path: Path) -> None:
    from csi_virtvol.config import Mode, load_config

    cm = one(default_docs, "ConfigMap", "csi-virtvol-config")
    for role in ("controller", "node"):
        f = tmp_path / f"{role}.yaml"
        f.write_text(cm["data"][f"{role}.yaml"])
        cfg = load_config(endpoint="unix:///csi/csi.sock", data_dir=str(tmp_path / role), node_id="node-1",
                          mode=role, config_file=str(f), store="crd")
        assert cfg.mode is Mode(role) and cfg.store == "crd" and cfg.kube_namespace == NAMESPACE
        if role == "controller":
            assert cfg.copy_image == "csi-virtvol:0.1.0"
            crs = {a["metadata"]["name"]: a["spec"] for a in by_kind(default_docs, "StorageArray")}
            assert {a.id: (a.kind, dict(a.params), dict(a.labels)) for a in cfg.arrays} == {
                n: (s["kind"], s.get("params", {}), s.get("labels", {})) for n, s in crs.items()}
        else:
            assert cfg.arrays == ()


def test_copy_job_settings(default_docs: list[Doc]) -> None:
    job = controller_config(default_docs)["copyJob"]
    assert job["serviceAccountName"] == "csi-virtvol-copy"
    assert job["backoffLimit"] >= 1 and job["ttlSecondsAfterFinished"] > 0
    assert job["resources"]["limits"]["memory"]
    sa = one(default_docs, "ServiceAccount", "csi-virtvol-copy")
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("variant", ["default", "everything-set"])
def test_storageclass_parameters_are_ones_the_driver_accepts(render: Callable[..., str], variant: str) -> None:
    from csi_virtvol.services.params import placement

    docs = load_docs(render(*VARIANTS[variant]))
    sc = one(docs, "StorageClass")
    assert sc["provisioner"] == GROUP and sc["allowVolumeExpansion"] is True
    assert sc["volumeBindingMode"] == "Immediate"
    assert sc["parameters"]["csi.storage.k8s.io/fstype"] in ("ext4", "xfs")
    p = placement(sc["parameters"])
    arrays = {a["metadata"]["name"] for a in by_kind(docs, "StorageArray")}
    if variant == "default":
        assert set(p.arrays) == arrays and p.layout == "concat"
    else:
        assert p.max_extent == 4 << 30 and p.selector == {"tier": "fast"}
    vsc = one(docs, "VolumeSnapshotClass")
    assert vsc["driver"] == GROUP


# ---- RBAC -----------------------------------------------------------------

def rules_for(docs: list[Doc], sa: str) -> list[Doc]:
    out = []
    for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"]):
            role = one(docs, b["roleRef"]["kind"], b["roleRef"]["name"])
            if b["kind"] == "RoleBinding":
                assert role["kind"] == "Role" and role["metadata"]["namespace"] == b["metadata"]["namespace"]
            out += role["rules"]
    return out


def allowed(rules: list[Doc], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_rbac_has_no_wildcards_and_no_secrets(default_docs: list[Doc]) -> None:
    for role in by_kind(default_docs, "ClusterRole") + by_kind(default_docs, "Role"):
        for r in role["rules"]:
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
            assert "secrets" not in r["resources"]


def test_rbac_bindings_point_at_existing_roles_and_accounts(default_docs: list[Doc]) -> None:
    accounts = {a["metadata"]["name"] for a in by_kind(default_docs, "ServiceAccount")}
    for b in by_kind(default_docs, "ClusterRoleBinding") + by_kind(default_docs, "RoleBinding"):
        one(default_docs, b["roleRef"]["kind"], b["roleRef"]["name"])
        for s in b["subjects"]:
            assert s["name"] in accounts and s["namespace"] == NAMESPACE


def test_controller_rbac_covers_what_the_sidecars_and_driver_use(default_docs: list[Doc],
                                                                  crds: dict[str, Doc]) -> None:
    r = rules_for(default_docs, "csi-virtvol-controller")
    needs = [("", "persistentvolumes", "create"), ("", "persistentvolumeclaims", "update"),
             ("storage.k8s.io", "csistoragecapacities", "create"), ("apps", "replicasets", "get"),
             ("storage.k8s.io", "volumeattachments", "patch"), ("storage.k8s.io", "volumeattachments/status", "patch"),
             ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update"),
             ("", "persistentvolumeclaims/status", "patch"), ("coordination.k8s.io", "leases", "create"),
             ("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("", "events", "create")]
    for crd in crds.values():
        plural = crd["spec"]["names"]["plural"]
        needs += [(GROUP, plural, v) for v in ("get", "list", "watch", "create", "update", "delete")]
        needs += [(GROUP, f"{plural}/status", "update")]
    missing = [n for n in needs if not allowed(r, *n)]
    assert missing == []


def test_node_rbac_is_read_mostly(default_docs: list[Doc]) -> None:
    r = rules_for(default_docs, "csi-virtvol-node")
    writes = {(g, res) for rule in r for g in rule["apiGroups"] for res in rule["resources"]
              if set(rule["verbs"]) & {"create", "update", "patch", "delete"}}
    # its own registration, and the answer to a pair's freeze request (fence protocol)
    assert writes <= {(GROUP, "virtvolnodes"), (GROUP, "virtvolnodes/status"), (GROUP, "volumepairs"),
                      (GROUP, "volumepairs/status")}
    assert allowed(r, GROUP, "virtualvolumes", "get") and not allowed(r, GROUP, "virtualvolumes", "delete")
    assert not allowed(r, "", "persistentvolumes", "get")


def test_copy_pods_get_no_api_access(default_docs: list[Doc]) -> None:
    assert rules_for(default_docs, "csi-virtvol-copy") == []


# ---- Dockerfile -----------------------------------------------------------

def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    for pkg in ("e2fsprogs", "xfsprogs", "util-linux", "fuse3", "nbdkit", "nbdfuse", "nbd-client", "qemu-utils"):
        assert re.search(rf"\s{re.escape(pkg)}\s", text), pkg
    assert 'ENTRYPOINT ["csi-virtvol"]' in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for s in sources:
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which is not in the repository"


def test_volume_snapshot_class_only_where_the_snapshot_api_exists(
        helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Issue 12: with the default values an install on a cluster without the snapshot CRDs
    failed on the VolumeSnapshotClass.  helm sees the cluster's APIs as .Capabilities
    (`helm template` takes them from --api-versions)."""
    def kinds(*opts: str) -> list[str]:
        out = helm("template", "csi-virtvol", str(CHART), "--namespace", NAMESPACE, *opts).stdout
        return [d["kind"] for d in load_docs(out)]
    bare = kinds()
    assert "VolumeSnapshotClass" not in bare and "StorageClass" in bare
    assert kinds("--api-versions", "snapshot.storage.k8s.io/v1/VolumeSnapshotClass").count("VolumeSnapshotClass") == 1
    assert "VolumeSnapshotClass" not in kinds("--api-versions", "snapshot.storage.k8s.io/v1/VolumeSnapshotClass",
                                              "--set", "volumeSnapshotClass.create=false")


def test_controller_rbac_covers_copy_events(default_docs: list[Doc]) -> None:
    """What kube/events.py and kube/sink.py call: Events (create, and patch to count a
    series) and a read of the PVC or VolumeSnapshot for its uid when the CO's generated
    names do not carry it."""
    r = rules_for(default_docs, "csi-virtvol-controller")
    needs = [("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
             ("", "persistentvolumeclaims", "get"), ("snapshot.storage.k8s.io", "volumesnapshots", "get")]
    assert [n for n in needs if not allowed(r, *n)] == []


# ---- VolumeGroupSnapshot ------------------------------------------------------

GS = "groupsnapshot.storage.k8s.io"
GATE = "--feature-gates=CSIVolumeGroupSnapshot=true"


@pytest.mark.parametrize("opts,api", [
    ([], ""),  # helm template sees no cluster: auto makes nothing
    (["--api-versions", f"{GS}/v1beta1"], f"{GS}/v1beta1"),
    (["--api-versions", f"{GS}/v1beta1", "--api-versions", f"{GS}/v1beta2"], f"{GS}/v1beta2"),
    (["--api-versions", f"{GS}/v1beta2", "--api-versions", f"{GS}/v1"], f"{GS}/v1"),
    (["--set", "volumeGroupSnapshotClass.create=true"], f"{GS}/v1"),
    (["--set", "volumeGroupSnapshotClass.create=true", "--set", f"volumeGroupSnapshotClass.apiVersion={GS}/v1beta2"],
     f"{GS}/v1beta2"),
    (["--set", "volumeGroupSnapshotClass.create=false", "--api-versions", f"{GS}/v1"], ""),
], ids=["template", "v1beta1", "v1beta2", "v1", "forced", "forced-version", "off"])
def test_volume_group_snapshot_class_follows_the_served_api(render: Callable[..., str], all_crds: dict[Any, Doc],
                                                           opts: list[str], api: str) -> None:
    docs = load_docs(render(*opts))
    classes = by_kind(docs, "VolumeGroupSnapshotClass")
    deploy = one(docs, "Deployment")
    args = containers(deploy["spec"]["template"]["spec"])["csi-snapshotter"]["args"]
    if not api:
        assert classes == [] and GATE not in args
        return
    assert len(classes) == 1 and GATE in args, "the class and the sidecar's feature gate go together"
    vgsc = classes[0]
    assert vgsc["apiVersion"] == api and vgsc["driver"] == GROUP and vgsc["deletionPolicy"] == "Delete"
    assert crdschema.validate(all_crds[(GS, "VolumeGroupSnapshotClass")], vgsc) == []


def test_volume_group_snapshot_class_options(render: Callable[..., str], helm: Callable[..., Any]) -> None:
    docs = load_docs(render("--set", "volumeGroupSnapshotClass.create=true", "--set",
                            "volumeGroupSnapshotClass.isDefault=true", "--set",
                            "volumeGroupSnapshotClass.parameters.arrays=pool-b", "--set",
                            "volumeGroupSnapshotClass.deletionPolicy=Retain"))
    vgsc = one(docs, "VolumeGroupSnapshotClass")
    assert vgsc["metadata"]["annotations"] == {"groupsnapshot.storage.kubernetes.io/is-default-class": "true"}
    assert vgsc["parameters"] == {"arrays": "pool-b"} and vgsc["deletionPolicy"] == "Retain"
    bad = helm("template", "x", str(CHART), "--set", "volumeGroupSnapshotClass.create=maybe", check=False)
    assert bad.returncode != 0 and "volumeGroupSnapshotClass" in bad.stderr


def test_snapshotter_rbac_covers_group_snapshot_objects(default_docs: list[Doc], render: Callable[..., str]) -> None:
    """As external-snapshotter's deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml grants them,
    when the sidecar's CSIVolumeGroupSnapshot gate is on; not at all when it is off."""
    needs = [(GS, "volumegroupsnapshotclasses", v) for v in ("get", "list", "watch")]
    needs += [(GS, "volumegroupsnapshotcontents", v) for v in ("get", "list", "watch", "update", "patch")]
    needs += [(GS, "volumegroupsnapshotcontents/status", v) for v in ("update", "patch")]
    on = rules_for(load_docs(render("--api-versions", f"{GS}/v1")), "csi-virtvol-controller")
    assert [n for n in needs if not allowed(on, *n)] == []
    off = rules_for(default_docs, "csi-virtvol-controller")
    assert [n for n in needs if allowed(off, *n)] == []
    r = on
    # the driver's own record of each group (the CRD state store)
    assert all(allowed(r, GROUP, "virtvolgroupsnapshots", v) for v in ("get", "list", "watch", "create", "update",
                                                                       "delete"))
