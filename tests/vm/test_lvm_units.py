"""The `lvm` driver's pure parts and its refusals, on the host (no VM needed)."""
from __future__ import annotations

import pytest

from csi_virtvol import errors
from csi_virtvol.backends import registry
from csi_virtvol.backends.lvm import LvmThinDriver, dm_name, parse_lvm_version, valid_lv_name
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId


@pytest.mark.parametrize("name", ["lun-1", "pvc_abc.0", "A+b", "x" * 127, "snap-of-snapshot"])
def test_usable_lv_names(name: str) -> None:
    assert valid_lv_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "-x", ".hidden", "a/b", "sp ace", "x" * 128, "snapshot0",
                                  "pvmove1", "d_tdata", "a_tmeta", "r_rimage_0", "é"])
def test_unusable_lv_names(name: str) -> None:
    assert not valid_lv_name(name)


def test_dm_name_doubles_dashes() -> None:
    assert dm_name("vg-a", "lun-1") == "vg--a-lun--1"
    assert dm_name("vg", "lun") == "vg-lun"


def test_parse_lvm_version() -> None:
    text = "  LVM version:     2.03.16(2) (2022-05-18)\n  Library version: 1.02.185 (2022-05-18)\n"
    assert parse_lvm_version(text) == "2.03.16"
    assert parse_lvm_version("garbage") == "unknown"


@pytest.mark.parametrize("params", [{}, {"vg": "v"}, {"pool": "p"}, {"vg": "v", "pool": "-p"},
                                    {"vg": "v/x", "pool": "p"}, {"vg": "v", "pool": "p", "overcommit": "-1"},
                                    {"vg": "v", "pool": "p", "overcommit": "nan"}])
def test_bad_params_are_refused_before_lvm_runs(params: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidRequest):
        LvmThinDriver(ArraySpec(id=ArrayId("a"), kind="lvm", params=params))


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(errors.InvalidRequest):
        LvmThinDriver(ArraySpec(id=ArrayId("a"), kind="file", params={"vg": "v", "pool": "p"}))


@pytest.mark.root
def test_a_volume_group_that_is_not_there_is_unavailable() -> None:
    spec = ArraySpec(id=ArrayId("a"), kind="lvm", params={"vg": "csi_virtvol_no_such_vg", "pool": "p"})
    with pytest.raises(errors.BackendUnavailable):
        registry.open_array(spec)


def test_the_registry_knows_the_kind() -> None:
    assert "lvm" in registry.kinds()
    assert registry.factory_for("lvm") is LvmThinDriver
