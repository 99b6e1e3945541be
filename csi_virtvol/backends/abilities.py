"""The ability table and the admin override, applied on top of the probe.

`effective_abilities` is pure: probe, then every matching table rule in file
order (add, then remove), then the per-array override.  The format of the
table is documented in the header of abilities.yaml, the packaged default.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from csi_virtvol import errors
from csi_virtvol.model.array import ABILITY_NAMES, Ability, ArrayIdentity

logger = logging.getLogger(__name__)

DEFAULT_TABLE = "abilities.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class AbilityRule:
    """One row: identity globs, abilities added, abilities removed."""

    vendor: tuple[str, ...] = ("*",)
    model: tuple[str, ...] = ("*",)
    version: tuple[str, ...] = ("*",)
    add: Ability = Ability.NONE
    remove: Ability = Ability.NONE
    why: str = ""

    def matches(self, identity: ArrayIdentity) -> bool:
        return (_any_match(self.vendor, identity.vendor)
                and _any_match(self.model, identity.model)
                and _any_match(self.version, identity.version))


@dataclass(frozen=True, slots=True, kw_only=True)
class AbilityTable:
    rules: tuple[AbilityRule, ...] = field(default_factory=tuple)

    def matching(self, identity: ArrayIdentity) -> tuple[AbilityRule, ...]:
        return tuple(r for r in self.rules if r.matches(identity))


def _any_match(patterns: Iterable[str], value: str) -> bool:
    v = value.strip().lower()
    return any(fnmatch.fnmatchcase(v, p.strip().lower()) for p in patterns)


def parse_ability_names(names: Iterable[str], *, where: str) -> Ability:
    out = Ability.NONE
    for n in names:
        key = str(n).strip().lower().replace("_", "-")
        if key not in ABILITY_NAMES:
            raise errors.InvalidRequest(f"{where}: unknown ability {n!r} (known: {', '.join(ABILITY_NAMES)})")
        out |= Ability.from_names([key])
    return out


def effective_abilities(*, identity: ArrayIdentity, probed: Ability, table: AbilityTable,
                        overrides: Mapping[str, bool]) -> Ability:
    """Probe, then the table rules matching `identity` (file order; within a
    rule add then remove), then the admin override (name -> on/off)."""
    out = probed
    for rule in table.matching(identity):
        out = (out | rule.add) & ~rule.remove
    for name, on in sorted(overrides.items()):
        flag = parse_ability_names([name], where=f"override for {identity.key()}")
        out = (out | flag) if on else (out & ~flag)
    return out


# ---- loading --------------------------------------------------------------------------------

def load_table(path: str | Path | None = None) -> AbilityTable:
    """Read a table from `path`, or the packaged default when None."""
    if path is None:
        text = resources.files("csi_virtvol.backends").joinpath(DEFAULT_TABLE).read_text(encoding="utf-8")
        where = f"csi_virtvol/backends/{DEFAULT_TABLE}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise errors.InvalidRequest(f"ability table {path}: {e}") from e
        where = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.InvalidRequest(f"ability table {where}: {e}") from e
    return parse_table(data, where=where)


def parse_table(data: Any, *, where: str = "ability table") -> AbilityTable:
    if data is None:
        return AbilityTable()
    if not isinstance(data, Mapping) or set(data) - {"rules"}:
        raise errors.InvalidRequest(f"{where}: expected a mapping with one key, 'rules'")
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise errors.InvalidRequest(f"{where}: 'rules' must be a list")
    return AbilityTable(rules=tuple(_parse_rule(r, where=f"{where}: rule {i + 1}")
                                    for i, r in enumerate(raw_rules)))


def _parse_rule(raw: Any, *, where: str) -> AbilityRule:
    if not isinstance(raw, Mapping):
        raise errors.InvalidRequest(f"{where}: must be a mapping")
    unknown = set(raw) - {"match", "add", "remove", "why"}
    if unknown:
        raise errors.InvalidRequest(f"{where}: unknown keys {sorted(unknown)}")
    match = raw.get("match") or {}
    if not isinstance(match, Mapping) or set(match) - {"vendor", "model", "version"}:
        raise errors.InvalidRequest(f"{where}: 'match' takes vendor, model, version")
    return AbilityRule(
        vendor=_globs(match.get("vendor", "*"), where=f"{where}: vendor"),
        model=_globs(match.get("model", "*"), where=f"{where}: model"),
        version=_globs(match.get("version", "*"), where=f"{where}: version"),
        add=parse_ability_names(_names(raw.get("add"), where=f"{where}: add"), where=where),
        remove=parse_ability_names(_names(raw.get("remove"), where=f"{where}: remove"), where=where),
        why=str(raw.get("why", "")),
    )


def _globs(v: Any, *, where: str) -> tuple[str, ...]:
    if isinstance(v, str | int | float):
        return (str(v),)
    if isinstance(v, list) and v and all(isinstance(x, str | int | float) for x in v):
        return tuple(str(x) for x in v)
    raise errors.InvalidRequest(f"{where}: expected a glob or a non-empty list of globs")


def _names(v: Any, *, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise errors.InvalidRequest(f"{where}: expected a list of ability names")


__all__ = ["AbilityRule", "AbilityTable", "effective_abilities", "load_table", "parse_table",
           "parse_ability_names", "DEFAULT_TABLE"]
