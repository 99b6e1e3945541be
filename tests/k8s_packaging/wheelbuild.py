"""What a user installs, built the way they build it: a fresh `git clone` of this
repository's committed HEAD, a wheel built there (`pip wheel`, as `pip install .` and the
Dockerfile do), an sdist (`python -m build --sdist`) and the wheel built from that sdist,
and a fresh venv with the first wheel and its dependencies from PyPI (the shared pip cache).

Uncommitted changes are not in the clone: commit, then run the packaging tests."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from k8s_helpers import ROOT

GEN = "csi_virtvol/csi/_gen"
STUBS = tuple(f"{GEN}/{name}" for name in (
    "__init__.py", "csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py",
    "virtvol_pb2.py", "virtvol_pb2.pyi", "virtvol_pb2_grpc.py"))
PROTOS = ("proto/csi.proto", "proto/virtvol.proto")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout's venv or source on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run(argv: list[str], *, cwd: Path, timeout: float = 600) -> str:
    p = subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p.stdout


@dataclass(frozen=True, slots=True, kw_only=True)
class Built:
    commit: str
    clone: Path
    wheel: Path  # pip wheel of the clone: what `pip install .` installs
    sdist: Path  # python -m build --sdist of the clone


def one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {[f.name for f in found]}"
    return found[0]


def pip_wheel(source: Path, out: Path) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        cwd=out.parent)
    return one(out, "*.whl")


def build_from_fresh_clone(work: Path) -> Built:
    commit = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], cwd=ROOT).strip()
    clone = work / "clone"
    run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], cwd=work)
    run(["git", "-C", str(clone), "checkout", "--quiet", "--detach", commit], cwd=work)
    wheel = pip_wheel(clone, work / "wheel")
    run([sys.executable, "-m", "build", "--sdist", "--outdir", str(work / "sdist"), str(clone)], cwd=work)
    return Built(commit=commit, clone=clone, wheel=wheel, sdist=one(work / "sdist", "*.tar.gz"))


def wheel_from_sdist(sdist: Path, work: Path) -> Path:
    """What pip does with an sdist (and python -m build without --sdist/--wheel): unpack it,
    build the wheel in there."""
    with tarfile.open(sdist) as t:
        t.extractall(work / "unpacked", filter="data")
    return pip_wheel(one(work / "unpacked", "csi_virtvol-*"), work / "wheel")


def fresh_venv(work: Path, wheel: Path) -> Path:
    """A new venv (not this one, no access to the checkout) with `wheel` installed."""
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], cwd=work)
    return venv


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def wheel_file(wheel: Path, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(name)


def sdist_names(sdist: Path) -> set[str]:
    """Member names without the leading `csi_virtvol-VERSION/`."""
    with tarfile.open(sdist) as t:
        return {m.name.partition("/")[2] for m in t.getmembers() if m.isfile()}
