"""The command line's snapshots, restores and clones, run as a user runs them: the installed
`csi-virtvol` against a real plugin (a reflink XFS pool "fast" and an ext4 pool "slow").

Each check reads back what the driver really did (its CSI answers, the volumes' LUN
files), so a command that answered without doing its work fails."""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from harness.plugin import Plugin, mount_cap, unique

MiB = 1 << 20
CLI = str(Path(sys.executable).with_name("csi-virtvol"))


def cli(p: Plugin, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CSI_ENDPOINT": p.endpoint}
    return subprocess.run([CLI, "--log-level", "warning", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    out = json.loads(proc.stdout)  # stdout stays the JSON answer: progress went elsewhere
    assert isinstance(out, dict)
    return out


def create(p: Plugin, size: int, **params: str) -> str:
    return str(p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap("ext4")], parameters=params)).volume.volume_id)


def mapping(p: Plugin, vid: str) -> vpb.GetMappingResponse:
    return vrpc.MappingStub(p.channel).GetMapping(vpb.GetMappingRequest(volume_id=vid))


def image(p: Plugin, vid: str) -> bytes:
    out = bytearray()
    for e in mapping(p, vid).extents:
        with open(e.lun_address, "rb") as fh:
            fh.seek(e.offset)
            piece = fh.read(e.length)
        out += piece + bytes(e.length - len(piece))
    return bytes(out)


def fill(p: Plugin, vid: str, seed: int) -> bytes:
    """Random data in every extent, written through the LUN files (the volume is unpublished)."""
    rnd = __import__("random").Random(seed)
    for e in mapping(p, vid).extents:
        with open(e.lun_address, "r+b") as fh:
            fh.seek(e.offset)
            fh.write(rnd.randbytes(e.length))
            fh.flush()
            os.fsync(fh.fileno())
    return image(p, vid)


def snapshots_of(p: Plugin, **query: str) -> list[str]:
    return [e.snapshot.snapshot_id for e in p.controller.ListSnapshots(pb.ListSnapshotsRequest(**query)).entries]


