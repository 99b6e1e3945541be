"""deploy/ is exactly what scripts/render-deploy makes from the chart."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from k8s_helpers import ROOT

SCRIPT = ROOT / "scripts" / "render-deploy"


def check(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "--check", "--out", str(out)], capture_output=True, text=True, timeout=300)


def test_deploy_equals_a_fresh_render(k8s_bin: Path) -> None:
    p = check(ROOT / "deploy")
    assert p.returncode == 0, p.stdout + p.stderr


def test_check_notices_drift(k8s_bin: Path, tmp_path: Path) -> None:
    subprocess.run([str(SCRIPT), "--out", str(tmp_path)], check=True, timeout=300)
    assert check(tmp_path).returncode == 0
    f = tmp_path / "20-csi-virtvol.yaml"
    f.write_text(f.read_text().replace("replicas: 2", "replicas: 3"))
    p = check(tmp_path)
    assert p.returncode == 1 and "+  replicas: 2" in p.stdout


def test_deploy_is_ordered_for_kubectl_apply() -> None:
    kinds = {}
    for f in sorted((ROOT / "deploy").glob("*.yaml")):
        kinds[f.name] = {d["kind"] for d in yaml.safe_load_all(f.read_text()) if d}
    names = sorted(kinds)
    assert kinds[names[0]] == {"Namespace"}
    assert kinds[names[1]] == {"CustomResourceDefinition"}
    crs = [n for n in names if "StorageArray" in kinds[n]]
    assert crs and all(names.index(n) > 1 for n in crs)
    ns = next(d for d in yaml.safe_load_all((ROOT / "deploy" / names[0]).read_text()) if d)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
