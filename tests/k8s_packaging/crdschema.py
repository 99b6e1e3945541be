"""Validate objects against a CRD's openAPIV3Schema, and CRDs for structure.

A small re-implementation of what kube-apiserver checks for the schema
features our CRDs use: type, properties, additionalProperties (schema or
bool), items, required, enum, pattern, min/max length/items, minimum/maximum,
int64 range, nullable, x-kubernetes-int-or-string,
x-kubernetes-preserve-unknown-fields and map-type lists.  Unlike the API
server, which silently prunes unknown fields, an unknown field is an error
here (like `kubectl apply --validate=strict`), so a misspelt key in a body is
caught in a test instead of vanishing in the cluster.

    validate(crd, obj) -> list[str]          problems of obj under crd ([] = valid)
    structural_problems(crd) -> list[str]    why crd is not a structural schema
    column_problems(crd) -> list[str]        printer columns pointing at no field
"""
from __future__ import annotations

import datetime
import re
from collections.abc import Iterator, Mapping
from typing import Any

INT64 = (-(1 << 63), (1 << 63) - 1)
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
KNOWN_KEYWORDS = {
    "type", "format", "description", "properties", "additionalProperties", "items", "required",
    "enum", "pattern", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "nullable", "default", "title", "minProperties",
    "maxProperties", "uniqueItems", "multipleOf", "example",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
    "x-kubernetes-embedded-resource", "x-kubernetes-validations",
}


