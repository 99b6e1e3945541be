"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket).

One `QmpSession` is one connection: greeting, ``qmp_capabilities``, then
``execute`` calls answered in order; asynchronous events are collected in
`events` and otherwise ignored.  A qemu-storage-daemon monitor serves one
client at a time, so callers open a session per operation and close it at once
(``with qmp_session(path) as qmp: ...``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

from csi_virtvol import errors

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 60.0


class QmpError(errors.BackendError):
    """QEMU answered a command with an error (`klass` is its QMP error class)."""

    def __init__(self, *, command: str, klass: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {klass}: {desc}")
        self.command = command
        self.klass = klass
        self.desc = desc


class QmpSession:
    def __init__(self, path: str, *, timeout: float = REPLY_TIMEOUT) -> None:
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(CONNECT_TIMEOUT)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise errors.BackendUnavailable(f"QMP socket {path}: {e}") from e
        self._sock.settimeout(timeout)
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        try:
            greeting = self._read()
            if "QMP" not in greeting:
                raise errors.BackendError(f"QMP socket {path}: no greeting, got {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        logger.debug("QMP %s -> %s", self._path, msg)
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise errors.BackendUnavailable(f"QMP socket {self._path}: send {command}: {e}") from e
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(command=command, klass=str(err.get("class", "")),
                               desc=str(err.get("desc", "")))
            if "return" in reply:
                return reply["return"]
            raise errors.BackendError(f"QMP {command}: unexpected reply {reply!r}")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise errors.BackendUnavailable(f"QMP socket {self._path}: {e}") from e
            if not chunk:
                raise errors.BackendUnavailable(f"QMP socket {self._path}: closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise errors.BackendError(f"QMP socket {self._path}: bad JSON {line[:200]!r}") from e
        if not isinstance(obj, dict):
            raise errors.BackendError(f"QMP socket {self._path}: not an object: {line[:200]!r}")
        return obj


@contextlib.contextmanager
def qmp_session(path: str, *, timeout: float = REPLY_TIMEOUT) -> Iterator[QmpSession]:
    session = QmpSession(path, timeout=timeout)
    try:
        yield session
    finally:
        session.close()


__all__ = ["QmpError", "QmpSession", "qmp_session"]
