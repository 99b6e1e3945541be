"""The services' failure points: csi_virtvol/failpoints.py (one set for every layer)."""
from csi_virtvol.failpoints import hit

__all__ = ["hit"]
