"""The CRDs: structural, printer columns on real fields, the model's fields
all have a place, and every example validates."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import crdschema
from k8s_helpers import ROOT, Doc

GROUP = "virtvol.csi.example.org"
EXAMPLES = ROOT / "examples"
VALIDATOR = str(Path(sys.executable).parent / "kubernetes-validate")

COLUMNS = {
    "StorageArray": ["Kind", "Vendor", "Model", "Abilities", "Free", "Age"],
    "VirtualVolume": ["Name", "Size", "Kind", "State", "Extents", "Age"],
    "VolumePair": ["Source", "Targets", "Methods", "State", "Progress", "Age"],
}
SHORT = {"StorageArray": "sarray", "VirtualVolume": "vv", "VolumePair": "vp"}


def test_the_three_kinds_exist(crds: dict[str, Doc]) -> None:
    assert set(COLUMNS) <= set(crds)


@pytest.mark.parametrize("kind", sorted(COLUMNS))
def test_names_columns_and_subresource(crds: dict[str, Doc], kind: str) -> None:
    crd = crds[kind]
    spec = crd["spec"]
    assert spec["group"] == GROUP and spec["scope"] == "Cluster"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{GROUP}"
    assert SHORT[kind] in spec["names"]["shortNames"]
    (v,) = spec["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"] == {"status": {}}
    assert [c["name"] for c in v["additionalPrinterColumns"]] == COLUMNS[kind]


def test_every_crd_is_structural_with_real_columns(crds: dict[str, Doc]) -> None:
    for kind, crd in crds.items():
        assert crdschema.structural_problems(crd) == [], kind
        assert crdschema.column_problems(crd) == [], kind
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"
        v = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        # real schemas, not a bag of unknown fields
        assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(v), kind


def test_the_checkers_find_problems() -> None:
    bad = {"metadata": {"name": "x.y"}, "spec": {"group": "y", "names": {"kind": "X"}, "scope": "Cluster",
           "versions": [{"name": "v1", "served": True, "schema": {"openAPIV3Schema": {
               "type": "object", "properties": {"spec": {"type": "object", "properties": {
                   "a": {"description": "no type"},
                   "m": {"type": "object", "properties": {"k": {"type": "string"}},
                         "additionalProperties": {"type": "string"}}}}}}},
               "additionalPrinterColumns": [{"name": "A", "type": "integer", "jsonPath": ".spec.m.k"},
                                            {"name": "B", "type": "string", "jsonPath": ".spec.nope"}]}]}}
    s = crdschema.structural_problems(bad)
    assert any(".spec.a: no type" in e for e in s) and any("exclusive" in e for e in s)
    c = crdschema.column_problems(bad)
    assert len(c) == 2


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def schema_fields(schema: Any, out: set[str]) -> set[str]:
    if isinstance(schema, dict):
        for k, v in schema.get("properties", {}).items():
            out.add(k)
            schema_fields(v, out)
        schema_fields(schema.get("items"), out)
        if isinstance(schema.get("additionalProperties"), dict):
            schema_fields(schema["additionalProperties"], out)
    return out


# model dataclass -> (CRD kind, fields kept elsewhere, renamed fields)
MODEL = {
    "csi_virtvol.model.array:ArraySpec": ("StorageArray", {"id"}, {}),
    "csi_virtvol.model.array:ArrayInfo": ("StorageArray", {"id"}, {"probed": "probedAbilities"}),
    "csi_virtvol.model.array:ArrayIdentity": ("StorageArray", set(), {}),
    "csi_virtvol.model.array:Lun": ("PhysicalVolume", set(), {}),
    "csi_virtvol.model.volume:VirtualVolume": ("VirtualVolume", {"id"}, {}),
    "csi_virtvol.model.volume:Extent": ("VirtualVolume", set(), {}),
    "csi_virtvol.model.volume:Attachment": ("VirtualVolume", set(), {}),
    "csi_virtvol.model.pair:Pair": ("VolumePair", {"id"}, {}),
    "csi_virtvol.model.pair:PairTarget": ("VolumePair", set(), {}),
    "csi_virtvol.model.pair:ExtentCopy": ("VolumePair", set(), {}),
    "csi_virtvol.model.node:NodeInfo": ("VirtvolNode", set(), {}),
}


@pytest.mark.parametrize("ref", sorted(MODEL))
def test_every_model_field_has_a_place_in_its_crd(crds: dict[str, Doc], ref: str) -> None:
    import importlib

    mod, _, cls = ref.partition(":")
    kind, elsewhere, renamed = MODEL[ref]
    if kind not in crds:
        pytest.fail(f"no CRD for {kind}")
    fields = schema_fields(crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"], set())
    model = getattr(importlib.import_module(mod), cls)
    missing = [f.name for f in dataclasses.fields(model)
               if f.name not in elsewhere and renamed.get(f.name, camel(f.name)) not in fields]
    assert missing == [], f"{cls} fields with no place in the {kind} CRD"


def schema_at(schema: Any, path: str) -> Any:
    for part in path.split("."):
        schema = schema["items"] if part == "[]" else schema["properties"][part]
    return schema


# model enum -> (CRD kind, the schema paths whose enum must accept every value)
ENUMS = {
    "csi_virtvol.model.pair:Fence": ("VolumePair", ["status.fence"]),
    "csi_virtvol.model.pair:PairState": ("VolumePair", ["status.state", "status.targets.[].state"]),
    "csi_virtvol.model.pair:ExtentCopyState": ("VolumePair", ["status.targets.[].extents.[].state"]),
    "csi_virtvol.model.pair:CopyMethod": ("VolumePair", ["status.targets.[].extents.[].method"]),
    "csi_virtvol.model.volume:VolumeState": ("VirtualVolume", ["status.state"]),
    "csi_virtvol.model.volume:CopyRole": ("VirtualVolume", ["status.role"]),
    "csi_virtvol.model.volume:VolumeKind": ("VirtualVolume", ["spec.kind"]),
    "csi_virtvol.model.array:LunState": ("PhysicalVolume", ["status.state"]),
    "csi_virtvol.model.array:LunOrigin": ("PhysicalVolume", ["spec.origin"]),
    "csi_virtvol.model.group:GroupState": ("VirtvolGroupSnapshot", ["status.state"]),
}


@pytest.mark.parametrize("ref", sorted(ENUMS))
def test_every_model_enum_value_is_accepted_by_its_crd(crds: dict[str, Doc], ref: str) -> None:
    """A value the driver writes that the CRD's enum lacks is a 422 from a real API server
    (the live cut's fences were missing: every live cut on a cluster would fail to record)."""
    import importlib

    mod, _, cls = ref.partition(":")
    kind, paths = ENUMS[ref]
    values = {m.value for m in getattr(importlib.import_module(mod), cls)}
    root = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path in paths:
        assert values <= set(schema_at(root, path)["enum"]), (path, values - set(schema_at(root, path)["enum"]))


# ---- the validator itself ------------------------------------------------

def sample_array() -> Doc:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "StorageArray", "metadata": {"name": "a"},
            "spec": {"kind": "file", "params": {"path": "/p"}},
            "status": {"identity": {"vendor": "Linux", "model": "xfs", "version": "6.1"},
                       "abilities": ["internal-copy"], "capacityFree": 5,
                       "luns": [{"id": "l1", "size": 1, "state": "in-use", "volume": "v"}],
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastTransitionTime": "2026-11-25T17:00:00Z"}]}}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["spec"].update(kindd="file"), "spec.kindd: unknown field"),
    (lambda d: d["spec"].pop("kind"), "spec.kind: required"),
    (lambda d: d["spec"]["params"].update(size=5), "spec.params.size: 5 is not of type string"),
    (lambda d: d["status"]["luns"][0].update(state="busy"), "status.luns[0].state: 'busy' is not one of"),
    (lambda d: d["status"].update(capacityFree=-1), "status.capacityFree: -1 is below 0"),
    (lambda d: d["status"].update(capacityFree=True), "is not of type integer"),
    (lambda d: d["status"]["conditions"].append(dict(d["status"]["conditions"][0])), "duplicate map keys"),
    (lambda d: d["metadata"].update(name="Pool_A"), "metadata.name"),
    (lambda d: d["metadata"].update(namespace="default"), "cluster-scoped"),
    (lambda d: d.update(apiVersion=f"{GROUP}/v1"), "not served"),
])
def test_validator_rejects(crds: dict[str, Doc], mutate: Any, message: str) -> None:
    d = sample_array()
    assert crdschema.validate(crds["StorageArray"], d) == []
    mutate(d)
    errs = crdschema.validate(crds["StorageArray"], d)
    assert any(message in e for e in errs), errs


