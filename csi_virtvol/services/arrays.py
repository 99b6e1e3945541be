"""The arrays this controller manages: opened once, probed, kept in the store.

This is where the seed's physical volume table (120) is kept in step with the
arrays ("taking a synchronization", [0047]): `sync()` records each array's
identity, effective abilities and capacity, and every LUN found on it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from collections.abc import Iterable, Mapping, Sequence

from csi_virtvol import errors
from csi_virtvol.backends import abilities as ability_table
from csi_virtvol.backends import registry
from csi_virtvol.backends.base import ArrayDriver
from csi_virtvol.model.array import ArrayInfo, ArraySpec, Lun, LunOrigin, LunState, LunSummary, public_params
from csi_virtvol.model.ids import ArrayId
from csi_virtvol.store import base as store_base
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

# LUNs the driver provisions are named after their volume ("vv-..."/"vs-...").
OWNED_PREFIXES = ("vv-", "vs-")
INVENTORY_MAX = 500  # LUNs listed in an array's record


class ArrayPool:
    def __init__(self, *, specs: Sequence[ArraySpec], store: StateStore, table_path: str = "") -> None:
        self._store = store
        self._table = ability_table.load_table(table_path or None)
        self._drivers: dict[ArrayId, ArrayDriver] = {}
        self._infos: dict[ArrayId, ArrayInfo] = {}
        self._specs = {s.id: s for s in specs}
        for spec in specs:
            driver = registry.create_driver(spec)
            self._drivers[spec.id] = driver
            info = self._infos[spec.id] = self._effective(driver)
            log.info("array %s (%s): %s; abilities probed=%s effective=%s; %d of %d bytes free",
                     spec.id, spec.kind, info.identity.key(), info.probed.names() or ["none"],
                     info.abilities.names() or ["none"], info.capacity_free, info.capacity_total)

    # -- look-ups ---------------------------------------------------------
    def ids(self) -> list[ArrayId]:
        return list(self._drivers)

    def driver(self, array: ArrayId) -> ArrayDriver:
        try:
            return self._drivers[array]
        except KeyError as e:
            raise errors.NotFound(f"array {array} is not configured") from e

    def spec(self, array: ArrayId) -> ArraySpec:
        return self.driver(array).spec

    def info(self, array: ArrayId, *, fresh: bool = True) -> ArrayInfo:
        if fresh:
            driver = self.driver(array)
            self._infos[array] = self._effective(driver)
        return self._infos[array]

    def _effective(self, driver: ArrayDriver) -> ArrayInfo:
        probed = driver.describe()
        spec = driver.spec
        abilities = ability_table.effective_abilities(
            identity=probed.identity, probed=probed.probed, table=self._table,
            overrides=spec.ability_overrides)
        return dataclasses.replace(probed, abilities=abilities, labels=dict(spec.labels),
                                   topology=dict(spec.topology), params=public_params(spec.params))

    def infos(self, *, fresh: bool = True) -> list[ArrayInfo]:
        return [self.info(a, fresh=fresh) for a in self._drivers]

    def select(self, *, names: Iterable[str] = (), selector: Mapping[str, str] | None = None,
               topology_ok: "TopologyFilter | None" = None) -> list[ArrayInfo]:
        """Eligible arrays, in the order asked for (names) or configured."""
        wanted = list(names)
        for n in wanted:
            if ArrayId(n) not in self._drivers:
                raise errors.InvalidRequest(f"parameter arrays names unknown array {n!r}; known: {', '.join(self._drivers)}")
        order = [ArrayId(n) for n in wanted] if wanted else list(self._drivers)
        out = []
        for aid in order:
            info = self.info(aid)
            if selector and any(info.labels.get(k) != v for k, v in selector.items()):
                continue
            if topology_ok is not None and not topology_ok(info.topology):
                continue
            out.append(info)
        return out

    # -- the physical volume table ----------------------------------------
    def sync(self) -> None:
        """Record arrays and LUNs found on them; a LUN nobody owns becomes intact.
        Each array's record then carries its LUN inventory and capacity as of now."""
        for info in self.infos():
            for lun in self.driver(info.id).list_luns():
                if lun.id.startswith(OWNED_PREFIXES):
                    continue  # recovery decides about our own LUNs
                if self._store.get(store_base.LUNS, lun.key) is None:
                    found = Lun(array=lun.array, id=lun.id, size=lun.size, address=lun.address,
                                state=LunState.INTACT, origin=LunOrigin.DISCOVERED)
                    try:
                        self._store.create(store_base.LUNS, found)
                        log.info("array %s: found intact LUN %s (%d bytes)", info.id, lun.id, lun.size)
                    except errors.Conflict:
                        pass
            # at most INVENTORY_MAX LUNs (by id): a StorageArray object must stay far below the API
            # server's object size limit with 10,000s of LUNs; the LUN records have them all
            inventory = tuple(
                LunSummary(id=r.value.id, size=r.value.size, state=r.value.state, origin=r.value.origin,
                           volume=r.value.volume)
                for r in self._store.find(store_base.LUNS, index="array", value=info.id)[:INVENTORY_MAX])
            store_base.upsert(self._store, store_base.ARRAYS, dataclasses.replace(info, luns=inventory))

    def keep_synced(self, stop: "threading.Event", *, period: float = 30.0,
                    is_leader: "Callable[[], bool]" = lambda: True) -> None:
        """Refresh the arrays' records (capacity, LUN inventory) now and then."""
        while not stop.wait(period):
            if is_leader():
                try:
                    self.sync()
                except errors.VirtvolError as e:
                    log.warning("array sync: %s", e)


class TopologyFilter:
    """Does an array's topology satisfy a CSI TopologyRequirement?"""

    def __init__(self, segments: Sequence[Mapping[str, str]]) -> None:
        self._segments = list(segments)

    def __call__(self, topology: Mapping[str, str]) -> bool:
        if not self._segments or not topology:
            return True
        return any(all(seg.get(k) == v for k, v in topology.items()) for seg in self._segments)
