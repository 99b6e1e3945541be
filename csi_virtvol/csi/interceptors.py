"""Logging and error translation for every RPC, in one place.

Servicers raise domain errors; only this interceptor turns them into gRPC
statuses.  Secrets are never logged.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from csi_virtvol import errors
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi.status import code_for

log = logging.getLogger("csi_virtvol.rpc")


def sanitize(msg: Message) -> str:
    """The request as text with every csi_secret field and every secrets map blanked."""
    clone = type(msg)()
    clone.CopyFrom(msg)
    _strip(clone)
    return text_format.MessageToString(clone, as_one_line=True)[:2000]


def _strip(msg: Message) -> None:
    for fd, value in list(msg.ListFields()):
        if fd.GetOptions().Extensions[pb.csi_secret]:  # type: ignore[index]
            msg.ClearField(fd.name)
            continue
        if fd.type != fd.TYPE_MESSAGE or fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            for item in value:
                _strip(item)
        else:
            _strip(value)


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is not None and handler.unary_stream is not None:
            return _stream_handler(handler, details.method)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method

        def call(request: Message, context: grpc.ServicerContext) -> Any:
            rid = uuid.uuid4().hex[:8]
            start = time.monotonic()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s rid=%s request: %s", method, rid, sanitize(request))
            try:
                response = inner(request, context)
            except errors.VirtvolError as e:
                code = code_for(e)
                level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
                log.log(level, "%s rid=%s -> %s: %s (%.0f ms)", method, rid, code.name, e,
                        (time.monotonic() - start) * 1000)
                context.abort(code, str(e))
            except NotImplementedError:
                # the generated base servicer: an RPC this plugin does not offer
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this plugin")
            except Exception as e:
                log.exception("%s rid=%s -> INTERNAL (%.0f ms)", method, rid, (time.monotonic() - start) * 1000)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            if not method.endswith("/Probe"):
                log.info("%s rid=%s -> OK (%.0f ms)", method, rid, (time.monotonic() - start) * 1000)
            return response

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _stream_handler(handler: Any, method: str) -> Any:
    """The same translation for server-streaming RPCs (SnapshotMetadata): an
    error raised while the stream is being produced ends it with its code."""
    inner = handler.unary_stream

    def call(request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
        rid = uuid.uuid4().hex[:8]
        start = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s rid=%s request: %s", method, rid, sanitize(request))
        sent = 0
        try:
            for response in inner(request, context):
                sent += 1
                yield response
        except errors.VirtvolError as e:
            code = code_for(e)
            level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "%s rid=%s -> %s after %d messages: %s (%.0f ms)", method, rid, code.name, sent, e,
                    (time.monotonic() - start) * 1000)
            context.abort(code, str(e))
        except NotImplementedError:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this plugin")
        except Exception as e:
            log.exception("%s rid=%s -> INTERNAL after %d messages (%.0f ms)", method, rid, sent,
                          (time.monotonic() - start) * 1000)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        log.info("%s rid=%s -> OK, %d messages (%.0f ms)", method, rid, sent, (time.monotonic() - start) * 1000)

    return grpc.unary_stream_rpc_method_handler(
        call, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
