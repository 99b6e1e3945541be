"""The pure parts of the dm live cut (node/dmcut.py): names, tables, sizes, what the kernel
and era_invalidate print, the state file and which table the volume's device gets.  The
devices themselves are tested in the VM (tests/vm/test_dmcut_vm.py)."""
from __future__ import annotations

import dataclasses

import pytest

from csi_virtvol import errors
from csi_virtvol.node import dm, dmcut
from csi_virtvol.node.cut import CHUNK

GiB = 1 << 30
MiB = 1 << 20


def test_stack_names_cannot_be_another_volumes_device_and_fit_device_mapper() -> None:
    n = dmcut.names("vol-1")
    assert (n.top, n.real, n.era) == ("virtvol-vol-1", "virtvol-vol-1@real", "virtvol-vol-1@era")
    # a volume named like a piece of another one's stack gets a device name without '@'
    assert "@" not in dm.dm_name("vol-1@real") and dm.dm_name("vol-1@real") != n.real
    assert n.cut("p.1") != n.cut("p.2") and n.cut("p.1").startswith(n.prefix)
    longest = dmcut.names("v" * 300)
    assert len(longest.cut("c" * 128).encode()) <= 127   # DM_NAME_LEN with its NUL
    with pytest.raises(errors.InvalidRequest):
        n.cut("../x")


def test_tables_are_what_the_kernel_targets_take() -> None:
    size = 3 * GiB + 512
    assert dmcut.snapshot_table(size, "254:2", "7:3") == f"0 {size // 512} snapshot 254:2 7:3 P 128\n"
    assert dmcut.origin_table(size, "254:2") == f"0 {size // 512} snapshot-origin 254:2\n"
    assert dmcut.era_table(size, "7:1", "254:1") == f"0 {size // 512} era 7:1 254:1 128\n"
    assert dmcut.linear_over(size, "254:2") == f"0 {size // 512} linear 254:2 0\n"
    assert dmcut.CHUNK_SECTORS * 512 == CHUNK


def test_the_store_is_whole_chunks_and_has_room_for_its_header_and_one_chunk() -> None:
    assert dmcut.store_size(64 * MiB + 100) == 64 * MiB
    assert dmcut.store_size(4 * CHUNK) == 4 * CHUNK
    with pytest.raises(errors.InvalidRequest):
        dmcut.store_size(4 * CHUNK - 1)


@pytest.mark.parametrize("size", [CHUNK, 256 * MiB, 1 * GiB, 100 * GiB, 16 << 40, 64 << 40])
def test_era_metadata_covers_the_volume_with_room_to_grow(size: int) -> None:
    capacity, msize = dmcut.meta_size(size)
    blocks = capacity // CHUNK
    assert capacity >= size                       # the volume is tracked whole
    assert capacity >= min(16 * size, 16 << 40)   # and may grow 16x (up to 16 TiB) keeping it
    assert msize >= 8 * MiB + 16 * blocks         # 16 bytes per block tracked
    assert msize % MiB == 0
    if size <= 16 << 40:
        assert msize <= 5 * GiB                   # far under dm's 16 GiB metadata space map


def test_snapshot_status_gives_the_store_in_use_or_that_it_overflowed() -> None:
    assert dmcut.parse_snapshot_status("1536/131072 256") == (1536 * 512, 131072 * 512)
    assert dmcut.parse_snapshot_status("Invalid") is None
    assert dmcut.parse_snapshot_status("Overflow") is None
    with pytest.raises(errors.BackendError):
        dmcut.parse_snapshot_status("what/ever 0")


def test_era_status_gives_the_current_era_and_a_held_metadata_snapshot() -> None:
    assert dmcut.parse_era_status("8 17/8192 2 -") == (2, False)
    assert dmcut.parse_era_status("8 16/8192 3 72") == (3, True)
    with pytest.raises(errors.BackendError):
        dmcut.parse_era_status("Error")


def test_era_invalidate_blocks_become_a_chunk_bitmap() -> None:
    # as thin-provisioning-tools 0.9 prints it (note the blanks around the second '=')
    xml = '<blocks>\n  <block block="0"/>\n  <range begin="5" end = "15"/>\n  <block block="40"/>\n</blocks>\n'
    bits = dmcut.blocks_to_bits(xml, size=20 * CHUNK + 512)     # 21 chunks: block 40 is past the end
    assert len(bits) == 3
    on = [i for i in range(24) if bits[i // 8] & (1 << (i % 8))]
    assert on == [0, *range(5, 15)]
    assert dmcut.blocks_to_bits("<blocks>\n</blocks>\n", size=CHUNK) == b"\0"
    with pytest.raises(errors.BackendError):
        dmcut.blocks_to_bits("bad checksum in superblock", size=CHUNK)


def test_the_state_file_round_trips_and_says_which_table_the_device_gets() -> None:
    era = dmcut.EraRec(phase="ready", capacity=64 * GiB, meta_size=24 * MiB)
    made = dmcut.CutRec(id="p.1", phase="made", limit=64 * MiB, size=GiB, era=2, at=5.0, held=True, changed=True)
    st = dmcut.State(era=era, cuts={"p.1": made}, tracking={"p.1": 2})
    assert dmcut.State.from_dict(st.to_dict()) == st
    assert st.top_kind() == "origin"
    assert st.without_cut("p.1").top_kind() == "era"                       # tracking only
    assert dmcut.State(era=era).top_kind() == "plain"                       # nothing left
    making = dataclasses.replace(made, phase="making")
    assert dmcut.State(era=era, cuts={"p.1": making}, tracking={"p.0": 1}).top_kind() == "era"
    assert dmcut.State(era=dataclasses.replace(era, phase="making"), cuts={"p.1": made}).top_kind() == "plain"
    assert dmcut.State().empty and not st.empty

