"""What the pods get from their host for the array kinds (iSCSI for lio, nbd/dm/loop
for qsd and lvm, LVM's own state), and the optional SnapshotMetadata sidecar."""
from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from k8s_helpers import CHART, NAMESPACE, Doc, by_kind, containers, load_docs, one
from test_k8s_chart import CA_B64, GROUP, VARIANTS, allowed, rules_for

ISCSI_PATHS = {"/etc/iscsi", "/var/lib/iscsi", "/run/lock"}
LIO = '{"name":"san-a","kind":"lio","params":{"iqn":"iqn.2003-01.org.example:a","pool":"/srv/a"}}'
LVM = '{"name":"thin","kind":"lvm","params":{"vg":"vg0","pool":"thinpool"}}'
SM = ["--set", "snapshotMetadata.enabled=true", "--set", f"snapshotMetadata.caCert={CA_B64}"]


def pod_of(docs: list[Doc], kind: str, name: str) -> Doc:
    return one(docs, kind, name)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def host_mounts(pod: Doc, container: str = "csi-virtvol") -> dict[str, dict[str, Any]]:
    """mountPath -> {host: hostPath path, readOnly, propagation} for hostPath mounts."""
    vols = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in containers(pod)[container]["volumeMounts"]:
        v = vols[m["name"]]
        if "hostPath" in v:
            out[m["mountPath"]] = {"host": v["hostPath"]["path"], "readOnly": m.get("readOnly", False),
                                   "propagation": m.get("mountPropagation")}
    return out


@pytest.fixture(scope="module")
def fails(helm: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., str]:
    def run(*opts: str) -> str:
        p = helm("template", "x", str(CHART), *opts, check=False)
        assert p.returncode != 0, "expected helm template to refuse " + " ".join(opts)
        return p.stderr
    return run


# ---- node -------------------------------------------------------------------

def test_node_default_reaches_the_hosts_iscsid_and_devices(default_docs: list[Doc]) -> None:
    pod = pod_of(default_docs, "DaemonSet", "csi-virtvol-node")
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert containers(pod)["csi-virtvol"]["securityContext"]["privileged"] is True
    m = host_mounts(pod)
    for path in ISCSI_PATHS | {"/dev", "/sys", "/lib/modules", "/run/udev"}:
        assert m[path]["host"] == path, path  # the host's own, at the same place
    assert m["/lib/modules"]["readOnly"] is True
    assert not m["/dev"]["readOnly"] and not m["/sys"]["readOnly"] and not m["/etc/iscsi"]["readOnly"]
    assert m["/var/lib/kubelet"]["propagation"] == "Bidirectional"


def test_node_without_iscsi_has_none_of_its_mounts(render: Callable[..., str]) -> None:
    pod = pod_of(load_docs(render("--set", "node.iscsi.enabled=false")), "DaemonSet", "csi-virtvol-node")
    m = host_mounts(pod)
    assert not ISCSI_PATHS & set(m)
    assert {"/dev", "/sys", "/lib/modules"} <= set(m)  # nbd, dm and loop still
    assert pod["hostNetwork"] is True  # node.hostNetwork is its own switch (kernel NBD)
    pod = pod_of(load_docs(render(*VARIANTS["single-sqlite"])), "DaemonSet", "csi-virtvol-node")
    assert pod["hostNetwork"] is False and "dnsPolicy" not in pod
    assert not ISCSI_PATHS & set(host_mounts(pod))


def test_node_iscsi_needs_the_host_network(fails: Callable[..., str]) -> None:
    assert "node.iscsi.enabled needs node.hostNetwork" in fails("--set", "node.hostNetwork=false")


# ---- controller ---------------------------------------------------------------

def test_controller_default_has_devices_but_no_host_network(default_docs: list[Doc]) -> None:
    pod = pod_of(default_docs, "Deployment", "csi-virtvol-controller")
    assert "hostNetwork" not in pod and "hostIPC" not in pod
    m = host_mounts(pod)
    assert {"/dev", "/sys", "/lib/modules", "/run/lock"} <= set(m) and m["/lib/modules"]["readOnly"]
    assert not {"/etc/iscsi", "/var/lib/iscsi", "/run/lvm", "/etc/lvm"} & set(m)
    assert "preferredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]