def test_sample_bodies_of_each_kind_validate(crds: dict[str, Doc]) -> None:
    api = f"{GROUP}/v1alpha1"
    vv = {"apiVersion": api, "kind": "VirtualVolume", "metadata": {"name": "vol-1"},
          "spec": {"name": "pvc-1", "size": 3 << 30, "kind": "volume", "address": "virtvol://vol-1",
                   "extents": [{"array": "a", "lun": "l1", "offset": 0, "length": 1 << 30},
                               {"array": "b", "lun": "l2", "offset": 0, "length": 2 << 30}],
                   "parameters": {"layout": "concat"}, "contentSource": "snapshot:snap-1", "createdAt": 1.5e9,
                   "topology": {"topology.virtvol.csi.example.org/node": "n1"}},
          "status": {"state": "available", "role": "source", "attachments": [{"node": "n1", "readonly": False}],
                     "condition": {"abnormal": False, "message": ""}}}
    vp = {"apiVersion": api, "kind": "VolumePair", "metadata": {"name": "pair-1"},
          "spec": {"source": "vol-1", "targets": ["snap-1"]},
          "status": {"state": "copying", "progress": "42%", "methods": "internal,host",
                     "targets": [{"volume": "snap-1", "state": "copying", "bytesTotal": 10, "bytesDone": 4,
                                  "startedAt": 1.7e9, "endedAt": 0, "reason": "",
                                  "extents": [{"index": 0, "method": "internal", "state": "done",
                                               "bytesTotal": 4, "bytesDone": 4, "message": ""},
                                              {"index": 1, "method": "host", "state": "copying",
                                               "bytesTotal": 6, "bytesDone": 0}]}]}}
    for body in (vv, vp, sample_array()):
        assert crdschema.validate(crds[body["kind"]], body) == [], body["kind"]
    vp["status"]["methods"] = "internal,tape"
    assert crdschema.validate(crds["VolumePair"], vp) != []


