"""CrdStore details the shared contract does not see: what kubectl shows, names,
finalizers, and taking over a StorageArray the administrator created."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest

from csi_virtvol import errors
from csi_virtvol.kube.crdstore import (
    GROUP, KEY_ANNOTATION, PAIR_FINALIZER, VERSION, CrdStore, label_value, object_name, progress,
)
from csi_virtvol.model.ids import NodeId
from csi_virtvol.model.volume import CopyRole, VolumeState
from csi_virtvol.store.base import ARRAYS, LUNS, PAIRS, VOLUMES

from fakeapi import FakeApiServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))
from test_store_contract import array, lun, pair, volume  # noqa: E402  (the contract's realistic records)


@pytest.fixture
def store(client: Any) -> CrdStore:
    return CrdStore(client)


def test_what_kubectl_shows(fake_api: FakeApiServer, store: CrdStore) -> None:
    store.create(VOLUMES, volume("v1"))
    store.create(PAIRS, pair("p1", source="v1"))
    store.create(LUNS, lun("gold", "l1", volume="v1"))
    store.create(ARRAYS, array("gold"))
    vp = fake_api.find(GROUP, "volumepairs", "p1")
    assert vp is not None
    assert vp["spec"] == {"source": "v1", "targets": ["p1-t1", "p1-t2"]}
    st = vp["status"]
    assert (st["state"], st["methods"]) == ("failed", "internal,host,remote")
    assert st["progress"] == progress((1 << 30) + 12345, 4 << 30) == "25%"
    assert st["targets"][0]["bytesDone"] == (1 << 30) + 12345 and st["targets"][1]["reason"] == "link down"
    vv = fake_api.find(GROUP, "virtualvolumes", "v1")
    assert vv is not None
    assert [e["array"] for e in vv["spec"]["extents"]] == ["gold", "silver"]
    assert vv["status"]["state"] == "available" and vv["status"]["observedGeneration"] == 1
    pv = fake_api.find(GROUP, "physicalvolumes", object_name("gold:l1"))
    assert pv is not None and pv["status"] == {"state": "in-use", "volume": "v1", "observedGeneration": 1}
    sa = fake_api.find(GROUP, "storagearrays", "gold")
    assert sa is not None and sa["status"]["abilities"] == ["internal-copy", "dirty-tracking", "grow-lun"]
    assert fake_api.warnings == []  # nothing was pruned: every body matched its CRD


def test_names_and_labels_for_awkward_keys(fake_api: FakeApiServer, store: CrdStore) -> None:
    for key in ("Z", "arr-ä", "a" * 300, "x:y", "..", "-a-"):
        store.create(ARRAYS, array(key))
        name = object_name(key)
        obj = fake_api.find(GROUP, "storagearrays", name)
        assert obj is not None and obj["metadata"]["annotations"][KEY_ANNOTATION] == key
        assert store.get(ARRAYS, key) is not None
    assert object_name("gold") == "gold" and object_name("Z") != object_name("z")
    assert label_value("volume/pvc-a").startswith("h-") and label_value("v1") == "v1"


def test_pair_finalizer_protects_volumes(fake_api: FakeApiServer, client: Any, store: CrdStore) -> None:
    rev = store.create(VOLUMES, volume("v1", role=CopyRole.SOURCE))
    assert fake_api.find(GROUP, "virtualvolumes", "v1")["metadata"]["finalizers"] == [PAIR_FINALIZER]  # type: ignore[index]
    # someone deletes it with kubectl while the pair lives: it stays, and the store still has it
    k8s.CustomObjectsApi(client).delete_cluster_custom_object(GROUP, VERSION, "virtualvolumes", "v1")
    got = store.get(VOLUMES, "v1")
    assert got is not None and got.revision != rev
    # the pair ends: the role goes back to none, the finalizer goes, the deletion completes
    store.update(VOLUMES, dataclasses.replace(got.value, role=CopyRole.NONE), revision=got.revision)
    assert fake_api.find(GROUP, "virtualvolumes", "v1") is None
    assert store.get(VOLUMES, "v1") is None


def test_store_delete_removes_its_finalizer(fake_api: FakeApiServer, store: CrdStore) -> None:
    store.create(VOLUMES, volume("v1", role=CopyRole.COPY))
    rev = store.get(VOLUMES, "v1").revision  # type: ignore[union-attr]
    store.delete(VOLUMES, "v1", revision=rev)
    assert fake_api.find(GROUP, "virtualvolumes", "v1") is None
    plain = store.create(VOLUMES, volume("v2", role=CopyRole.NONE))
    assert "finalizers" not in fake_api.find(GROUP, "virtualvolumes", "v2")["metadata"]  # type: ignore[index]
    store.update(VOLUMES, volume("v2", role=CopyRole.NONE, state=VolumeState.DELETING), revision=plain)


def test_adopts_an_array_the_admin_created(fake_api: FakeApiServer, store: CrdStore) -> None:
    fake_api.put(GROUP, "storagearrays", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "StorageArray", "metadata": {"name": "gold"},
        "spec": {"kind": "filepool", "params": {"path": "/srv/gold"}, "abilityOverrides": {"remote-copy": False}}})
    assert store.get(ARRAYS, "gold") is None  # not probed yet
    [spec] = store.array_specs(node_id=NodeId("node-1"))
    assert spec.id == "gold" and spec.params == {"path": "/srv/gold"}
    assert spec.ability_overrides == {"remote-copy": False}
    rev = store.create(ARRAYS, array("gold"))
    got = store.get(ARRAYS, "gold")
    assert got is not None and got.revision == rev and got.value == array("gold")
    obj = fake_api.find(GROUP, "storagearrays", "gold")
    assert obj is not None and obj["spec"]["params"] == {"path": "/srv/gold"}  # the admin's words kept
    assert obj["spec"]["abilityOverrides"] == {"remote-copy": False}
    with pytest.raises(errors.Conflict):
        store.create(ARRAYS, array("gold"))


def test_extents_column_shows_every_extent(fake_api: FakeApiServer, store: CrdStore) -> None:
    """Issue 12: the Extents column showed only the first extent's array.  It reads
    status.extents, which the store keeps as ARRAY:SIZE of every extent, in order."""
    import yaml

    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "charts" / "csi-virtvol" / "crds"
                          / "virtualvolumes.virtvol.csi.example.org.yaml").read_text())
    [col] = [c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] == "Extents"]

    def column(obj: dict[str, Any]) -> Any:  # a plain .a.b JSONPath, as the column's
        out: Any = obj
        for part in col["jsonPath"].strip(".").split("."):
            out = (out or {}).get(part)
        return out

    rev = store.create(VOLUMES, volume("v1"))
    assert column(fake_api.find(GROUP, "virtualvolumes", "v1") or {}) == "gold:1Gi,silver:2Gi"
    grown = dataclasses.replace(volume("v1"), extents=volume("v1").extents + (
        dataclasses.replace(volume("v1").extents[0], lun="l9", length=(64 << 20) + 512),))
    store.update(VOLUMES, grown, revision=rev)
    assert column(fake_api.find(GROUP, "virtualvolumes", "v1") or {}) == "gold:1Gi,silver:2Gi,gold:67109376"


def test_idle_node_plugin_makes_no_requests(fake_api: FakeApiServer, client: Any, tmp_path: Path) -> None:
    """Issue 12 item 5: an idle node's FenceKeeper must not poll VolumePairs (it made about
    3.4 LISTs and 1.7 new watches a second).  With the store's watch-fed cache it makes
    none while nothing changes, and still answers a fence request at once."""
    import threading
    import time

    from csi_virtvol.model.pair import Fence
    from csi_virtvol.node.stager import Stager
    from csi_virtvol.services.node import FenceKeeper

    store = CrdStore(client)
    store.create(PAIRS, pair("p1", source="v1"))
    keeper = FenceKeeper(node_id="node-a", store=store, stager=Stager(str(tmp_path / "node")),
                         state_dir=str(tmp_path / "state"))
    stop = threading.Event()
    t = threading.Thread(target=keeper.run, args=(stop,), daemon=True)
    t.start()
    try:
        time.sleep(1.0)  # started: the cache has listed once and watches
        start = len(fake_api.requests)
        window = 3.0
        time.sleep(window)
        idle = [r for r in fake_api.requests[start:] if "volumepairs" in r[1]]
        assert len(idle) / window < 0.5, idle  # was ~5 requests a second
        # still awake: a fence request for this node is answered (the volume is not staged here)
        got = store.get(PAIRS, "p1")
        assert got is not None
        store.update(PAIRS, dataclasses.replace(got.value, fence=Fence.FREEZE_REQUESTED, fence_node="node-a"),
                     revision=got.revision)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cur = store.get(PAIRS, "p1")
            if cur is not None and cur.value.fence is Fence.REFUSED:
                break
            time.sleep(0.05)
        assert cur is not None and cur.value.fence is Fence.REFUSED, cur
        assert "not staged" in cur.value.fence_message
    finally:
        stop.set()
        t.join(timeout=10)
        store.close()


def test_transient_api_errors_on_writes_are_retried(fake_api: FakeApiServer, client: Any) -> None:
    """Issue 12's rule "a transient API error is retried, never a failure", for the store itself:
    one 500 on a VolumePair status write in a copy's last step failed the copy (found by
    tests/kube/test_copy_matrix.py, api-errors@verified).  5xx, 429, a refused connection and a
    write whose answer was lost are retried; the write lands once."""
    store = CrdStore(client, retry_delays=(0.05,) * 8)
    paths = {"create": ("POST", r"/volumepairs$"), "update": ("PUT", r"/volumepairs/p1$"),
             "status": ("PUT", r"/volumepairs/p1/status$"), "read": ("GET", r"/volumepairs/p1$"),
             "delete": ("DELETE", r"/volumepairs/p1$")}

    def faults(what: str) -> None:
        method, path = paths[what]
        fake_api.inject_fault(method, path, code=500)
        fake_api.inject_fault(method, path, drop=True)
        fake_api.inject_fault(method, path, code=429)
        fake_api.inject_fault(method, path, code=503)

    faults("create")
    fake_api.inject_fault("POST", r"/volumepairs$", lost=True)  # created, but the answer is lost
    faults("status")
    store.create(PAIRS, pair("p1", source="v1"))
    assert fake_api.faults_left() == 0
    got = store.get(PAIRS, "p1")
    assert got is not None and got.value == pair("p1", source="v1")
    assert fake_api.find(GROUP, "volumepairs", "p1")["status"]["state"] == "failed"  # type: ignore[index]

    changed = dataclasses.replace(got.value, source="v2")
    faults("read")
    faults("update")
    faults("status")
    fake_api.inject_fault("PUT", r"/volumepairs/p1/status$", lost=True)
    store.update(PAIRS, changed, revision=got.revision)
    assert fake_api.faults_left() == 0
    now = store.get(PAIRS, "p1")
    assert now is not None and now.value.source == "v2"
    assert fake_api.find(GROUP, "volumepairs", "p1")["spec"]["source"] == "v2"  # type: ignore[index]

    # an update whose answer is lost happened: sent again, it is a Conflict (it cannot tell the
    # write was its own), and the caller, reading again as after any Conflict, finds it made
    fake_api.inject_fault("PUT", r"/volumepairs/p1$", lost=True)
    with pytest.raises(errors.Conflict):
        store.update(PAIRS, dataclasses.replace(changed, source="v3"), revision=now.revision)
    again = store.get(PAIRS, "p1")
    assert again is not None and again.value.source == "v3"

    faults("delete")
    fake_api.inject_fault("DELETE", r"/volumepairs/p1$", lost=True)
    store.delete(PAIRS, "p1")
    assert fake_api.faults_left() == 0
    assert fake_api.find(GROUP, "volumepairs", "p1") is None and store.get(PAIRS, "p1") is None