def test_controller_with_lio_and_lvm_arrays(render: Callable[..., str]) -> None:
    docs = load_docs(render(*VARIANTS["everything-set"]))
    pod = pod_of(docs, "Deployment", "csi-virtvol-controller")
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["hostIPC"] is True
    m = host_mounts(pod)
    for path in ("/etc/iscsi", "/var/lib/iscsi", "/run/lock", "/run/lvm", "/etc/lvm", "/sys", "/dev"):
        assert m[path]["host"] == path, path
    # two replicas on one host would fight over the host's ports
    anti = pod["affinity"]["podAntiAffinity"]
    assert [t["topologyKey"] for t in anti["requiredDuringSchedulingIgnoredDuringExecution"]] == [
        "kubernetes.io/hostname"]
    node_ports = {p["containerPort"] for c in pod_of(docs, "DaemonSet", "csi-virtvol-node")["containers"]
                  for p in c.get("ports", [])}
    ctl_ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert not node_ports & ctl_ports, "both pods on the host network of one node"


@pytest.mark.parametrize(("opts", "message"), [
    (["--set-json", f"arrays=[{LIO}]"], "set controller.iscsi.enabled: true"),
    (["--set-json", f"arrays=[{LVM}]"], "set controller.lvm.enabled: true"),
    (["--set", "controller.iscsi.enabled=true"], "controller.iscsi.enabled needs controller.hostNetwork"),
    (["--set", "controller.lvm.enabled=true", "--set", "controller.privileged=false"],
     "controller.lvm.enabled needs controller.privileged"),
])
def test_controller_refuses_arrays_it_could_not_reach(fails: Callable[..., str], opts: list[str],
                                                      message: str) -> None:
    assert message in fails(*opts)


def test_every_mount_has_its_volume_and_every_volume_is_used(render: Callable[..., str]) -> None:
    for variant in [*VARIANTS, "sm"]:
        docs = load_docs(render(*(SM if variant == "sm" else VARIANTS[variant])))
        for d in by_kind(docs, "Deployment") + by_kind(docs, "DaemonSet"):
            pod = d["spec"]["template"]["spec"]
            vols = {v["name"] for v in pod["volumes"]}
            used = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert used == vols, (variant, d["metadata"]["name"], used ^ vols)


# ---- SnapshotMetadata -------------------------------------------------------------

def test_snapshot_metadata_is_off_by_default(default_docs: list[Doc]) -> None:
    assert "csi-snapshot-metadata" not in containers(pod_of(default_docs, "Deployment", "csi-virtvol-controller"))
    assert by_kind(default_docs, "SnapshotMetadataService") == [] and by_kind(default_docs, "Service") == []
    assert not allowed(rules_for(default_docs, "csi-virtvol-controller"), "authentication.k8s.io", "tokenreviews",
                       "create")


def test_snapshot_metadata_needs_a_ca(fails: Callable[..., str]) -> None:
    assert "snapshotMetadata.caCert" in fails("--set", "snapshotMetadata.enabled=true")


def test_snapshot_metadata_sidecar_service_and_advertisement(render: Callable[..., str]) -> None:
    docs = load_docs(render(*SM))
    pod = pod_of(docs, "Deployment", "csi-virtvol-controller")
    cs = containers(pod)
    side = cs["csi-snapshot-metadata"]
    args = dict(a.split("=", 1) for a in side["args"])
    # the same CSI socket the driver serves (and the other sidecars use)
    assert "--endpoint=unix://" + args["--csi-address"] in cs["csi-virtvol"]["args"]
    assert {m["mountPath"]: m["name"] for m in side["volumeMounts"]}["/csi"] == "socket-dir"
    # TLS from the user's secret, mounted where the flags point
    tls = next(m for m in side["volumeMounts"] if m["name"] == "snapshot-metadata-tls")
    assert tls["readOnly"] is True
    assert args["--tls-cert"] == tls["mountPath"] + "/tls.crt" and args["--tls-key"] == tls["mountPath"] + "/tls.key"
    vol = next(v for v in pod["volumes"] if v["name"] == "snapshot-metadata-tls")
    assert vol["secret"]["secretName"] == "csi-virtvol-snapshot-metadata-tls"
    port = next(p for p in side["ports"] if p["name"] == "snap-metadata")
    assert int(args["--port"]) == port["containerPort"]
    # the Service reaches that port on the controller pods
    svc = one(docs, "Service", "csi-virtvol-snapshot-metadata")
    labels = one(docs, "Deployment", "csi-virtvol-controller")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (sport,) = svc["spec"]["ports"]
    assert sport["targetPort"] == "snap-metadata" and sport["port"] == 6443
    # advertised under the driver's name, at the Service's address, with the CA
    sms = one(docs, "SnapshotMetadataService")
    assert sms["apiVersion"] == "cbt.storage.k8s.io/v1beta1" and sms["metadata"]["name"] == GROUP
    assert "namespace" not in sms["metadata"]  # cluster-scoped
    assert sms["spec"]["address"] == f"csi-virtvol-snapshot-metadata.{NAMESPACE}:6443"
    assert base64.b64decode(sms["spec"]["caCert"], validate=True).startswith(b"-----BEGIN CERTIFICATE-----")
    assert sms["spec"]["audience"]
    # the CRD is the cluster admin's: the chart must not ship it
    assert not [c for c in by_kind(docs, "CustomResourceDefinition") if c["spec"]["group"] == "cbt.storage.k8s.io"]


