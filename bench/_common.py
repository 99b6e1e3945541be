"""What the benchmarks share: the plugin subprocess, shell calls, mount and machine facts.

Imported by the bench scripts, which run as scripts (``.venv/bin/python bench/bench_X.py``)
and put the repository root and this directory on ``sys.path`` before importing it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import yaml  # noqa: E402

from csi_virtvol.csi._gen import csi_pb2 as pb  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc  # noqa: E402
from csi_virtvol.store.sqlite import SqliteStore  # noqa: E402


class Plugin:
    """``csi-virtvol serve`` (mode all, sqlite store in ``work/data``) as a subprocess, with one
    file pool per entry of `arrays` (array id -> pool directory), ready to answer over gRPC on a
    unix socket.  `close()` stops it and removes the socket; the log stays in ``work/server.log``."""

    def __init__(self, *, work: Path, arrays: dict[str, Path], labels: dict[str, str] | None = None,
                 sock_prefix: str = "virtvol-bench") -> None:
        self.sock = f"/tmp/{sock_prefix}-{uuid.uuid4().hex[:10]}.sock"
        self.data = work / "data"
        self.log = work / "server.log"
        cfg = work / "config.yaml"
        cfg.write_text(yaml.safe_dump({"arrays": [
            {"id": array_id, "kind": "file", "params": {"path": str(path)}, "labels": dict(labels or {})}
            for array_id, path in arrays.items()]}))
        exe = ROOT / ".venv" / "bin" / "csi-virtvol"
        argv = [str(exe) if exe.exists() else "csi-virtvol", "serve", "--endpoint", f"unix://{self.sock}",
                "--data-dir", str(self.data), "--node-id", "bench-node", "--config", str(cfg)]
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            self.close()
            raise SystemExit(f"plugin did not start; log:\n{self.log_tail()}")
        self.identity = rpc.IdentityStub(self.channel)
        self.controller = rpc.ControllerStub(self.channel)
        deadline = time.monotonic() + 30
        while not self.identity.Probe(pb.ProbeRequest()).ready.value:
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit("plugin never became ready")
            time.sleep(0.05)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"plugin exited with {self.proc.returncode}; log:\n{self.log_tail()}")

    def store(self) -> SqliteStore:
        """The plugin's state.db, read-only (safe while it runs: sqlite WAL)."""
        return SqliteStore(str(self.data / "state.db"), readonly=True)

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)


def arg_parser(doc: str, *, quick_help: str, dir_help: str) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` and ``--dir`` (work directory parent, default
    /var/tmp); the description is the first paragraph of the script's docstring `doc`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--dir", default="/var/tmp", help=dir_help)
    return ap


def mount_cap() -> pb.VolumeCapability:
    """A single-node-writer ext4 mount capability, as a CreateVolume from a PVC carries."""
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    cap.mount.fs_type = "ext4"
    return cap


def sh(*argv: str) -> str:
    """Run a command; its stripped stdout, or exit the benchmark with its stderr."""
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


def describe_fs(path: Path) -> str:
    """'ext4 /dev/vda (rw,relatime)' for the mount holding `path`."""
    best = ("?", "?", "?", "")
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            mp = fields[4].replace("\\040", " ")
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[3]):
                best = (rfields[0], rfields[1], fields[5], mp)
    return f"{best[0]} {best[1]} ({best[2]})"


def machine_facts() -> list[str]:
    """Markdown list lines: date, CPUs and RAM, kernel and OS, python, grpcio and the commit."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024 // 1024} GiB"
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "?"
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, {mem} RAM",
        f"- kernel: {platform.release()}; {platform.freedesktop_os_release().get('PRETTY_NAME', '?')}",
        f"- python {platform.python_version()}, grpcio {grpc.__version__}, csi-virtvol at {commit}",
    ]
