"""`csi-virtvol demo` run as a user runs it (the installed command, as root), and read as a
newcomer reads it: two arrays of different abilities, one volume with extents on both, a
snapshot whose plan has an internal and a host row, a restore and a clone each
byte-identical to its reference; then nothing of it left on the machine, also when it is
interrupted halfway."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

CLI = str(Path(sys.executable).with_name("csi-virtvol"))
RUN_TIMEOUT = 150


def leftovers(root: Path) -> list[str]:
    """Everything of the demo's still on the machine: files, mounts, loop devices, processes."""
    where = str(root) + "/"
    found = [f"file {p}" for p in root.iterdir()] if root.exists() else []
    with open("/proc/self/mountinfo") as fh:
        found += [f"mount {ln.split()[4]}" for ln in fh if ln.split()[4].startswith(where)]
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True,
                           check=True).stdout
    found += [f"loop {ln.strip()}" for ln in loops.splitlines() if where in ln]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if where in cmd and int(pid) != os.getpid():
            found.append(f"process {pid}: {cmd}")
    return found


def _sweep(root: Path) -> None:
    """Take down what a failed demo left, so the machine stays usable; the test has failed already."""
    for item in leftovers(root):
        kind, _, rest = item.partition(" ")
        if kind == "process":
            subprocess.run(["kill", "-9", rest.split(":")[0]], check=False)
    for item in sorted(leftovers(root), reverse=True):
        kind, _, rest = item.partition(" ")
        if kind == "mount":
            subprocess.run(["fsfreeze", "--unfreeze", rest], capture_output=True, check=False)
            subprocess.run(["umount", "-l", rest], check=False)
    for item in leftovers(root):
        kind, _, rest = item.partition(" ")
        if kind == "loop":
            subprocess.run(["losetup", "-d", rest.split()[0]], check=False)


@pytest.fixture
def tmpdir_for_demo(tmp_path: Path) -> Iterator[Path]:
    """The demo's TMPDIR: it makes its work dir here, and must leave it empty."""
    root = tmp_path / "tmp"
    root.mkdir()
    yield root
    _sweep(root)


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(root), "VIRTVOL_LOG_LEVEL": "warning"}


def sections(out: str) -> dict[str, str]:
    """The demo's output by step: '== title' -> the lines under it."""
    parts = re.split(r"^== ", out, flags=re.M)
    return {p.splitlines()[0]: p for p in parts[1:]}


def section(out: str, start: str) -> str:
    found = [body for title, body in sections(out).items() if title.startswith(start)]
    assert found, f"no step '{start}' in the output:\n{out}"
    return found[0]


def test_demo_shows_the_mission_and_leaves_nothing(tmpdir_for_demo: Path) -> None:
    run = Running(tmpdir_for_demo)
    rc = run.finish(RUN_TIMEOUT)
    out = run.output()
    assert rc == 0, f"rc={rc}\n{out}"

    # one volume, an extent on each array; the arrays' abilities as the driver probed them
    vol = section(out, "one 128 MiB volume over both arrays")
    assert re.search(r"^\s+0\s+xfs\s+\S+\s+0\.0 MiB\s+64\.0 MiB\s+internal-copy", vol, re.M), vol
    assert re.search(r"^\s+1\s+ext4\s+\S+\s+0\.0 MiB\s+64\.0 MiB\s+grow-lun$", vol, re.M), vol
    assert re.search(r"^extents on both arrays: xfs, ext4$", vol, re.M), vol

    # the snapshot of the volume in use, planned per extent, done
    snap = section(out, "snapshot it while the writer keeps writing")
    assert re.search(r"^\s+0\s+internal\s+xfs\s+64\.0 MiB\s+100%\s+done$", snap, re.M), snap
    assert re.search(r"^\s+1\s+host\s+ext4\s+64\.0 MiB\s+100%\s+done$", snap, re.M), snap
    assert re.search(r"^\s+snapshot demo-snapshot: +\d+% \(", snap, re.M), "no progress while it copied"
    assert re.search(r"split, cut at [\d:.]+, fence released$", snap, re.M), snap

    # the restore against the snapshot's image, and the image against the writer's log at the cut
    restore = section(out, "restore the snapshot")
    assert re.search(r"^restore: byte-identical to the snapshot's image \(128 MiB, sha256 [0-9a-f]{16}\)$",
                     restore, re.M), restore
    m = re.search(r"^\s+data\.bin: identical; log\.bin: records 0\.\.(\d+): all (\d+) acknowledged before "
                  r"the cut( \(\+1 in flight at the cut\))?, none of the (\d+) written after it$", restore, re.M)
    assert m, restore
    assert int(m.group(2)) > 0 and int(m.group(4)) > 0, "the writer must run on both sides of the cut"

    # the clone onto ext4, against the quiesced source
    clone = section(out, "clone the volume onto the ext4 array")
    assert re.search(r"^\s+0\s+host\s+xfs -> ext4\s+64\.0 MiB\s+100%\s+done$", clone, re.M), clone
    assert re.search(r"^clone: byte-identical to the source \(128 MiB on ext4, sha256 [0-9a-f]{16}\)$", clone, re.M)

    assert "LUN files left on the arrays: 0" in out
    assert out.rstrip().endswith("demo finished: OK"), out[-500:]
    assert leftovers(tmpdir_for_demo) == []


class Running:
    """The demo as a child process, its output (stdout; the log, warnings and up, apart)
    collected line by line by a thread, so that a demo that hangs fails the test instead."""

    def __init__(self, root: Path) -> None:
        self.log = root.parent / "demo-stderr.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([CLI, "demo"], stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=env_for(root))
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, ln) for ln in self.lines):
            assert self.proc.poll() is None, "the demo ended before: " + "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s: " + "\n".join(self.lines)
            time.sleep(0.05)

    def output(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout: float = 90) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            pytest.fail(f"the demo did not end within {timeout}s:\n{self.output()}\n"
                        f"stderr:\n{self.log.read_text()[-3000:]}")
        self._t.join(timeout=10)  # a process left holding its stdout would keep this open: not waited for
        return rc


@pytest.mark.parametrize(("sig", "at"), [
    (signal.SIGINT, r"^\s+snapshot demo-snapshot: +\d+% "),       # Ctrl-C while the snapshot copies
    (signal.SIGTERM, r"^\s+volume demo-clone from volume \S+: +\d+% "),  # a stop while the clone copies
], ids=["sigint-during-snapshot", "sigterm-during-clone"])
def test_an_interrupted_demo_cleans_up_everything(tmpdir_for_demo: Path, sig: signal.Signals, at: str) -> None:
    run = Running(tmpdir_for_demo)
    run.wait_for(at)
    mid = leftovers(tmpdir_for_demo)
    assert any(x.startswith("mount") for x in mid) and any(x.startswith("loop") for x in mid), mid
    run.proc.send_signal(sig)
    rc = run.finish()
    out = run.output()
    assert rc == 130, out
    assert f"interrupted (signal {int(sig)}): cleaning up" in out
    assert "demo finished" not in out
    assert re.search(r"^cleaned up: .*loop devices", out, re.M), out
    assert leftovers(tmpdir_for_demo) == []