def test_snapshot_metadata_values_reach_the_object(render: Callable[..., str]) -> None:
    docs = load_docs(render(*SM, "--set", "snapshotMetadata.address=cbt.example.org:443",
                            "--set", "snapshotMetadata.audience=backup-1",
                            "--set", "snapshotMetadata.apiVersion=cbt.storage.k8s.io/v1alpha1",
                            "--set", "snapshotMetadata.tlsSecretName=my-tls", "--set", "snapshotMetadata.port=50100"))
    sms = one(docs, "SnapshotMetadataService")
    assert sms["apiVersion"] == "cbt.storage.k8s.io/v1alpha1"
    assert sms["spec"]["address"] == "cbt.example.org:443" and sms["spec"]["audience"] == "backup-1"
    pod = pod_of(docs, "Deployment", "csi-virtvol-controller")
    assert "--port=50100" in containers(pod)["csi-snapshot-metadata"]["args"]
    assert {"name": "snapshot-metadata-tls", "secret": {"secretName": "my-tls"}} in pod["volumes"]


def test_snapshot_metadata_rbac_is_upstreams_needs(render: Callable[..., str]) -> None:
    docs = load_docs(render(*SM))
    r = rules_for(docs, "csi-virtvol-controller")
    for need in [("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
                 ("cbt.storage.k8s.io", "snapshotmetadataservices", "list"),
                 ("cbt.storage.k8s.io", "snapshotmetadataservices", "watch"),
                 ("authentication.k8s.io", "tokenreviews", "create"),
                 ("authorization.k8s.io", "subjectaccessreviews", "create"),
                 ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
                 ("snapshot.storage.k8s.io", "volumesnapshotcontents", "list")]:
        assert allowed(r, *need), need
    for role in by_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"] and "*" not in rule["verbs"]


def test_snapshot_metadata_sidecar_is_a_release_matching_the_crd_version(render: Callable[..., str]) -> None:
    docs = load_docs(render(*SM))
    image = containers(pod_of(docs, "Deployment", "csi-virtvol-controller"))["csi-snapshot-metadata"]["image"]
    m = re.fullmatch(r"registry\.k8s\.io/sig-storage/csi-snapshot-metadata:v(\d+)\.(\d+)\.(\d+)", image)
    assert m, image
    # v1.0.0 moved the CRD to v1beta1 and removed v1alpha1
    expected = "cbt.storage.k8s.io/v1beta1" if int(m.group(1)) >= 1 else "cbt.storage.k8s.io/v1alpha1"
    assert one(docs, "SnapshotMetadataService")["apiVersion"] == expected


@pytest.mark.parametrize("bad", [
    ["--set", "snapshotMetadata.apiVersion=cbt.storage.k8s.io/v2"],
    ["--set", "snapshotMetadata.address=no-port"],
    ["--set", "node.iscsi.enabeld=true"],
    ["--set", "controller.lvm=true"],
])
def test_values_schema_rejects_new_keys(helm: Callable[..., subprocess.CompletedProcess[str]],
                                        bad: list[str]) -> None:
    p = helm("lint", "--strict", str(CHART), *bad, check=False)
    assert p.returncode != 0
    assert "values don't meet the specifications of the schema" in p.stdout + p.stderr
