"""StorageClass / VolumeAttributesClass parameters: the declared set, parsed once."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_virtvol import errors
from csi_virtvol.config import parse_size
from csi_virtvol.model.allocation import ALIGN

# Keys the CO adds (external-provisioner --extra-create-metadata and friends).
CO_PREFIX = "csi.storage.k8s.io/"

CREATE_KEYS = {
    "arrays": "comma-separated array ids the volume may use, in preference order",
    "arraySelector": "comma-separated label=value pairs an array must carry",
    "layout": "auto (default) | single | concat",
    "maxExtentSize": "largest extent, e.g. 1Gi (concat only)",
    "fsType": "ext4 | xfs, when the capability does not name one",
}
# ControllerModifyVolume may change these (and CreateVolume accepts them as
# mutable_parameters from a VolumeAttributesClass).
MUTABLE_KEYS = {
    "maxExtentSize": "largest extent used by later expansions",
    "arrays": "arrays later expansions may use",
    "copyBandwidth": "bandwidth cap for host copies from this volume, e.g. 200Mi (bytes/s)",
}
LAYOUTS = ("auto", "single", "concat")
FS_TYPES = ("ext4", "xfs")


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    arrays: tuple[str, ...] = ()
    selector: Mapping[str, str] = field(default_factory=dict)
    layout: str = "auto"
    max_extent: int = 0


def user_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """The parameters that define the volume: CO metadata stripped."""
    return {k: v for k, v in params.items() if not k.startswith(CO_PREFIX)}


def check_keys(params: Mapping[str, str], allowed: Mapping[str, str], *, what: str) -> None:
    unknown = sorted(set(user_parameters(params)) - set(allowed))
    if unknown:
        raise errors.InvalidRequest(
            f"unknown {what} {', '.join(unknown)}; supported: {', '.join(sorted(allowed))}")


def placement(params: Mapping[str, str], mutable: Mapping[str, str] | None = None) -> Placement:
    check_keys(params, CREATE_KEYS, what="parameter")
    merged = dict(params)
    if mutable:
        check_keys(mutable, MUTABLE_KEYS, what="mutable parameter")
        merged.update(mutable)
    arrays = tuple(a.strip() for a in merged.get("arrays", "").split(",") if a.strip())
    selector: dict[str, str] = {}
    for pair in merged.get("arraySelector", "").split(","):
        if not pair.strip():
            continue
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise errors.InvalidRequest(f"arraySelector entry {pair!r} is not label=value")
        selector[k.strip()] = v.strip()
    layout = merged.get("layout", "auto")
    if layout not in LAYOUTS:
        raise errors.InvalidRequest(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    max_extent = parse_size(merged["maxExtentSize"]) if merged.get("maxExtentSize") else 0
    if max_extent and (max_extent < ALIGN or max_extent % ALIGN):
        raise errors.InvalidRequest(f"maxExtentSize must be a positive multiple of 1Mi, not {max_extent}")
    fs = merged.get("fsType", "")
    if fs and fs not in FS_TYPES:
        raise errors.InvalidRequest(f"fsType must be one of {', '.join(FS_TYPES)}, not {fs!r}")
    if "copyBandwidth" in merged:
        parse_size(merged["copyBandwidth"])
    return Placement(arrays=arrays, selector=selector, layout=layout, max_extent=max_extent)
