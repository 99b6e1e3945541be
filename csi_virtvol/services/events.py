"""Telling users what a copy is doing, on the objects they look at.

On Kubernetes the sink records Events on the VolumeSnapshot or PVC named by
the CO's extra-create-metadata parameters; standalone it only logs.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

log = logging.getLogger(__name__)

class EventSink(Protocol):
    def emit(self, *, parameters: Mapping[str, str], reason: str, message: str, warning: bool = False) -> None:
        """`parameters` are the CreateVolume/CreateSnapshot parameters, which name the CO object."""


class LogEvents:
    def emit(self, *, parameters: Mapping[str, str], reason: str, message: str, warning: bool = False) -> None:
        log.log(logging.WARNING if warning else logging.INFO, "event %s: %s", reason, message)