# ---- examples/ -----------------------------------------------------------

def example_docs() -> list[tuple[str, Doc]]:
    return [(p.name, d) for p in sorted(EXAMPLES.glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


def test_examples_cover_the_brief() -> None:
    docs = example_docs()
    kinds = [d["kind"] for _, d in docs]
    assert {"PersistentVolumeClaim", "VolumeSnapshot", "StorageArray"} <= set(kinds)
    assert sorted(d["spec"]["kind"] for _, d in docs if d["kind"] == "StorageArray") == ["file", "lio", "lvm", "qsd"]
    pvcs = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    snaps = {d["metadata"]["name"] for _, d in docs if d["kind"] == "VolumeSnapshot"}
    sources = {(d["spec"]["dataSource"]["kind"], d["spec"]["dataSource"]["name"])
               for d in pvcs.values() if "dataSource" in d["spec"]}
    assert any(k == "VolumeSnapshot" and n in snaps for k, n in sources), "restore PVC"
    assert any(k == "PersistentVolumeClaim" and n in pvcs for k, n in sources), "clone PVC"


def test_examples_name_the_charts_classes(default_docs: list[Doc]) -> None:
    sc = next(d for d in default_docs if d["kind"] == "StorageClass")["metadata"]["name"]
    vsc = next(d for d in default_docs if d["kind"] == "VolumeSnapshotClass")["metadata"]["name"]
    for name, d in example_docs():
        if d["kind"] == "PersistentVolumeClaim":
            assert d["spec"]["storageClassName"] == sc, name
        if d["kind"] == "VolumeSnapshot":
            assert d["spec"]["volumeSnapshotClassName"] == vsc, name


def test_example_custom_resources_validate(all_crds: dict[Any, Doc]) -> None:
    checked = 0
    for name, d in example_docs():
        key = (d["apiVersion"].split("/")[0], d["kind"])
        if key in all_crds:
            assert crdschema.validate(all_crds[key], d) == [], name
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_example_builtin_objects_validate(version: str) -> None:
    files = [str(p) for p in sorted(EXAMPLES.glob("*.yaml"))]
    p = subprocess.run([VALIDATOR, "--strict", "-k", version, *files], capture_output=True, text=True, timeout=300)
    out = (p.stdout + p.stderr).splitlines()
    assert p.returncode == 0, "\n".join(out)
    for w in (x for x in out if x.startswith("WARN")):
        assert re.search(r"kind (StorageArray|VolumeSnapshot) with", w), w
    assert sum("passed for resource" in x for x in out) >= 4
