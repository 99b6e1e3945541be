"""The fake API server behaves as kube-apiserver does where the driver depends on it.

Driven over real HTTP with the official client, so that a wrong answer here
would also be a wrong answer the driver's code was tested against.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import kubernetes.client as k8s
import kubernetes.watch as kwatch
import pytest

from fakeapi import FakeApiServer

G, V = "virtvol.csi.example.org", "v1alpha1"
JSON_PATCH = "application/json-patch+json"


def vol(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{G}/{V}", "kind": "VirtualVolume", "metadata": {"name": name},
            "spec": {"name": f"pvc-{name}", "size": 1 << 30, **spec}}


def status_of(e: k8s.ApiException) -> tuple[int, str]:
    return int(e.status), json.loads(e.body)["reason"]


@pytest.fixture
def api(client: Any) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(client)


def test_create_get_conflicts(api: k8s.CustomObjectsApi) -> None:
    obj = api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v1", kind="snapshot"))
    assert obj["metadata"]["generation"] == 1 and obj["metadata"]["uid"]
    assert obj["spec"]["kind"] == "snapshot"
    assert api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v2"))["spec"]["kind"] == "volume"  # default
    with pytest.raises(k8s.ApiException) as e:
        api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v1"))
    assert status_of(e.value) == (409, "AlreadyExists")
    with pytest.raises(k8s.ApiException) as e:
        api.get_cluster_custom_object(G, V, "virtualvolumes", "nope")
    assert status_of(e.value) == (404, "NotFound")
    stale = dict(obj)
    obj["spec"]["size"] = 2 << 30
    new = api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", obj)
    assert new["metadata"]["generation"] == 2
    assert int(new["metadata"]["resourceVersion"]) > int(stale["metadata"]["resourceVersion"])
    with pytest.raises(k8s.ApiException) as e:
        api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", stale)
    assert status_of(e.value) == (409, "Conflict")
    del obj["metadata"]["resourceVersion"]
    with pytest.raises(k8s.ApiException) as e:  # custom resources refuse unconditional updates
        api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", obj)
    assert status_of(e.value) == (422, "Invalid")


def test_status_subresource(api: k8s.CustomObjectsApi) -> None:
    body = vol("v1")
    body["status"] = {"state": "available"}
    obj = api.create_cluster_custom_object(G, V, "virtualvolumes", body)
    assert "status" not in obj  # dropped on create
    obj["status"] = {"state": "available"}
    obj["spec"]["size"] = 5
    st = api.replace_cluster_custom_object_status(G, V, "virtualvolumes", "v1", obj)
    assert st["status"] == {"state": "available"} and st["spec"]["size"] == 1 << 30
    assert st["metadata"]["generation"] == 1
    st["status"] = {"state": "failed"}
    st["metadata"]["labels"] = {"a": "b"}
    main = api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", st)
    assert main["status"] == {"state": "available"} and main["metadata"]["labels"] == {"a": "b"}
    assert main["metadata"]["generation"] == 1  # labels are not spec
    same = api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", main)
    assert same["metadata"]["resourceVersion"] == main["metadata"]["resourceVersion"]  # no-op write


def test_schema_validation(fake_api: FakeApiServer, api: k8s.CustomObjectsApi) -> None:
    for bad in (vol("b1", size=-1), vol("b2", kind="clone"), vol("b3", contentSource="tape:1"),
                {**vol("b4"), "spec": {"size": 1}}, vol("Bad_Name")):
        with pytest.raises(k8s.ApiException) as e:
            api.create_cluster_custom_object(G, V, "virtualvolumes", bad)
        assert status_of(e.value) == (422, "Invalid"), bad
    with pytest.raises(k8s.ApiException) as e:
        api.create_cluster_custom_object(G, V, "virtualvolumes", vol("u1", colour="red"), field_validation="Strict")
    assert status_of(e.value)[0] == 400 and "spec.colour" in json.loads(e.value.body)["message"]
    obj = api.create_cluster_custom_object(G, V, "virtualvolumes", vol("u2", colour="red"))
    assert "colour" not in obj["spec"] and fake_api.warnings == ['unknown field "spec.colour"']


def test_patches(api: k8s.CustomObjectsApi) -> None:
    api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v1", parameters={"a": "1", "b": "2"}))
    got = api.patch_cluster_custom_object(G, V, "virtualvolumes", "v1",
                                          {"spec": {"parameters": {"a": None, "c": "3"}}})
    assert got["spec"]["parameters"] == {"b": "2", "c": "3"}
    got = api.patch_cluster_custom_object(G, V, "virtualvolumes", "v1",
                                          [{"op": "replace", "path": "/spec/size", "value": 7},
                                           {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}],
                                          _content_type=JSON_PATCH)
    assert got["spec"]["size"] == 7 and got["metadata"]["labels"] == {"x": "y"}
    with pytest.raises(k8s.ApiException) as e:
        api.patch_cluster_custom_object(G, V, "virtualvolumes", "v1", [{"op": "test", "path": "/spec/size",
                                                                         "value": 8}],
                                        _content_type=JSON_PATCH)
    assert status_of(e.value)[0] == 422
    with pytest.raises(k8s.ApiException) as e:  # a list is no merge patch
        api.patch_cluster_custom_object(G, V, "virtualvolumes", "v1", [{"op": "remove", "path": "/spec/size"}])
    assert status_of(e.value)[0] == 400
    with pytest.raises(k8s.ApiException) as e:  # no strategic merge for custom resources
        api.patch_cluster_custom_object(G, V, "virtualvolumes", "v1", {"spec": {"size": 9}},
                                        _content_type="application/strategic-merge-patch+json")
    assert status_of(e.value)[0] == 415
    with pytest.raises(k8s.ApiException) as e:  # the result is validated too
        api.patch_cluster_custom_object(G, V, "virtualvolumes", "v1", [{"op": "remove", "path": "/spec/size"}],
                                        _content_type=JSON_PATCH)
    assert status_of(e.value)[0] == 422


def test_finalizers(api: k8s.CustomObjectsApi) -> None:
    body = vol("v1")
    body["metadata"]["finalizers"] = ["example.org/hold"]
    api.create_cluster_custom_object(G, V, "virtualvolumes", body)
    out = api.delete_cluster_custom_object(G, V, "virtualvolumes", "v1")
    assert out["metadata"]["deletionTimestamp"]
    obj = api.get_cluster_custom_object(G, V, "virtualvolumes", "v1")  # still there
    obj["metadata"]["finalizers"].append("example.org/more")
    with pytest.raises(k8s.ApiException) as e:
        api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", obj)
    assert status_of(e.value) == (422, "Invalid")
    obj["metadata"]["finalizers"] = []
    api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", obj)
    with pytest.raises(k8s.ApiException) as e:
        api.get_cluster_custom_object(G, V, "virtualvolumes", "v1")
    assert status_of(e.value) == (404, "NotFound")
    api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v2"))
    with pytest.raises(k8s.ApiException) as e:
        api.delete_cluster_custom_object(G, V, "virtualvolumes", "v2", body=k8s.V1DeleteOptions(
            preconditions=k8s.V1Preconditions(resource_version="1")))
    assert status_of(e.value) == (409, "Conflict")


def test_labels_and_pagination(api: k8s.CustomObjectsApi) -> None:
    for i in range(7):
        body = vol(f"v{i}")
        body["metadata"]["labels"] = {"tier": "gold" if i % 2 else "silver", "n": str(i)}
        api.create_cluster_custom_object(G, V, "virtualvolumes", body)

    def names(sel: str) -> list[str]:
        return [o["metadata"]["name"] for o in api.list_cluster_custom_object(
            G, V, "virtualvolumes", label_selector=sel)["items"]]

    assert names("tier=gold") == ["v1", "v3", "v5"]
    assert names("tier!=gold,n notin (0,2)") == ["v4", "v6"]
    assert names("n in (1, 6),tier") == ["v1", "v6"]
    assert names("!tier") == []
    page = api.list_cluster_custom_object(G, V, "virtualvolumes", limit=3)
    assert [o["metadata"]["name"] for o in page["items"]] == ["v0", "v1", "v2"]
    api.delete_cluster_custom_object(G, V, "virtualvolumes", "v4")  # the next pages show the snapshot
    seen = [o["metadata"]["name"] for o in page["items"]]
    while page["metadata"].get("continue"):
        page = api.list_cluster_custom_object(G, V, "virtualvolumes", limit=3,
                                              _continue=page["metadata"]["continue"])
        seen += [o["metadata"]["name"] for o in page["items"]]
    assert seen == [f"v{i}" for i in range(7)]


def test_watch_resume_and_selector(api: k8s.CustomObjectsApi, client: Any) -> None:
    start = api.list_cluster_custom_object(G, V, "virtualvolumes")["metadata"]["resourceVersion"]
    obj = api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v1"))
    obj["metadata"]["labels"] = {"w": "yes"}
    obj = api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", obj)
    obj["metadata"]["labels"] = {}
    obj = api.replace_cluster_custom_object(G, V, "virtualvolumes", "v1", obj)
    api.delete_cluster_custom_object(G, V, "virtualvolumes", "v1")

    def events(**kw: Any) -> list[str]:
        w = kwatch.Watch()
        return [f"{e['type']}:{e['raw_object']['metadata'].get('labels', {}).get('w', '-')}"
                for e in w.stream(api.list_cluster_custom_object, G, V, "virtualvolumes",
                                  resource_version=start, timeout_seconds=1, **kw)]

    assert events() == ["ADDED:-", "MODIFIED:yes", "MODIFIED:-", "DELETED:-"]
    assert events(label_selector="w=yes") == ["ADDED:yes", "DELETED:-"]  # in and out of the selector


def test_watch_streams_live_events(api: k8s.CustomObjectsApi) -> None:
    start = api.list_cluster_custom_object(G, V, "virtualvolumes")["metadata"]["resourceVersion"]
    got: list[str] = []
    w = kwatch.Watch()

    def reader() -> None:
        for e in w.stream(api.list_cluster_custom_object, G, V, "virtualvolumes", resource_version=start,
                          timeout_seconds=30):
            got.append(e["type"])
            if len(got) == 2:
                w.stop()

    t = threading.Thread(target=reader)
    t.start()
    api.create_cluster_custom_object(G, V, "virtualvolumes", vol("v1"))
    api.delete_cluster_custom_object(G, V, "virtualvolumes", "v1")
    t.join(30)
    assert got == ["ADDED", "DELETED"]


def test_watch_too_old_is_410() -> None:
    with FakeApiServer(history=2) as small:
        from csi_virtvol.kube.crdstore import api_client
        c = api_client(host=small.url)
        core = k8s.CoreV1Api(c)
        for i in range(4):
            small.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}",
                      "namespace": "d"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "d")
        with pytest.raises(k8s.ApiException) as e:
            list(kwatch.Watch().stream(core.list_namespaced_pod, "d", resource_version="1001", timeout_seconds=1))
        assert e.value.status == 410
        c.close()
