"""A small CSI client (like csc) for the command line and the demo."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from csi_virtvol import errors
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc

Mode = pb.VolumeCapability.AccessMode.Mode


def target(endpoint: str) -> str:
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
        return "unix://" + ("/" + path.lstrip("/"))
    return endpoint.removeprefix("tcp://")


class CallFailed(errors.BackendError):
    """An RPC the driver answered with an error; `code` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Client:
    def __init__(self, endpoint: str, *, timeout: float = 120.0) -> None:
        self._channel = grpc.insecure_channel(target(endpoint))
        self.identity = rpc.IdentityStub(self._channel)
        self.controller = rpc.ControllerStub(self._channel)
        self.node = rpc.NodeStub(self._channel)
        self.pairs = vrpc.PairsStub(self._channel)
        self.mapping = vrpc.MappingStub(self._channel)
        self.snapshot_metadata = rpc.SnapshotMetadataStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def call(self, method: Any, request: Message) -> dict[str, Any]:
        try:
            response = method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise CallFailed(e.code().name, e.details() or "") from e
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as e:
            raise errors.BackendUnavailable("the driver's endpoint did not come up") from e


def capability(*, block: bool = False, fs_type: str = "", readonly: bool = False) -> pb.VolumeCapability:
    mode = Mode.SINGLE_NODE_READER_ONLY if readonly else Mode.SINGLE_NODE_WRITER
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))
    if block:
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = fs_type
    return cap


def create_volume(name: str, size: int, *, parameters: Mapping[str, str], block: bool = False,
                  fs_type: str = "", source: str = "") -> pb.CreateVolumeRequest:
    req = pb.CreateVolumeRequest(name=name, parameters=dict(parameters),
                                 capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[capability(block=block, fs_type=fs_type)])
    kind, _, ident = source.partition(":")
    if kind == "snapshot":
        req.volume_content_source.snapshot.snapshot_id = ident
    elif kind == "volume":
        req.volume_content_source.volume.volume_id = ident
    return req


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


pb_ = pb  # re-exported for the CLI, which may not import the stubs itself
vpb_ = vpb
