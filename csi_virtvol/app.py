"""The composition root: config -> store, arrays, services, servicers, server."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from csi_virtvol import errors
from csi_virtvol.config import Config, merge_arrays, parse_size
from csi_virtvol.model.volume import VirtualVolume
from csi_virtvol.copy.runner import CopyRunner, LocalCopyRunner
from csi_virtvol.services.events import EventSink
from csi_virtvol.services.groups import GroupService
from csi_virtvol.services.snapshots import SnapshotService
from csi_virtvol.services.arrays import ArrayPool
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.metadata import SnapshotMetadataService
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

        return crdstore.CrdStore(kube_client(config))
    raise errors.InvalidRequest(f"unknown store {config.store!r}: use sqlite or crd")


def kube_client(config: Config) -> Any:
    """The API client: `kubeApi` (no credentials), a `kubeconfig` file, or the pod's ServiceAccount."""
    from csi_virtvol.kube import crdstore

    return crdstore.api_client(host=config.kube_api or None, kubeconfig=config.kubeconfig or None)


def configured_arrays(config: Config, store: StateStore) -> Config:
    """On the CRD store the StorageArray objects an administrator (or the chart) made are
    array configuration too: read at start-up, each one in place of the --config entry of
    the same id, or added to them (docs/CRDS.md)."""
    if config.store != "crd":
        return config
    from csi_virtvol.kube import crdstore

    if not isinstance(store, crdstore.CrdStore):
        return config
    found = store.array_specs(node_id=config.node_id)
    if found:
        log.info("StorageArray objects configure arrays %s", ", ".join(a.id for a in found))
    return dataclasses.replace(config, arrays=merge_arrays(config.arrays, found))


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerCore:
    arrays: ArrayPool
    volumes: VolumeService
    publish: PublishService
    snapshots: SnapshotService
    groups: GroupService
    metadata: SnapshotMetadataService


def build_controller(config: Config, store: StateStore, locks: KeyedLocks, *,
                     runner: CopyRunner | None = None, events: EventSink | None = None,
                     is_leader: Callable[[], bool] = lambda: True) -> ControllerCore:
    arrays = ArrayPool(specs=config.arrays, store=store, table_path=config.ability_table)
    volumes = VolumeService(config=config, store=store, arrays=arrays, locks=locks)
    publish = PublishService(store=store, arrays=arrays, locks=locks)
    runner = runner or LocalCopyRunner(work_dir=os.path.join(config.data_dir, "copies"))
    snapshots = SnapshotService(store=store, arrays=arrays, locks=locks, volumes=volumes, runner=runner,
                                bwlimit=lambda v: copy_bandwidth(config, v), events=events, is_leader=is_leader)
    groups = GroupService(store=store, locks=locks, volumes=volumes, snapshots=snapshots)
    arrays.sync()
    single = config.store == "sqlite"  # one controller: nothing else can be half-way through a create
    if single or is_leader():
        volumes.recover()
        groups.recover()  # before resume: a group never cut is undone, not copied member by member
    snapshots.resume(orphan_age=0.0 if single else 60.0)
    return ControllerCore(arrays=arrays, volumes=volumes, publish=publish, snapshots=snapshots, groups=groups,
                          metadata=SnapshotMetadataService(volumes=volumes, arrays=arrays))


def copy_bandwidth(config: Config, vol: VirtualVolume) -> int:
    """A volume's copyBandwidth mutable parameter, else the driver-wide default."""
    own = vol.mutable_parameters.get("copyBandwidth", "")
    return parse_size(own) if own else config.copy_bandwidth


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterParts:
    runner: CopyRunner
    events: EventSink
    is_leader: Callable[[], bool]
    threads: tuple[Callable[[threading.Event], None], ...]


def cluster_parts(config: Config) -> ClusterParts:
    """On Kubernetes: copy Jobs, Events, and a Lease so one replica runs the copies."""
    from csi_virtvol.kube import copyrunner, crdstore, events, jobs, lease, sink

    api = kube_client(config)
    settings = copyrunner.JobSettings.from_config(config.copy_job, namespace=config.kube_namespace,
                                                  image=config.copy_image, node=config.node_id)
    job_runner = jobs.JobRunner(api, namespace=config.kube_namespace)
    runner = copyrunner.JobCopyRunner(job_runner, settings, owner_of=job_runner.pair_owner)
    recorder = sink.KubeEvents(events.EventRecorder(api, instance=config.pod_name))
    if not config.leader_election:
        return ClusterParts(runner=runner, events=recorder, is_leader=lambda: True, threads=())
    elector = lease.LeaderElector(api, namespace=config.kube_namespace, name=config.lease_name,
                                  identity=config.pod_name)

    def elect(stop: threading.Event) -> None:
        elector.run(stop=stop,
                    on_started_leading=lambda: log.info("%s leads: running copies", config.pod_name),
                    on_stopped_leading=lambda: log.warning("%s no longer leads", config.pod_name))

    return ClusterParts(runner=runner, events=recorder, is_leader=lambda: elector.is_leader, threads=(elect,))


