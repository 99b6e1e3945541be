"""Arrays and their LUNs: the seed's physical volume table (drawing 5)."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_virtvol.model.ids import ArrayId, LunId


class Ability(enum.Flag):
    """What an array (or one LUN of it) can do by itself."""

    NONE = 0
    INTERNAL_COPY = enum.auto()   # snapshot/clone inside the array (seed: internal multiplexing)
    REMOTE_COPY = enum.auto()     # push a LUN to another array (seed: external multiplexing)
    DIRTY_TRACKING = enum.auto()  # changed-block tracking for differential resync
    GROW_LUN = enum.auto()        # a LUN can be grown in place

    @classmethod
    def from_names(cls, names: "list[str] | tuple[str, ...]") -> "Ability":
        out = cls.NONE
        for n in names:
            out |= cls[n.upper().replace("-", "_")]
        return out

    def names(self) -> list[str]:
        return [str(a.name).lower().replace("_", "-") for a in Ability if a.name and a in self and a.value]


ABILITY_NAMES = tuple(str(a.name).lower().replace("_", "-") for a in Ability if a.value)


class LunState(enum.Enum):
    """The seed's physical volume states ([0045]-[0046])."""

    INTACT = "intact"                        # holds no user data; may be assigned
    IN_USE = "in-use"                        # part of a virtual volume
    ACCESS_PROHIBITED = "access-prohibited"  # temporarily fenced (during a copy)
    FAILED = "failed"                        # unusable


class LunOrigin(enum.Enum):
    PROVISIONED = "provisioned"  # created by the driver; deleted when freed
    DISCOVERED = "discovered"    # found on the array; wiped and returned to intact when freed


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayIdentity:
    vendor: str
    model: str
    version: str

    def key(self) -> str:
        return f"{self.vendor}/{self.model}/{self.version}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ArraySpec:
    """How the administrator described an array (config file or StorageArray CR)."""

    id: ArrayId
    kind: str
    params: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    # per-array admin override: ability name -> forced on/off
    ability_overrides: Mapping[str, bool] = field(default_factory=dict)
    topology: Mapping[str, str] = field(default_factory=dict)


_SECRET_WORDS = ("secret", "password", "passwd", "passphrase", "token", "credential", "chap", "apikey",
                 "api_key", "privatekey", "private_key")


def is_secret_param(name: str) -> bool:
    """Whether an array parameter's name says it holds a secret (never written to a record)."""
    low = name.lower().replace("-", "_")
    return any(w in low or w in low.replace("_", "") for w in _SECRET_WORDS)


def public_params(params: Mapping[str, str]) -> dict[str, str]:
    """An array's parameters without the secret ones: what may be shown and stored."""
    return {k: v for k, v in params.items() if not is_secret_param(k)}


@dataclass(frozen=True, slots=True, kw_only=True)
class LunSummary:
    """One row of an array's LUN inventory, as last synchronised."""

    id: LunId
    size: int
    state: LunState
    origin: LunOrigin
    volume: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayInfo:
    """What the driver found out about an array."""

    id: ArrayId
    kind: str
    identity: ArrayIdentity
    probed: Ability
    abilities: Ability  # effective: probe, then vendor table, then admin override
    capacity_total: int
    capacity_free: int
    labels: Mapping[str, str] = field(default_factory=dict)
    topology: Mapping[str, str] = field(default_factory=dict)
    luns: tuple[LunSummary, ...] = ()  # the inventory at the last synchronisation ([0047])
    # the driver parameters it was opened with, secrets left out (`public_params`)
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyCost:
    """What an internal copy of one LUN would take from its array, asked before it is made
    (`InternalCopyCapable.internal_copy_cost`).

    `needs` is what the array must set aside at once to accept the copy (a reflink clone:
    the source's unwritten part, which the pool promises to the clone; a full copy: the
    source's size; a thin snapshot: nothing).  `room` is what the array can set aside for
    internal copies now.  `takes` is how much the array's `capacity_free` falls once the
    copy exists (what is left for LUNs provisioned next to it).
    """

    needs: int
    room: int
    takes: int

    @property
    def fits(self) -> bool:
        return self.needs <= self.room


@dataclass(frozen=True, slots=True, kw_only=True)
class Lun:
    """One physical volume."""

    array: ArrayId
    id: LunId
    size: int
    address: str  # how a host reaches it: a file path, a device, an nbd:// URI, ...
    state: LunState = LunState.INTACT
    origin: LunOrigin = LunOrigin.PROVISIONED
    volume: str = ""  # owning virtual volume (or snapshot) id, "" when intact

    @property
    def key(self) -> str:
        return lun_key(self.array, self.id)


def lun_key(array: ArrayId, lun: LunId) -> str:
    return f"{array}:{lun}"
