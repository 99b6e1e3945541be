"""The composition root: config -> store, arrays, services, servicers, server."""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.config import Config, parse_size
from csi_virtvol.model.volume import VirtualVolume
from csi_virtvol.services.copying import LocalCopyRunner
from csi_virtvol.services.snapshots import SnapshotService
from csi_virtvol.services.arrays import ArrayPool
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.publish import PublishService, node_record
from csi_virtvol.services.volumes import VolumeService
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)


def open_store(config: Config) -> StateStore:
    if config.store == "sqlite":
        from csi_virtvol.store.sqlite import SqliteStore

        os.makedirs(config.data_dir, exist_ok=True)
        return SqliteStore(config.state_path)
    if config.store == "crd":
        from csi_virtvol.kube import crdstore

        return crdstore.CrdStore(crdstore.api_client())
    raise errors.InvalidRequest(f"unknown store {config.store!r}: use sqlite or crd")


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerCore:
    arrays: ArrayPool
    volumes: VolumeService
    publish: PublishService
    snapshots: SnapshotService


def build_controller(config: Config, store: StateStore, locks: KeyedLocks) -> ControllerCore:
    arrays = ArrayPool(specs=config.arrays, store=store, table_path=config.ability_table)
    volumes = VolumeService(config=config, store=store, arrays=arrays, locks=locks)
    publish = PublishService(store=store, arrays=arrays, locks=locks)
    runner = LocalCopyRunner(work_dir=os.path.join(config.data_dir, "copies"))
    snapshots = SnapshotService(store=store, arrays=arrays, locks=locks, volumes=volumes, runner=runner,
                                bwlimit=lambda v: copy_bandwidth(config, v))
    arrays.sync()
    volumes.recover()
    snapshots.resume()
    return ControllerCore(arrays=arrays, volumes=volumes, publish=publish, snapshots=snapshots)


def copy_bandwidth(config: Config, vol: VirtualVolume) -> int:
    """A volume's copyBandwidth mutable parameter, else the driver-wide default."""
    own = vol.mutable_parameters.get("copyBandwidth", "")
    return parse_size(own) if own else config.copy_bandwidth


def serve(config: Config, *, stop: threading.Event | None = None) -> int:
    from csi_virtvol.csi.controller import ControllerServicer
    from csi_virtvol.csi.identity import IdentityServicer
    from csi_virtvol.csi.node import NodeServicer
    from csi_virtvol.csi.server import build_server
    from csi_virtvol.services.node import NodeService

    store = open_store(config)
    locks = KeyedLocks()
    stop_fences = threading.Event()
    ready = threading.Event()
    controller = None
    if config.mode.controller:
        core = build_controller(config, store, locks)
        controller = ControllerServicer(volumes=core.volumes, publish=core.publish, snapshots=core.snapshots)
    node = None
    if config.mode.node:
        PublishService.register(store, node_record(config.node_id, config.node_topology,
                                                   config.max_volumes_per_node))
        node_service = NodeService(config=config, store=store, locks=locks)
        node = NodeServicer(service=node_service)
        keeper = threading.Thread(target=node_service.fences.run, args=(stop_fences,), name="fences", daemon=True)
        keeper.start()
    identity = IdentityServicer(controller=config.mode.controller, ready=ready.is_set)
    server = build_server(endpoint=config.endpoint, identity=identity, controller=controller, node=node)
    server.start()
    ready.set()
    log.info("csi-virtvol serving (mode=%s, node=%s, store=%s, data-dir=%s)",
             config.mode.value, config.node_id, config.store, config.data_dir)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    server.stop(grace=10).wait()
    stop_fences.set()
    if controller is not None:
        core.snapshots.close()
    store.close()
    return 0
