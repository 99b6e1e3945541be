#!/usr/bin/env python3
"""Write proto/csi.proto from the CSI v1.12 wire facts (../shared/csi/*.json).

The facts file lists every message, field (number, type, label, oneof), enum,
service and RPC of the spec, plus the CSI custom options (alpha_* = 1060,
csi_secret = 1059).  This script renders them back into a .proto that is
wire-identical to the spec; `../shared/tools/csi-proto-check proto/csi.proto`
verifies that.  It is run by hand when the spec version changes; the Python
stubs are then generated from proto/csi.proto at build time.

  python scripts/proto_from_facts.py FACTS.json > proto/csi.proto
"""
from __future__ import annotations

import json
import sys
from typing import Any

SCALARS = {"string", "bytes", "bool", "int32", "int64", "uint32", "uint64",
           "double", "float", "sint32", "sint64", "fixed32", "fixed64"}


def short(t: str, scope: str) -> str:
    """Type name as written in the proto, relative to package csi.v1."""
    if t in SCALARS:
        return t
    if t.startswith("google.protobuf."):
        return "." + t
    return "." + t  # fully-qualified: never ambiguous


def opts(items: list[str]) -> str:
    return " [" + ", ".join(items) + "]" if items else ""


def render(facts: dict[str, Any]) -> str:
    msgs = facts["messages"]
    enums = facts["enums"]
    children: dict[str | None, list[tuple[str, str]]] = {}
    for name, m in msgs.items():
        children.setdefault(m["parent"], []).append(("m", name))
    for name, e in enums.items():
        children.setdefault(e["parent"], []).append(("e", name))
    # map entry messages are implicit
    map_entries = {f["map_entry"]["type"] for m in msgs.values() for f in m["fields"]
                   if f.get("map_entry")}
    out: list[str] = []
    w = out.append

    def enum(name: str, ind: str) -> None:
        e = enums[name]
        w(f"{ind}enum {e['name']} {{")
        if e.get("alpha_enum"):
            w(f"{ind}  option (alpha_enum) = true;")
        for v in e["values"]:
            o = opts(["(alpha_enum_value) = true"] if v.get("alpha_enum_value") else [])
            w(f"{ind}  {v['name']} = {v['number']}{o};")
        w(f"{ind}}}")

    def field(f: dict[str, Any], ind: str) -> str:
        o: list[str] = []
        if f.get("csi_secret"):
            o.append("(csi_secret) = true")
        if f.get("alpha_field"):
            o.append("(alpha_field) = true")
        if f["kind"] == "map":
            me = f["map_entry"]
            t = f"map<{me['key_type']}, {short(me['value_type'], '')}>"
        else:
            t = short(f["type"], "")
            if f["label"] == "repeated":
                t = "repeated " + t
        return f"{ind}{t} {f['name']} = {f['number']}{opts(o)};"

    def message(name: str, ind: str) -> None:
        m = msgs[name]
        w(f"{ind}message {m['name']} {{")
        if m.get("alpha_message"):
            w(f"{ind}  option (alpha_message) = true;")
        if m["reserved_numbers"]:
            w(f"{ind}  reserved {', '.join(str(n) for n in m['reserved_numbers'])};")
        if m["reserved_names"]:
            w(f"{ind}  reserved {', '.join(json.dumps(n) for n in m['reserved_names'])};")
        for kind, child in children.get(name, []):
            if child in map_entries:
                continue
            (message if kind == "m" else enum)(child, ind + "  ")
        done: set[str] = set()
        for f in m["fields"]:
            oneof = f.get("oneof")
            if oneof is None:
                w(field(f, ind + "  "))
            elif oneof not in done:
                done.add(oneof)
                w(f"{ind}  oneof {oneof} {{")
                for g in m["fields"]:
                    if g.get("oneof") == oneof:
                        w(field(g, ind + "    "))
                w(f"{ind}  }}")
        w(f"{ind}}}")

    w("// Container Storage Interface, v1.12.0, rendered from the spec's wire facts")
    w("// by scripts/proto_from_facts.py.  Do not edit: regenerate instead.")
    w(f'syntax = "{facts["syntax"]}";')
    w(f"package {facts['package']};")
    w("")
    for imp in facts["imports"]:
        w(f'import "{imp}";')
    w("")
    w('option go_package = "github.com/container-storage-interface/spec/lib/go/csi";')
    w("")
    w("extend google.protobuf.EnumOptions { bool alpha_enum = 1060; }")
    w("extend google.protobuf.EnumValueOptions { bool alpha_enum_value = 1060; }")
    w("extend google.protobuf.FieldOptions { bool csi_secret = 1059; bool alpha_field = 1060; }")
    w("extend google.protobuf.MessageOptions { bool alpha_message = 1060; }")
    w("extend google.protobuf.MethodOptions { bool alpha_method = 1060; }")
    w("extend google.protobuf.ServiceOptions { bool alpha_service = 1060; }")
    w("")
    for s in facts["services"].values():
        w(f"service {s['name']} {{")
        if s.get("alpha_service"):
            w("  option (alpha_service) = true;")
        for r in s["rpcs"]:
            cs = "stream " if r["client_streaming"] else ""
            ss = "stream " if r["server_streaming"] else ""
            body = " { option (alpha_method) = true; }" if r.get("alpha_method") else " {}"
            w(f"  rpc {r['name']}({cs}.{r['request']}) returns ({ss}.{r['response']}){body}")
        w("}")
        w("")
    for kind, name in children.get(None, []):
        (message if kind == "m" else enum)(name, "")
        w("")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        sys.stdout.write(render(json.load(fh)))