def version_schema(crd: Mapping[str, Any], version: str) -> Mapping[str, Any] | None:
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served", True):
            return v["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]
    return None


def validate(crd: Mapping[str, Any], obj: Mapping[str, Any]) -> list[str]:
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    errs: list[str] = []
    api = str(obj.get("apiVersion", ""))
    g, _, ver = api.partition("/")
    if g != group:
        return [f"apiVersion {api!r} is not in group {group}"]
    if obj.get("kind") != kind:
        return [f"kind {obj.get('kind')!r} is not {kind}"]
    schema = version_schema(crd, ver)
    if schema is None:
        return [f"version {ver!r} is not served by {crd['metadata']['name']}"]
    errs += _metadata(obj.get("metadata"), cluster=spec["scope"] == "Cluster")
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    root = dict(schema)
    root["properties"] = {k: v for k, v in schema.get("properties", {}).items()
                          if k not in ("apiVersion", "kind", "metadata")}
    errs += list(_check(root, body, "", root_level=True))
    return errs


def _metadata(meta: object, *, cluster: bool) -> list[str]:
    if not isinstance(meta, Mapping):
        return ["metadata: missing"]
    errs = []
    name = meta.get("name", "")
    if not isinstance(name, str) or not name or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errs.append(f"metadata.name: {name!r} is not a DNS subdomain")
    if cluster and "namespace" in meta:
        errs.append("metadata.namespace: set on a cluster-scoped object")
    for m in ("labels", "annotations"):
        for k, v in (meta.get(m) or {}).items():
            if not LABEL_KEY.match(str(k)):
                errs.append(f"metadata.{m}: bad key {k!r}")
            if not isinstance(v, str):
                errs.append(f"metadata.{m}.{k}: {v!r} is not a string")
    return errs


def _type_ok(t: str, v: object) -> bool:
    if t == "object":
        return isinstance(v, Mapping)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    return False


def _check(s: Mapping[str, Any], v: object, path: str, root_level: bool = False) -> Iterator[str]:
    where = path or "<root>"
    if v is None:
        if not s.get("nullable"):
            yield f"{where}: null is not allowed"
        return
    if s.get("x-kubernetes-int-or-string"):
        if not (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
            yield f"{where}: {v!r} is neither an integer nor a string"
        return
    t = s.get("type")
    if t is None:
        if s.get("x-kubernetes-preserve-unknown-fields"):
            return
        yield f"{where}: schema has no type"
        return
    if not _type_ok(t, v):
        yield f"{where}: {v!r} is not of type {t}"
        return
    if "enum" in s and v not in s["enum"]:
        yield f"{where}: {v!r} is not one of {s['enum']}"
    if t == "string":
        assert isinstance(v, str)
        if "pattern" in s and not re.search(s["pattern"], v):
            yield f"{where}: {v!r} does not match {s['pattern']!r}"
        if len(v) < s.get("minLength", 0):
            yield f"{where}: shorter than {s['minLength']}"
        if "maxLength" in s and len(v) > s["maxLength"]:
            yield f"{where}: longer than {s['maxLength']}"
        if s.get("format") == "date-time":
            try:
                datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                yield f"{where}: {v!r} is not an RFC 3339 date-time"
    elif t in ("integer", "number"):
        assert isinstance(v, int | float)
        if "minimum" in s and v < s["minimum"]:
            yield f"{where}: {v} is below {s['minimum']}"
        if "maximum" in s and v > s["maximum"]:
            yield f"{where}: {v} is above {s['maximum']}"
        if t == "integer" and not INT64[0] <= v <= INT64[1]:
            yield f"{where}: {v} does not fit in int64"
    elif t == "array":
        assert isinstance(v, list)
        if len(v) < s.get("minItems", 0):
            yield f"{where}: fewer than {s['minItems']} items"
        if "maxItems" in s and len(v) > s["maxItems"]:
            yield f"{where}: more than {s['maxItems']} items"
        for i, item in enumerate(v):
            if "items" in s:
                yield from _check(s["items"], item, f"{path}[{i}]")
        lt = s.get("x-kubernetes-list-type")
        if lt == "set" and len({repr(x) for x in v}) != len(v):
            yield f"{where}: duplicate items in a set"
        if lt == "map":
            keys = [tuple(repr(x.get(k)) for k in s.get("x-kubernetes-list-map-keys", ()))
                    for x in v if isinstance(x, Mapping)]
            if len(set(keys)) != len(keys):
                yield f"{where}: duplicate map keys {s.get('x-kubernetes-list-map-keys')}"
    elif t == "object":
        assert isinstance(v, Mapping)
        props = s.get("properties", {})
        for r in s.get("required", ()):
            if r not in v:
                yield f"{path + '.' if path else ''}{r}: required"
        extra = s.get("additionalProperties")
        for k, item in v.items():
            sub = f"{path}.{k}" if path else str(k)
            if k in props:
                yield from _check(props[k], item, sub)
            elif isinstance(extra, Mapping):
                yield from _check(extra, item, sub)
            elif extra is True or s.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                yield f"{sub}: unknown field"


def structural_problems(crd: Mapping[str, Any]) -> list[str]:
    """The apiextensions rules for a structural schema that can bite us."""
    errs: list[str] = []
    for v in crd["spec"]["versions"]:
        root = v.get("schema", {}).get("openAPIV3Schema")
        if root is None:
            errs.append(f"{v['name']}: no openAPIV3Schema")
            continue
        if root.get("type") != "object":
            errs.append(f"{v['name']}: root type must be object")
        meta = root.get("properties", {}).get("metadata")
        if meta is not None and set(meta) - {"type"} and set(meta.get("properties", {})) - {"name", "generateName"}:
            errs.append(f"{v['name']}: metadata may only restrict name and generateName")
        errs += [f"{v['name']}: {e}" for e in _structural(root, "")]
    return errs


def _structural(s: Mapping[str, Any], path: str) -> Iterator[str]:
    where = path or "<root>"
    unknown = set(s) - KNOWN_KEYWORDS
    if unknown:
        yield f"{where}: unsupported keywords {sorted(unknown)}"
    if "$ref" in s or "anyOf" in s or "oneOf" in s or "allOf" in s or "not" in s:
        yield f"{where}: logic junctors are not used in our schemas"
    if "type" not in s and not (s.get("x-kubernetes-int-or-string") or s.get("x-kubernetes-preserve-unknown-fields")):
        yield f"{where}: no type"
    if "properties" in s and "additionalProperties" in s:
        yield f"{where}: properties and additionalProperties are exclusive"
    if s.get("type") == "array" and "items" not in s:
        yield f"{where}: array without items"
    if s.get("x-kubernetes-list-type") == "map":
        keys = s.get("x-kubernetes-list-map-keys") or []
        item = s.get("items", {})
        if not keys:
            yield f"{where}: map list without keys"
        for k in keys:
            if k not in item.get("required", ()):
                yield f"{where}: map key {k} must be required"
    for k, sub in s.get("properties", {}).items():
        yield from _structural(sub, f"{path}.{k}")
    if isinstance(s.get("additionalProperties"), Mapping):
        yield from _structural(s["additionalProperties"], f"{path}.*")
    if "items" in s:
        yield from _structural(s["items"], f"{path}[]")


COLUMN_TYPES = {"integer": {"integer"}, "number": {"number", "integer"}, "string": None,
                "boolean": {"boolean"}, "date": {"string"}}


def schema_at(root: Mapping[str, Any], json_path: str) -> Mapping[str, Any] | None:
    """The schema node a simple JSONPath (.a.b, .a[*].b, .a[0]) selects."""
    node: Mapping[str, Any] | None = root
    for part in re.findall(r"\.([A-Za-z0-9_-]+)|\[(\*|\d+)\]", json_path):
        if node is None:
            return None
        name, index = part
        if name:
            if name == "metadata" and node is root:
                return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            props = node.get("properties", {})
            if node.get("x-kubernetes-preserve-unknown-fields") and name not in props:
                return node
            node = props.get(name) or (node.get("additionalProperties") if isinstance(
                node.get("additionalProperties"), Mapping) else None)
        else:
            node = node.get("items")
    return node


def column_problems(crd: Mapping[str, Any]) -> list[str]:
    errs = []
    for v in crd["spec"]["versions"]:
        root = v["schema"]["openAPIV3Schema"]
        for col in v.get("additionalPrinterColumns", ()):
            path = col["jsonPath"]
            if path == ".metadata.creationTimestamp":
                if col["type"] != "date":
                    errs.append(f"{col['name']}: creationTimestamp column must be a date")
                continue
            node = schema_at(root, path)
            if node is None:
                errs.append(f"{col['name']}: {path} is not in the schema")
                continue
            allowed = COLUMN_TYPES[col["type"]]
            if allowed is not None and node.get("type") not in allowed:
                errs.append(f"{col['name']}: column type {col['type']} but {path} is {node.get('type')}")
    return errs