def serve(config: Config, *, stop: threading.Event | None = None) -> int:
    from csi_virtvol.csi.controller import ControllerServicer
    from csi_virtvol.csi.group_controller import GroupControllerServicer
    from csi_virtvol.csi.identity import IdentityServicer
    from csi_virtvol.csi.node import NodeServicer
    from csi_virtvol.csi.pairs import MappingServicer, PairsServicer
    from csi_virtvol.csi.server import build_server
    from csi_virtvol.csi.snapshot_metadata import SnapshotMetadataServicer
    from csi_virtvol.services.node import NodeService

    store = open_store(config)
    locks = KeyedLocks()
    background = threading.Event()
    ready = threading.Event()
    loops: list[tuple[str, Callable[[threading.Event], None]]] = []
    controller = None
    pairs = None
    mapping = None
    metadata = None
    group_controller = None
    core = None
    parts: ClusterParts | None = None
    if config.mode.controller:
        config = configured_arrays(config, store)
        parts = cluster_parts(config) if config.store == "crd" else None
        core = build_controller(config, store, locks, runner=parts.runner if parts else None,
                                events=parts.events if parts else None,
                                is_leader=parts.is_leader if parts else (lambda: True))
        controller = ControllerServicer(volumes=core.volumes, publish=core.publish, snapshots=core.snapshots,
                                        groups=core.groups)
        pairs = PairsServicer(snapshots=core.snapshots)
        mapping = MappingServicer(volumes=core.volumes)
        metadata = SnapshotMetadataServicer(service=core.metadata)
        group_controller = GroupControllerServicer(groups=core.groups, snapshots=core.snapshots)
        loops += [(f"lease-{i}", t) for i, t in enumerate(parts.threads if parts else ())]
        loops.append(("reconcile", core.snapshots.reconcile))
        leader = parts.is_leader if parts else (lambda: True)
        arrays = core.arrays
        loops.append(("arrays", lambda stop: arrays.keep_synced(stop, is_leader=leader)))
    node = None
    if config.mode.node:
        node_service = NodeService(config=config, store=store, locks=locks)
        PublishService.register(store, node_record(config.node_id, config.node_topology,
                                                   node_service.max_volumes))
        node = NodeServicer(service=node_service)
        loops.append(("fences", node_service.fences.run))
        if config.store == "crd":  # copy pods' checkpoints on this node (services/checkpoints.py)
            from csi_virtvol.services import checkpoints
            ckdir = os.path.join(str(config.copy_job.get("hostDataDir") or
                                     os.path.dirname(config.data_dir.rstrip("/"))), "copy")
            loops.append(("checkpoints", lambda stop: checkpoints.keep_swept(stop, store=store, directory=ckdir)))
    threads = [threading.Thread(target=loop, args=(background,), name=name, daemon=True) for name, loop in loops]
    for t in threads:
        t.start()
    identity = IdentityServicer(controller=config.mode.controller, ready=ready.is_set,
                                snapshot_metadata=metadata is not None,
                                group_controller=group_controller is not None)
    server = build_server(endpoint=config.endpoint, identity=identity, controller=controller, node=node,
                          pairs=pairs, snapshot_metadata=metadata, group_controller=group_controller,
                          mapping=mapping)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # before the first Probe can say ready: a SIGTERM right after it stops cleanly
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server.start()
    ready.set()
    log.info("csi-virtvol serving (mode=%s, node=%s, store=%s, data-dir=%s)",
             config.mode.value, config.node_id, config.store, config.data_dir)
    stop.wait()
    log.info("stopping")
    server.stop(grace=10).wait()
    background.set()
    for t in threads:
        t.join(timeout=10)
    if core is not None:
        core.snapshots.close()
    if parts is not None:
        parts.runner.close()  # its watches
    store.close()
    return 0