def test_snapshot_create_list_delete(plugin: Plugin) -> None:
    p = plugin
    vid = create(p, 64 * MiB, layout="concat", maxExtentSize="32Mi")
    other = create(p, 8 * MiB)
    data = fill(p, vid, 1)
    ok(cli(p, "volume", "modify", vid, "--param", "copyBandwidth=24Mi"))

    made = cli(p, "snapshot", "create", "s1", "--volume", vid, "--param", "arrays=slow")
    snap = ok(made)["snapshot"]
    assert isinstance(snap, dict)
    sid = str(snap["snapshot_id"])
    assert snap["ready_to_use"] is True and snap["source_volume_id"] == vid
    # stdout is not a terminal: plain progress lines (no bar) went to stderr while it copied
    assert re.search(r"snapshot s1: +\d+% \(", made.stderr), made.stderr
    assert "━" not in made.stderr + made.stdout
    assert snapshots_of(p, snapshot_id=sid) == [sid], "the driver has no such snapshot"
    assert image(p, sid) == data, "the snapshot does not hold the volume's data"
    assert {e.array for e in mapping(p, sid).extents} == {"slow"}, "the snapshot's parameters were lost"

    listed = ok(cli(p, "snapshot", "list", "--volume", vid))["entries"]
    assert isinstance(listed, list)
    assert [e["snapshot"]["snapshot_id"] for e in listed] == [sid]
    assert ok(cli(p, "snapshot", "list", "--volume", other))["entries"] == []
    everything = ok(cli(p, "snapshot", "list"))["entries"]
    assert isinstance(everything, list) and sid in [e["snapshot"]["snapshot_id"] for e in everything]

    ok(cli(p, "snapshot", "delete", sid))
    assert snapshots_of(p, snapshot_id=sid) == [], "the snapshot is still there"
    assert not [f for f in p.lun_files() if sid in f], "its LUNs were not freed"

    missing = cli(p, "snapshot", "create", "s2", "--volume", "vv-00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr


def test_volume_create_from_snapshot_restores_the_snapshot_not_the_volume_now(plugin: Plugin) -> None:
    p = plugin
    vid = create(p, 64 * MiB, layout="concat", maxExtentSize="32Mi")
    then = fill(p, vid, 2)
    sid = str(ok(cli(p, "snapshot", "create", "s", "--volume", vid))["snapshot"]["snapshot_id"])
    now = fill(p, vid, 3)
    assert now != then

    out = ok(cli(p, "volume", "create", "r", "--from-snapshot", sid))["volume"]
    assert isinstance(out, dict)
    rid = str(out["volume_id"])
    assert out["content_source"] == {"snapshot": {"snapshot_id": sid}}
    assert int(out["capacity_bytes"]) == 64 * MiB, "a restore without --size is the snapshot's size"
    assert image(p, rid) == then, "the restored volume does not hold the snapshot's data"

    gone = cli(p, "volume", "create", "r2", "--from-snapshot", "vs-00000000-0000-0000-0000-000000000000")
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_volume_create_from_volume_waits_for_the_clone_and_shows_its_plan(plugin: Plugin) -> None:
    p = plugin
    vid = create(p, 64 * MiB, layout="concat", maxExtentSize="32Mi", arrays="fast")
    data = fill(p, vid, 4)
    ok(cli(p, "volume", "modify", vid, "--param", "copyBandwidth=16Mi"))  # a host copy of ~4 s

    made = cli(p, "volume", "create", "c", "--from-volume", vid, "--param", "arrays=slow")
    out = ok(made)["volume"]
    assert isinstance(out, dict)
    cid = str(out["volume_id"])
    assert out["content_source"] == {"volume": {"volume_id": vid}}
    # the driver answered ABORTED while it copied; the command followed the pair until done
    lines = re.findall(r"volume c from volume \S+: +(\d+)% ", made.stderr)
    assert lines and lines[-1] == "100" and len(lines) >= 2, made.stderr
    assert image(p, cid) == data, "the clone does not hold the source's data"
    assert {e.array for e in mapping(p, cid).extents} == {"slow"}

    table = cli(p, "pair", "list", "--source", vid, "--table")
    assert table.returncode == 0, table.stderr
    rows = [ln.split() for ln in table.stdout.splitlines() if re.match(r"\s+\d+\s", ln)]
    assert rows and all(r[1] == "host" and r[2:5] == ["fast", "->", "slow"] for r in rows), table.stdout

    shown = cli(p, "volume", "map", cid)
    assert shown.returncode == 0
    assert re.search(rf"^\s+0\s+slow\s+{cid}-0\s+0\.0 MiB\s+64\.0 MiB\s+grow-lun$", shown.stdout, re.M), shown.stdout
    nothing = cli(p, "volume", "map", "vv-00000000-0000-0000-0000-000000000000")
    assert nothing.returncode == 2 and "NOT_FOUND" in nothing.stderr


def test_a_terminal_gets_a_progress_bar(plugin: Plugin) -> None:
    p = plugin
    vid = create(p, 64 * MiB, arrays="fast")
    fill(p, vid, 5)
    ok(cli(p, "volume", "modify", vid, "--param", "copyBandwidth=24Mi"))
    master, slave = pty.openpty()
    env = {**os.environ, "CSI_ENDPOINT": p.endpoint, "COLUMNS": "150"}
    proc = subprocess.Popen([CLI, "--log-level", "warning", "volume", "create", "t", "--from-volume", vid,
                             "--param", "arrays=slow"], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "━" in text, f"no progress bar on a terminal:\n{text}"
    assert "64.0/64.0 MiB" in text, text
    assert not re.search(r"volume t from volume \S+: +\d+% \(", text), "plain progress lines on a terminal"
