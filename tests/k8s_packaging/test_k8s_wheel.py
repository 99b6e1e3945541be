"""The wheel and the sdist as a user gets them from a fresh clone (wheelbuild.py) carry the
generated gRPC stubs, and the installed wheel serves CSI.

The stubs are generated from proto/ at build time and never committed, so a build that
forgets them gives a package that imports fine as far as `--help` and dies on
`csi-virtvol serve`. Here the wheel is installed into a fresh venv, its `csi-virtvol serve`
runs on a unix socket, and real gRPC calls go to it: Identity Probe and GetPluginInfo,
Controller CreateVolume on the default file pools, DeleteVolume, then SIGTERM and a clean exit.
"""
from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from csi_virtvol import DRIVER_NAME
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from wheelbuild import GEN, PROTOS, STUBS, Built, clean_env, run, sdist_names, wheel_file, wheel_names

pytestmark = pytest.mark.slow

MiB = 1 << 20


def test_nothing_generated_is_committed(built: Built) -> None:
    tracked = run(["git", "-C", str(built.clone), "ls-files", GEN], cwd=built.clone).split()
    assert tracked == [], f"generated stubs are committed: {tracked}"


def test_the_wheel_has_the_stubs(built: Built) -> None:
    names = wheel_names(built.wheel)
    assert "csi_virtvol/cli.py" in names  # sanity: the listing is the package's
    missing = [s for s in STUBS if s not in names]
    assert missing == [], f"{built.wheel.name} (pip wheel of a fresh clone) lacks {missing}"


def test_the_sdist_has_the_stubs_and_the_protos(built: Built) -> None:
    names = sdist_names(built.sdist)
    missing = [s for s in (*STUBS, *PROTOS, "setup.py", "pyproject.toml") if s not in names]
    assert missing == [], f"{built.sdist.name} lacks {missing}"


def test_the_wheel_from_the_sdist_is_the_same(built: Built, sdist_wheel: Path) -> None:
    names = wheel_names(sdist_wheel)
    missing = [s for s in STUBS if s not in names]
    assert missing == [], f"{sdist_wheel.name} (built from the sdist) lacks {missing}"
    assert names == wheel_names(built.wheel), "the wheel from the sdist and the wheel from the clone differ"
    changed = [s for s in STUBS if wheel_file(sdist_wheel, s) != wheel_file(built.wheel, s)]
    assert changed == [], f"stubs that differ between the two wheels: {changed}"


def generated_for(wheel: Path) -> dict[str, Version]:
    """The oldest grpcio and protobuf runtime the wheel's stubs accept: each stub checks it at
    import (GRPC_GENERATED_VERSION; ValidateProtobufRuntimeVersion) and refuses older ones."""
    grpc_found, pb_found = [], []
    for name in STUBS:
        text = wheel_file(wheel, name).decode()
        grpc_found += re.findall(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.M)
        pb_found += [".".join(m) for m in re.findall(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)]
    assert grpc_found and pb_found, "no version checks found in the stubs"
    return {"grpcio": max(map(Version, grpc_found)), "protobuf": max(map(Version, pb_found))}


def test_the_wheel_requires_what_its_stubs_need(built: Built) -> None:
    """Otherwise pip keeps an older grpcio or protobuf that satisfies the wheel's metadata,
    and serve dies at import of the stubs."""
    dist_info = next(n for n in wheel_names(built.wheel) if n.endswith(".dist-info/METADATA"))
    metadata = wheel_file(built.wheel, dist_info).decode()
    reqs = {r.name.lower(): r for r in map(Requirement, re.findall(r"^Requires-Dist: (.+)$", metadata, re.M))
            if r.marker is None}
    for dist, needed in generated_for(built.wheel).items():
        assert dist in reqs, f"the wheel does not require {dist}"
        spec = reqs[dist].specifier
        floors = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
        assert floors and max(floors) >= needed, \
            f"the wheel requires {dist}{spec}, but its stubs refuse {dist} older than {needed}"
        assert spec.contains(needed), f"the wheel requires {dist}{spec}, which excludes {needed}"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short directory: a unix socket path has to fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="vv-wheel-") as d:
        yield Path(d)


def test_the_installed_wheel_serves_csi(wheel_venv: Path, built: Built, scratch: Path) -> None:
    py, exe = wheel_venv / "bin" / "python", wheel_venv / "bin" / "csi-virtvol"
    where = run([str(py), "-c", "import csi_virtvol; print(csi_virtvol.__file__)"],
                cwd=scratch).strip()
    assert where.startswith(str(wheel_venv) + "/"), f"the venv imports csi_virtvol from {where}, not its own"
    version = run([str(py), "-c", "import importlib.metadata as m; print(m.version('csi-virtvol'))"],
                  cwd=scratch).strip()

    sock, data, log = scratch / "csi.sock", scratch / "data", scratch / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(exe), "serve", "--endpoint", f"unix://{sock}", "--data-dir", str(data),
                                   "--node-id", "wheel-node"], cwd=scratch, env=clean_env(),
                                  stdout=out, stderr=subprocess.STDOUT)

    def log_text() -> str:
        return log.read_text()[-4000:]

    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert server.poll() is None, f"csi-virtvol serve exited with {server.returncode}:\n{log_text()}"
            assert time.monotonic() < deadline, f"no socket after 60 s:\n{log_text()}"
            time.sleep(0.1)
        grpc.channel_ready_future(channel).result(timeout=30)
        identity, controller = rpc.IdentityStub(channel), rpc.ControllerStub(channel)

        probe = identity.Probe(pb.ProbeRequest(), timeout=30)
        assert probe.HasField("ready") and probe.ready.value, probe
        info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
        assert (info.name, info.vendor_version) == (DRIVER_NAME, version)

        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        cap.mount.fs_type = "ext4"
        vol = controller.CreateVolume(pb.CreateVolumeRequest(
            name="wheel-volume", capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
            volume_capabilities=[cap]), timeout=60).volume
        assert vol.volume_id and vol.capacity_bytes == 64 * MiB, vol
        luns = sorted(data.glob("arrays/pool-*/luns/*"))
        assert luns, f"no LUN file in the default pools under {data}/arrays"
        assert sum(f.stat().st_size for f in luns) == 64 * MiB, [(f.name, f.stat().st_size) for f in luns]

        controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60)
        left = sorted(str(f.relative_to(data)) for f in data.glob("arrays/pool-*/luns/*"))
        assert left == [], f"DeleteVolume left LUN files: {left}"
    finally:
        channel.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise AssertionError(f"csi-virtvol serve did not stop within 30 s of SIGTERM:\n{log_text()}") from None
    assert code == 0, f"csi-virtvol serve exited with {code}:\n{log_text()}"
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
