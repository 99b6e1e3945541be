"""One value in sysfs or configfs, read or written."""
from __future__ import annotations

from csi_virtvol import errors


def read(path: str) -> str:
    """The attribute's text, stripped; "" when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def write(path: str, text: str) -> None:
    """Write `text` to the attribute.  FileNotFoundError (the object is gone) passes
    through for the caller to judge; any other failure is errors.BackendError."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise errors.BackendError(f"write {text!r} to {path}: {e}") from e


__all__ = ["read", "write"]
