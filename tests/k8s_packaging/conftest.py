"""Fixtures for the Kubernetes packaging tests: helm and kubectl from
scripts/k8s-tools (installed once per machine, then offline), the chart
rendered with helm, the CRDs, and the wheel and sdist built from a fresh clone
with a venv that has the wheel installed (wheelbuild.py)."""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from k8s_helpers import CHART, NAMESPACE, RELEASE, ROOT, Doc, load_docs
from wheelbuild import Built, build_from_fresh_clone, fresh_venv, wheel_from_sdist

SNAPSHOT_API = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass"


@pytest.fixture(scope="session")
def k8s_bin() -> Path:
    out = subprocess.run([str(ROOT / "scripts" / "k8s-tools")], check=True,
                         capture_output=True, text=True, timeout=600)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def helm(k8s_bin: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(k8s_bin / "helm"), *args], capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p
    return run


@pytest.fixture(scope="session")
def render(helm: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., str]:
    """helm template of the chart with --set/--values options, CRDs included, for a cluster
    that serves the snapshot API (as `helm install` would find it there)."""
    def run(*opts: str) -> str:
        return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds",
                    "--api-versions", SNAPSHOT_API, *opts).stdout
    return run


@pytest.fixture(scope="session")
def default_docs(render: Callable[..., str]) -> list[Doc]:
    return load_docs(render())


@pytest.fixture(scope="session")
def crds() -> dict[str, Doc]:
    """Our CRDs by kind."""
    out = {}
    for p in sorted((CHART / "crds").glob("*.yaml")):
        for d in load_docs(p.read_text()):
            out[d["spec"]["names"]["kind"]] = d
    return out


@pytest.fixture(scope="session")
def all_crds(crds: dict[str, Doc]) -> dict[tuple[str, str], Doc]:
    """Ours plus the snapshot CRDs the chart and examples use, by (group, kind)."""
    out = {(d["spec"]["group"], k): d for k, d in crds.items()}
    for d in load_docs((Path(__file__).parent / "snapshot-crds.yaml").read_text()):
        out[(d["spec"]["group"], d["spec"]["names"]["kind"])] = d
    return out


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The wheel and the sdist, built from a fresh clone of HEAD."""
    return build_from_fresh_clone(tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="session")
def sdist_wheel(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from that sdist."""
    return wheel_from_sdist(built.sdist, tmp_path_factory.mktemp("from-sdist"))


@pytest.fixture(scope="session")
def wheel_venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with that wheel (as `pip install .` builds it) and its dependencies."""
    return fresh_venv(tmp_path_factory.mktemp("wheel-venv"), built.wheel)
