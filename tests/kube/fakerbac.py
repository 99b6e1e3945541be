"""RBAC for the fake API server (fakeapi.py): authentication by bearer token and
authorization against Roles, ClusterRoles and their bindings, as kube-apiserver's
RBAC authorizer does it.

* A request carries ``Authorization: Bearer TOKEN``; `RbacAuthorizer.token_for`
  mints one for a ServiceAccount (user ``system:serviceaccount:NS:NAME``, groups
  ``system:serviceaccounts``, ``system:serviceaccounts:NS``, ``system:authenticated``).
  An unknown token is 401 Unauthorized; no token is the user ``system:anonymous``.
* The request's attributes are kube-apiserver's RequestInfo: the verb (get, list,
  watch, create, update, patch, delete, deletecollection; a list with ``watch=true``
  is watch), API group, resource, subresource, namespace and name (a list or watch
  whose fieldSelector is ``metadata.name=X`` has the name X).
* A ClusterRoleBinding grants its ClusterRole everywhere; a RoleBinding grants its
  Role or ClusterRole only in its own namespace.  A rule matches on apiGroups,
  resources (``res``, ``res/sub``, ``*``, ``*/sub``, ``res/*``), verbs and, when it
  has them, resourceNames.  Nothing is allowed unless a rule allows it.
* A refusal is 403 Forbidden with the Status body and message of kube-apiserver:
  ``volumesnapshots.snapshot.storage.k8s.io is forbidden: User "system:serviceaccount:
  csi-virtvol:csi-virtvol-controller" cannot watch resource "volumesnapshots" in API
  group "snapshot.storage.k8s.io" at the cluster scope``.

Every decision is kept in `decisions` (who did what, allowed or not), so that a
test can list what each ServiceAccount really used.
"""
from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

ANONYMOUS = "system:anonymous"


@dataclasses.dataclass(frozen=True, slots=True)
class Attributes:
    """One request, as the authorizer sees it."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    attributes: Attributes
    allowed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """What the server answers instead of serving the request."""

    code: int
    body: Obj


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def request_attributes(user: str, method: str, *, group: str, resource: str, subresource: str | None,
                       namespace: str | None, name: str | None, query: Mapping[str, str]) -> Attributes:
    """kube-apiserver's RequestInfo for a resource request."""
    if method == "GET":
        if name is None:
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
            name = _name_from_field_selector(query.get("fieldSelector", ""))
        else:
            verb = "get"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name is not None else "deletecollection"}.get(method, method.lower())
    return Attributes(user=user, verb=verb, group=group, resource=resource, subresource=subresource or "",
                      namespace=namespace or "", name=name or "")


def _name_from_field_selector(text: str) -> str:
    for part in filter(None, (p.strip() for p in text.split(","))):
        for op in ("==", "="):
            key, sep, value = part.partition(op)
            if sep and key.strip() == "metadata.name" and not key.endswith("!"):
                return value.strip()
    return ""


def _rule_allows(rule: Obj, a: Attributes) -> bool:
    groups = rule.get("apiGroups") or []
    if "*" not in groups and a.group not in groups:
        return False
    verbs = rule.get("verbs") or []
    if "*" not in verbs and a.verb not in verbs:
        return False
    resources = rule.get("resources") or []
    want = a.full_resource
    ok = (want in resources or "*" in resources
          or (a.subresource and (f"*/{a.subresource}" in resources or f"{a.resource}/*" in resources)))
    if not ok:
        return False
    names = rule.get("resourceNames") or []
    return not names or a.name in names


