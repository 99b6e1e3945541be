"""NBD addresses: where a server listens, and the URIs of its exports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from csi_virtvol import errors


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdServer:
    """Where a daemon's NBD server listens."""

    unix: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> "NbdServer":
        if text.startswith("unix:"):
            return cls(unix=text[len("unix:"):])
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise errors.InvalidRequest(f"nbd address {text!r} is neither unix:/path nor HOST:PORT")
        return cls(host=host.strip("[]"), port=int(port))

    def uri(self, export: str) -> str:
        if self.unix:
            return f"nbd+unix:///{export}?socket={self.unix}"
        return f"nbd://{self.host}:{self.port}/{export}"

    def qapi(self) -> dict[str, Any]:
        """A SocketAddress (the flat form blockdev-add and nbd-server-start share)."""
        if self.unix:
            return {"type": "unix", "path": self.unix}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    def qapi_legacy(self) -> dict[str, Any]:
        """A SocketAddressLegacy (nbd-server-start's form)."""
        flat = self.qapi()
        kind = flat.pop("type")
        return {"type": kind, "data": flat}

    def cli(self) -> str:
        if self.unix:
            return f"addr.type=unix,addr.path={esc(self.unix)}"
        return f"addr.type=inet,addr.host={esc(self.host)},addr.port={self.port}"


def parse_nbd_uri(uri: str) -> tuple[NbdServer, str]:
    """``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT`` -> (server, export)."""
    parts = urlsplit(uri)
    export = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.scheme == "nbd+unix":
        sock = parse_qs(parts.query).get("socket", [""])[0]
        if not sock:
            raise errors.InvalidRequest(f"NBD URI {uri!r} has no socket=")
        return NbdServer(unix=sock), export
    if parts.scheme == "nbd" and parts.hostname:
        return NbdServer(host=parts.hostname, port=parts.port or 10809), export
    raise errors.InvalidRequest(f"not an NBD URI this driver can reach: {uri!r}")


def esc(value: str) -> str:
    """A value inside a QEMU command-line option list (commas doubled)."""
    return value.replace(",", ",,")


__all__ = ["NbdServer", "parse_nbd_uri", "esc"]
