"""Every Kubernetes call in the driver's code, against the chart's RBAC for the ServiceAccount
that runs it.

The walk is static: each module of csi_virtvol/kube/ is parsed, each method of a
kubernetes client API object it uses (`self._batch = k8s.BatchV1Api(...)`, then
`self._batch.create_namespaced_job(...)`, or the method passed on, as to a watch or an
Informer) is found, and its request (HTTP method and URL template) is read from the client
library itself, giving the verb, API group and resource as kube-apiserver's authorizer sees
them.  A list method handed to `Watch.stream` or to an `Informer`, or called with
`watch=True`, is also a watch.

The controller runs all of csi_virtvol/kube/ (the CRD store on every kind); its rights
come from deploy/20-csi-virtvol.yaml (the chart rendered with default values).  The node
plugin runs only the CRD store on the kinds its code reads and writes: test_rbac_on_crds.py
runs it against the chart's rules.  Here:

* every call of the controller's code is allowed to the controller's ServiceAccount;
* the driver's own roles grant nothing that no call needs (least privilege);
* what the controller does in its own namespace (copy Jobs, their pods, its Lease) is granted
  by a Role there, never cluster-wide.
"""
from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest

from chart_rbac import CONTROLLER_SA, NS, chart_docs
from csi_virtvol.kube.crdstore import GROUP, KINDS

KUBE = Path(__file__).resolve().parents[2] / "csi_virtvol" / "kube"
Need = tuple[str, str, str]  # group, resource[/sub], verb


# ------------------------------------------------------------------ the client's requests

def client_request(api_class: str, method: str) -> tuple[str, str]:
    """(HTTP method, URL template) of a kubernetes client API method, from the library's source."""
    cls = getattr(k8s, api_class)
    src = inspect.getsource(getattr(cls, f"_{method}_serialize"))
    m = re.search(r"method='(\w+)',\s*resource_path='([^']+)'", src)
    assert m, f"{api_class}.{method}: no request found in the client library"
    return m.group(1), m.group(2)


_TEMPLATE = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/\{namespace\})?"
                       r"/(?P<resource>[^/]+)(?P<name>/\{name\})?(?:/(?P<sub>[^/]+))?$")


def needs_of(http: str, template: str, *, group: str = "", plural: str = "", watch: bool = False) -> set[Need]:
    """kube-apiserver's (group, resource, verb) for a request; `group`/`plural` fill in a custom
    object's {group}/{plural}."""
    m = _TEMPLATE.match(template)
    assert m, template
    g = m.group("group") or ""
    if g == "{group}":
        g = group
    resource = plural if m.group("resource") == "{plural}" else m.group("resource")
    assert g is not None and resource and "{" not in resource + g, (template, group, plural)
    named = bool(m.group("name"))
    verb = {"GET": "get" if named else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection"}[http]
    full = f"{resource}/{m.group('sub')}" if m.group("sub") else resource
    out = {(g, full, verb)}
    if watch:
        assert verb == "list", template
        out.add((g, full, "watch"))
    return out


# ------------------------------------------------------------------ the walk

API_CLASSES = {name for name in dir(k8s) if name.endswith("Api") and inspect.isclass(getattr(k8s, name))}


def _api_attributes(tree: ast.AST) -> dict[str, str]:
    """`self.X = k8s.SomeApi(...)` anywhere in the module: X -> SomeApi."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "k8s" \
                    and f.attr in API_CLASSES:
                for t in node.targets:
                    if isinstance(t, ast.Attribute):
                        out[t.attr] = f.attr
    return out


def _constants(call: ast.Call | None) -> list[str]:
    if call is None:
        return []
    return [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def _names(call: ast.Call | None) -> list[str]:
    if call is None:
        return []
    return [a.id for a in call.args if isinstance(a, ast.Name)]


def calls_in(path: Path) -> Iterator[tuple[str, str, set[Need]]]:
    """(where, 'Api.method', needs) of each client API method the module uses."""
    tree = ast.parse(path.read_text())
    attrs = _api_attributes(tree)
    parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr in attrs):
            continue
        api = attrs[node.value.attr]
        if not hasattr(getattr(k8s, api), f"_{node.attr}_serialize"):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node:   # called here
            call: ast.Call | None = parent
            watch = any(k.arg == "watch" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in parent.keywords)
        elif isinstance(parent, ast.Call) and node in parent.args:  # handed on: to a watch, an Informer, _call
            call = parent
            f = parent.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            watch = fname in ("stream", "Informer") and parent.args[0] is node
        else:
            raise AssertionError(f"{path.name}:{node.lineno}: {api}.{node.attr} used in a way this walk "
                                 "does not understand")
        http, template = client_request(api, node.attr)
        where = f"{path.name}:{node.lineno}"
        if "{plural}" not in template:
            yield where, f"{api}.{node.attr}", needs_of(http, template, watch=watch)
            continue
        # a custom object: its group and plural are literals at the call, or the CRD store's
        # (GROUP, any of its kinds)
        consts = _constants(call)
        if len(consts) >= 2 and "." in consts[0]:
            yield where, f"{api}.{node.attr}", needs_of(http, template, group=consts[0], plural=consts[-1]
                                                        if len(consts) == 2 else consts[2], watch=watch)
            continue
        plurals = [x for x in consts if x in {k.plural for k in KINDS.values()}]
        if "GROUP" in _names(call) and len(plurals) == 1:
            yield where, f"{api}.{node.attr}", needs_of(http, template, group=GROUP, plural=plurals[0], watch=watch)
            continue
        assert path.name == "crdstore.py" and ("GROUP" in _names(call) or "_call" in ast.unparse(call or node)), \
            f"{where}: custom object call whose group and resource this walk cannot tell"
        needs: set[Need] = set()
        for kind in KINDS.values():
            needs |= needs_of(http, template, group=GROUP, plural=kind.plural, watch=watch)
        yield where, f"{api}.{node.attr}", needs


def controller_calls() -> list[tuple[str, str, set[Need]]]:
    return [c for p in sorted(KUBE.glob("*.py")) for c in calls_in(p)]


def controller_needs() -> set[Need]:
    return {n for _, _, needs in controller_calls() for n in needs}


# ------------------------------------------------------------------ the chart

def bound_rules(sa: str, *, role_name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(scope, rule) of every role bound to `sa` (only `role_name`'s when given); scope is
    "cluster" or the Role's namespace."""
    docs = chart_docs()
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs
             if d["kind"] in ("Role", "ClusterRole")}
    out = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NS for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        if role_name is not None and ref["name"] != role_name:
            continue
        ns = b["metadata"].get("namespace", "") if ref["kind"] == "Role" else ""
        role = roles[(ref["kind"], ns, ref["name"])]
        scope = b["metadata"]["namespace"] if b["kind"] == "RoleBinding" else "cluster"
        out += [(scope, r) for r in role["rules"]]
    return out


