"""The one way the node layer runs host tools: failures become errors.BackendError."""
from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

from csi_virtvol import errors

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run argv; raise errors.BackendError (with stderr) when it fails and check is set."""
    cmd = list(argv)
    logger.debug("run: %s", shlex.join(cmd))
    try:
        return subprocess.run(
            cmd, input=input, capture_output=True, text=True, check=check, timeout=timeout,
        )
    except subprocess.CalledProcessError as e:
        detail = " | ".join((e.stderr or e.stdout or "").strip().splitlines()[:3])[:600]
        raise errors.BackendError(
            f"{shlex.join(cmd)} failed with exit {e.returncode}: {detail}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise errors.BackendError(f"{shlex.join(cmd)} timed out after {timeout:g}s") from e
    except OSError as e:
        raise errors.BackendError(f"cannot run {cmd[0]}: {e}") from e
