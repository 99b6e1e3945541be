"""The gRPC server: one unix (or tcp) endpoint, the servicers for the mode."""
from __future__ import annotations

import logging
import os
import stat
from concurrent import futures

import grpc

from csi_virtvol import errors
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from csi_virtvol.csi.interceptors import ErrorInterceptor

log = logging.getLogger(__name__)


def listen_address(endpoint: str) -> str:
    """unix:///path or unix:/path or tcp://host:port -> a grpc address; stale sockets removed."""
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        if not path.startswith("/"):
            raise errors.InvalidRequest(f"endpoint {endpoint}: unix socket path must be absolute")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return "unix://" + path
    if endpoint.startswith("tcp://"):
        return endpoint[len("tcp://"):]
    raise errors.InvalidRequest(f"endpoint {endpoint!r} must start with unix:// or tcp://")


def build_server(*, endpoint: str, identity: rpc.IdentityServicer, controller: rpc.ControllerServicer | None,
                 node: rpc.NodeServicer | None, pairs: vrpc.PairsServicer | None = None,
                 snapshot_metadata: rpc.SnapshotMetadataServicer | None = None,
                 group_controller: rpc.GroupControllerServicer | None = None,
                 mapping: vrpc.MappingServicer | None = None,
                 workers: int = 16) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi"),
                         interceptors=[ErrorInterceptor()])
    rpc.add_IdentityServicer_to_server(identity, server)
    if controller is not None:
        rpc.add_ControllerServicer_to_server(controller, server)
    if group_controller is not None:
        rpc.add_GroupControllerServicer_to_server(group_controller, server)
    if node is not None:
        rpc.add_NodeServicer_to_server(node, server)
    if pairs is not None:
        vrpc.add_PairsServicer_to_server(pairs, server)
    if mapping is not None:
        vrpc.add_MappingServicer_to_server(mapping, server)
    if snapshot_metadata is not None:
        rpc.add_SnapshotMetadataServicer_to_server(snapshot_metadata, server)
    address = listen_address(endpoint)
    if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
        raise errors.BackendUnavailable(f"cannot listen on {endpoint}")
    log.info("listening on %s", endpoint)
    return server