def grants(rules: list[tuple[str, dict[str, Any]]]) -> set[tuple[str, str, str, str]]:
    return {(scope, g, r, v) for scope, rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


# What the controller does only in its own namespace (kube/jobs.py, kube/lease.py use the
# configured namespace); everything else it needs cluster-wide (cluster-scoped CRDs; Events and
# their PVC or VolumeSnapshot are in the users' namespaces).
OWN_NAMESPACE = {("batch", "jobs"), ("", "pods"), ("", "pods/log"), ("coordination.k8s.io", "leases")}


# ------------------------------------------------------------------ the tests

def test_the_walk_finds_the_calls_it_should() -> None:
    """The walk itself: a few calls known to be in the code are found with the right verbs."""
    by_method: dict[str, set[Need]] = {}
    for _, method, needs in controller_calls():
        by_method.setdefault(method, set()).update(needs)
    assert by_method["BatchV1Api.create_namespaced_job"] == {("batch", "jobs", "create")}
    assert by_method["BatchV1Api.list_namespaced_job"] == {("batch", "jobs", "list"), ("batch", "jobs", "watch")}
    assert by_method["CoreV1Api.read_namespaced_pod_log"] == {("", "pods/log", "get")}
    assert by_method["EventsV1Api.patch_namespaced_event"] == {("events.k8s.io", "events", "patch")}
    assert by_method["CustomObjectsApi.get_namespaced_custom_object"] == {
        ("snapshot.storage.k8s.io", "volumesnapshots", "get")}
    assert (GROUP, "volumepairs/status", "update") in by_method["CustomObjectsApi.replace_cluster_custom_object_status"]
    assert (GROUP, "storagearrays", "watch") in by_method["CustomObjectsApi.list_cluster_custom_object"]
    assert by_method["CoordinationV1Api.replace_namespaced_lease"] == {("coordination.k8s.io", "leases", "update")}
    jobs_py = {m: n for w, m, n in controller_calls() if w.startswith("jobs.py")}
    assert jobs_py["CustomObjectsApi.get_cluster_custom_object"] == {(GROUP, "volumepairs", "get")}


def test_every_call_of_the_controller_is_granted_to_its_service_account() -> None:
    have = grants(bound_rules(CONTROLLER_SA))
    missing = []
    for where, method, needs in controller_calls():
        for g, r, v in sorted(needs):
            scope = NS if (g, r.partition("/")[0]) in OWN_NAMESPACE or (g, r) in OWN_NAMESPACE else "cluster"
            if (scope, g, r, v) not in have:
                missing.append(f"{where} {method}: {v} {r} ({g or 'core'}) {'in ' + scope if scope != 'cluster' else ''}")
    assert missing == [], "the chart does not grant the controller what its code calls:\n" + "\n".join(missing)


@pytest.mark.parametrize("role", ["csi-virtvol-controller-driver"])
def test_the_drivers_own_roles_grant_only_what_its_code_calls(role: str) -> None:
    granted = {(g, r, v) for _, g, r, v in grants(bound_rules(CONTROLLER_SA, role_name=role))}
    unused = sorted(granted - controller_needs())
    assert unused == [], f"{role} grants what no call in csi_virtvol/kube/ needs: {unused}"


def test_jobs_pods_and_the_lease_only_in_the_release_namespace() -> None:
    """Copy Jobs are privileged: the controller may make them in its own namespace, nowhere else."""
    for scope, g, r, v in grants(bound_rules(CONTROLLER_SA, role_name="csi-virtvol-controller-driver")):
        if (g, r) in OWN_NAMESPACE:
            assert scope == NS, (scope, g, r, v)
    cluster_wide = {(g, r, v) for scope, g, r, v in grants(bound_rules(CONTROLLER_SA)) if scope == "cluster"}
    assert not [x for x in cluster_wide if x[:2] in {("batch", "jobs"), ("batch", "cronjobs"), ("", "pods")}
                and x[2] in ("create", "update", "patch")], "a ClusterRole lets the controller make pods anywhere"
