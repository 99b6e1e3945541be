"""node/capacity.py: the volumes a node can hold, from its /proc, /sys and /dev.

Each case builds the files a kernel would show (in a temp dir standing for the roots) and
checks the number the rule gives, so a change of the rule shows here."""
from __future__ import annotations

from pathlib import Path

import pytest

from csi_virtvol.node import capacity

MiB = 1 << 20
GiB = 1 << 30


def node(tmp_path: Path, *, mem: int = 8 * GiB, loop_control: bool = True, loops: int = 8,
         max_part: int = 0, nbd: int | None = None) -> dict[str, str]:
    proc, sys, dev = tmp_path / "proc", tmp_path / "sys", tmp_path / "dev"
    for d in (proc, sys / "block", sys / "module" / "loop" / "parameters", dev):
        d.mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text(f"MemTotal:       {mem // 1024} kB\nMemFree:        1024 kB\n")
    (sys / "module" / "loop" / "parameters" / "max_part").write_text(f"{max_part}\n")
    if loop_control:
        (dev / "loop-control").touch()
    for i in range(loops):
        (dev / f"loop{i}").touch()
    if nbd is not None:
        (sys / "module" / "nbd").mkdir(parents=True)
        for i in range(nbd):
            (sys / "block" / f"nbd{i}").mkdir()
    return {"proc_root": str(proc), "sys_root": str(sys), "dev_root": str(dev)}


def test_fuse_composition_is_bound_by_its_daemons_memory(tmp_path: Path) -> None:
    roots = node(tmp_path, mem=8 * GiB)
    n, why = capacity.max_volumes(composer="fuse", nbd=False, **roots)
    assert n == 8 * GiB // 4 // (65 * MiB) == 31
    assert "memory" in why
    bigger = node(tmp_path / "big", mem=32 * GiB)
    assert capacity.max_volumes(composer="fuse", nbd=False, **bigger)[0] == 126


def test_dm_composition_has_no_daemon(tmp_path: Path) -> None:
    roots = node(tmp_path, mem=8 * GiB)
    assert capacity.max_volumes(composer="dm", nbd=False, **roots)[0] == 8 * GiB // 4 // MiB


def test_without_loop_control_only_the_existing_loop_devices_count(tmp_path: Path) -> None:
    roots = node(tmp_path, loop_control=False, loops=3)
    assert capacity.max_volumes(composer="dm", nbd=False, **roots) == (3, "loop devices")


def test_loop_partitions_shrink_the_loop_minor_space(tmp_path: Path) -> None:
    assert capacity.loop_devices(**{k: v for k, v in node(tmp_path).items() if k != "proc_root"}) == 1 << 20
    roots = node(tmp_path / "p", max_part=15)
    assert capacity.loop_devices(sys_root=roots["sys_root"], dev_root=roots["dev_root"]) == 1 << 16
    tiny = node(tmp_path / "t", mem=1024 * GiB, max_part=(1 << 18))  # 2 loop devices
    assert capacity.max_volumes(composer="dm", nbd=False, **tiny) == (2, "loop devices")


def test_nbd_luns_count_kernel_devices_or_nbdfuse_daemons(tmp_path: Path) -> None:
    with_nbd = node(tmp_path, nbd=16)
    assert capacity.max_volumes(composer="dm", nbd=True, **with_nbd) == (16, "kernel nbd devices")
    assert capacity.max_volumes(composer="dm", nbd=False, **with_nbd)[0] == 2048  # no qsd arrays
    no_module = node(tmp_path / "fuse", mem=8 * GiB)
    assert capacity.max_volumes(composer="fuse", nbd=True, **no_module)[0] == 8 * GiB // 4 // (81 * MiB)


@pytest.mark.parametrize("mem", [0, 64 * MiB])
def test_never_zero_which_would_mean_no_limit(tmp_path: Path, mem: int) -> None:
    roots = node(tmp_path, mem=mem, loop_control=False, loops=0)
    assert capacity.max_volumes(composer="fuse", nbd=False, **roots)[0] == 1


def test_this_node(tmp_path: Path) -> None:
    """On the machine the tests run on: a positive number, at most its memory allows."""
    n, why = capacity.max_volumes(composer="fuse", nbd=False)
    assert 0 < n <= capacity.mem_total() // 4 // (65 * MiB) and why