class RbacAuthorizer:
    """Roles, ClusterRoles and bindings (e.g. the rendered chart), and the tokens it knows."""

    def __init__(self, docs: Iterable[Obj]) -> None:
        self.roles: dict[tuple[str, str], Obj] = {}           # (namespace, name) -> Role
        self.cluster_roles: dict[str, Obj] = {}
        self.bindings: list[Obj] = []                         # RoleBindings and ClusterRoleBindings
        for d in docs:
            kind = d.get("kind")
            meta = d.get("metadata") or {}
            if kind == "Role":
                self.roles[(meta.get("namespace", ""), meta["name"])] = d
            elif kind == "ClusterRole":
                self.cluster_roles[meta["name"]] = d
            elif kind in ("RoleBinding", "ClusterRoleBinding"):
                self.bindings.append(d)
        self._tokens: dict[str, tuple[str, frozenset[str]]] = {}
        self._lock = threading.Lock()
        self.decisions: list[Decision] = []

    @classmethod
    def from_manifests(cls, *paths: Path | str) -> RbacAuthorizer:
        docs: list[Obj] = []
        for p in paths:
            docs += [d for d in yaml.safe_load_all(Path(p).read_text()) if isinstance(d, dict)]
        return cls(docs)

    # -- authentication ------------------------------------------------------

    def token_for(self, namespace: str, service_account: str) -> str:
        """A bearer token of the ServiceAccount (its projected token, in a pod)."""
        token = secrets.token_urlsafe(24)
        groups = frozenset({"system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                            "system:authenticated"})
        with self._lock:
            self._tokens[token] = (service_account_user(namespace, service_account), groups)
        return token

    def authenticate(self, authorization: str | None) -> tuple[str, frozenset[str]] | None:
        """(user, groups) of the request's credentials; None when they are not valid."""
        if not authorization:
            return ANONYMOUS, frozenset({"system:unauthenticated"})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            return self._tokens.get(token.strip())

    # -- authorization ---------------------------------------------------------

    def _subject_matches(self, s: Obj, user: str, groups: frozenset[str]) -> bool:
        kind = s.get("kind")
        if kind == "ServiceAccount":
            return service_account_user(s.get("namespace", ""), s.get("name", "")) == user
        if kind == "User":
            return s.get("name") == user
        if kind == "Group":
            return s.get("name") in groups
        return False

    def _rules(self, user: str, groups: frozenset[str], namespace: str) -> Iterable[Obj]:
        for b in self.bindings:
            if not any(self._subject_matches(s, user, groups) for s in b.get("subjects") or []):
                continue
            ref = b.get("roleRef") or {}
            if b["kind"] == "ClusterRoleBinding":
                if ref.get("kind") != "ClusterRole":
                    continue
                role = self.cluster_roles.get(ref.get("name", ""))
            else:
                bns = (b.get("metadata") or {}).get("namespace", "")
                if bns != namespace:
                    continue  # a RoleBinding grants nothing outside its namespace, nor at the cluster scope
                role = (self.cluster_roles.get(ref.get("name", "")) if ref.get("kind") == "ClusterRole"
                        else self.roles.get((bns, ref.get("name", ""))))
            if role is not None:
                yield from role.get("rules") or []

    def allowed(self, a: Attributes, groups: frozenset[str] = frozenset()) -> bool:
        return any(_rule_allows(r, a) for r in self._rules(a.user, groups, a.namespace))

    def authorize(self, authorization: str | None, method: str, *, group: str, resource: str,
                  subresource: str | None, namespace: str | None, name: str | None,
                  query: Mapping[str, str]) -> Refusal | None:
        """None when the request may go on; else the server's answer."""
        who = self.authenticate(authorization)
        if who is None:
            return Refusal(401, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                 "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
        user, groups = who
        a = request_attributes(user, method, group=group, resource=resource, subresource=subresource,
                               namespace=namespace, name=name, query=query)
        ok = self.allowed(a, groups)
        with self._lock:
            self.decisions.append(Decision(a, ok))
        return None if ok else Refusal(403, forbidden_status(a))

    # -- what the tests read -----------------------------------------------------

    def used(self, user: str) -> set[tuple[str, str, str]]:
        """(group, resource[/sub], verb) that `user` was allowed."""
        with self._lock:
            return {(d.attributes.group, d.attributes.full_resource, d.attributes.verb)
                    for d in self.decisions if d.allowed and d.attributes.user == user}

    def denied(self) -> list[Attributes]:
        with self._lock:
            return [d.attributes for d in self.decisions if not d.allowed]


def forbidden_status(a: Attributes) -> Obj:
    """kube-apiserver's 403 Status: responsewriters.Forbidden's message inside apierrors.NewForbidden
    (whose qualified resource is group and resource, without the subresource)."""
    qualified = f"{a.resource}.{a.group}" if a.group else a.resource
    subject = f'{qualified} "{a.name}"' if a.name else qualified
    scope = f'in the namespace "{a.namespace}"' if a.namespace else "at the cluster scope"
    message = (f'{subject} is forbidden: User "{a.user}" cannot {a.verb} resource "{a.full_resource}" '
               f'in API group "{a.group}" {scope}')
    details: Obj = {"group": a.group, "kind": a.resource}
    if a.name:
        details["name"] = a.name
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Forbidden", "details": details, "code": 403}
