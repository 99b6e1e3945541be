"""Driver kinds -> factories, and opening an array with its effective abilities.

Built-in kinds are listed in `_BUILTIN` as "module:attribute" strings and
imported on first use (a driver's OS dependencies are only touched when an
array of that kind is opened).  Third-party drivers plug in through the entry
point group ``csi_virtvol.backends`` (name = kind, value = a factory taking an
ArraySpec), or at run time through `register`.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from importlib import metadata
from typing import cast

from csi_virtvol import errors
from csi_virtvol.backends import abilities
from csi_virtvol.backends.base import ArrayDriver, implemented_abilities
from csi_virtvol.model.array import Ability, ArrayInfo, ArraySpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "csi_virtvol.backends"

DriverFactory = Callable[[ArraySpec], ArrayDriver]

# kind -> "module:attr"; drivers added by later work append a line here
_BUILTIN: dict[str, str] = {
    "file": "csi_virtvol.backends.filepool:FilePoolDriver",
    "qsd": "csi_virtvol.backends.qsd:QsdDriver",
    "lvm": "csi_virtvol.backends.lvm:LvmThinDriver",
    "lio": "csi_virtvol.backends.lio:LioDriver",
}

# abilities that are not tied to an optional protocol: a driver "implements"
# them by its mandatory methods (resize_lun), so the mask never removes them
_PROTOCOL_FREE = Ability.GROW_LUN

_registered: dict[str, DriverFactory] = {}


def register(kind: str, factory: DriverFactory) -> None:
    """Make `kind` openable (tests, plugins).  Replaces an earlier registration."""
    _registered[kind] = factory


def unregister(kind: str) -> None:
    _registered.pop(kind, None)


def kinds() -> list[str]:
    names = set(_BUILTIN) | set(_registered)
    try:
        names |= {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution's metadata must not hide the built-ins
        logger.exception("cannot read entry points %s", ENTRY_POINT_GROUP)
    return sorted(names)


def factory_for(kind: str) -> DriverFactory:
    if kind in _registered:
        return _registered[kind]
    if kind in _BUILTIN:
        return _load(_BUILTIN[kind], kind=kind)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            try:
                return cast(DriverFactory, ep.load())
            except Exception as e:
                raise errors.BackendUnavailable(f"driver kind {kind!r}: cannot load {ep.value}: {e}") from e
    raise errors.InvalidRequest(f"unknown array kind {kind!r} (known: {', '.join(kinds())})")


def _load(target: str, *, kind: str) -> DriverFactory:
    module, _, attr = target.partition(":")
    try:
        return cast(DriverFactory, getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError) as e:
        raise errors.BackendUnavailable(f"driver kind {kind!r}: cannot load {target}: {e}") from e


def create_driver(spec: ArraySpec) -> ArrayDriver:
    """Construct the driver for `spec` (no table applied; see open_array)."""
    return factory_for(spec.kind)(spec)


def open_array(spec: ArraySpec, *, table: abilities.AbilityTable | None = None
               ) -> tuple[ArrayDriver, ArrayInfo]:
    """Construct the driver for `spec` and describe the array, with the
    effective abilities: probe, then `table` (None: the packaged one), then
    spec.ability_overrides; masked to what the driver has code for."""
    driver = create_driver(spec)
    info = driver.describe()
    if table is None:
        table = abilities.load_table()
    wanted = abilities.effective_abilities(identity=info.identity, probed=info.probed, table=table,
                                           overrides=spec.ability_overrides)
    possible = implemented_abilities(driver) | _PROTOCOL_FREE
    effective = wanted & possible
    if wanted & ~possible:
        logger.warning("array %s: %s asked for but driver %s has no code for it",
                       spec.id, (wanted & ~possible).names(), spec.kind)
    if effective != info.probed:
        logger.info("array %s (%s): probed %s, effective %s", spec.id, info.identity.key(),
                    info.probed.names(), effective.names())
    return driver, dataclasses.replace(info, abilities=effective)


__all__ = ["ENTRY_POINT_GROUP", "DriverFactory", "register", "unregister", "kinds", "factory_for",
           "create_driver", "open_array"]
