"""The ability table and the admin override on top of the probe: precedence, matching, loading."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from csi_virtvol import errors
from csi_virtvol.backends.abilities import (
    AbilityRule, AbilityTable, effective_abilities, load_table, parse_table,
)
from csi_virtvol.model.array import Ability, ArrayIdentity

IC, RC, DT, GROW = Ability.INTERNAL_COPY, Ability.REMOTE_COPY, Ability.DIRTY_TRACKING, Ability.GROW_LUN
NONE = Ability.NONE


def ident(vendor: str, model: str, version: str) -> ArrayIdentity:
    return ArrayIdentity(vendor=vendor, model=model, version=version)


TABLE = AbilityTable(rules=(
    AbilityRule(vendor=("Linux",), model=("ext4",), remove=IC),
    AbilityRule(vendor=("ACME",), model=("box-*",), add=RC | DT),
    AbilityRule(vendor=("ACME",), model=("box-*",), version=("1.*",), remove=DT),   # later rule wins
    AbilityRule(vendor=("ACME",), model=("box-9",), add=IC, remove=IC),            # add then remove
    AbilityRule(vendor=("LIO-ORG",), model=("*",), version=("4.[0-2]", "5.*"), add=GROW),
))

CASES: list[tuple[str, ArrayIdentity, Ability, dict[str, bool], Ability]] = [
    # id, identity, probed, overrides, expected
    ("probe-only-no-rule", ident("Linux", "xfs", "6.1"), IC | GROW, {}, IC | GROW),
    ("table-removes-probed", ident("Linux", "ext4", "6.1"), IC | GROW, {}, GROW),
    ("table-case-insensitive", ident("linux", "EXT4", "6.1"), IC | GROW, {}, GROW),
    ("table-adds", ident("ACME", "box-3", "2.0"), NONE, {}, RC | DT),
    ("later-rule-wins", ident("ACME", "box-3", "1.4"), NONE, {}, RC),
    ("within-rule-remove-after-add", ident("ACME", "box-9", "2.0"), IC, {}, RC | DT),
    ("version-list-first", ident("LIO-ORG", "FILEIO", "4.1"), NONE, {}, GROW),
    ("version-list-second", ident("LIO-ORG", "FILEIO", "5.7"), NONE, {}, GROW),
    ("version-no-match", ident("LIO-ORG", "FILEIO", "4.10"), NONE, {}, NONE),
    ("padded-scsi-strings", ident("LIO-ORG ", " FILEIO  ", "5.0 "), NONE, {}, GROW),
    ("override-on-beats-table", ident("Linux", "ext4", "6.1"), IC | GROW, {"internal-copy": True}, IC | GROW),
    ("override-off-beats-probe", ident("Linux", "xfs", "6.1"), IC | GROW, {"internal-copy": False}, GROW),
    ("override-off-beats-table-add", ident("ACME", "box-3", "2.0"), NONE, {"remote-copy": False}, DT),
    ("override-adds-unprobed", ident("Linux", "xfs", "6.1"), GROW, {"dirty-tracking": True}, GROW | DT),
    ("override-underscore-name", ident("Linux", "xfs", "6.1"), GROW, {"GROW_LUN": False}, NONE),
    ("override-several", ident("Linux", "xfs", "6.1"), IC, {"internal-copy": False, "grow-lun": True}, GROW),
]


@pytest.mark.parametrize(("identity", "probed", "overrides", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_precedence(identity: ArrayIdentity, probed: Ability, overrides: dict[str, bool],
                    expected: Ability) -> None:
    got = effective_abilities(identity=identity, probed=probed, table=TABLE, overrides=overrides)
    assert got == expected


def test_unknown_override_name_is_refused() -> None:
    with pytest.raises(errors.InvalidRequest, match="teleport"):
        effective_abilities(identity=ident("Linux", "xfs", "6.1"), probed=NONE, table=TABLE,
                            overrides={"teleport": True})


def test_empty_table_is_the_probe() -> None:
    for probed in (NONE, IC, IC | RC | DT | GROW):
        assert effective_abilities(identity=ident("x", "y", "z"), probed=probed,
                                   table=AbilityTable(), overrides={}) == probed


# ---- the packaged table -------------------------------------------------------------------

PACKAGED: list[tuple[str, ArrayIdentity, Ability, Ability]] = [
    ("ext4-no-reflink", ident("Linux", "ext4", "6.1.0-18-amd64"), IC | GROW, GROW),
    ("ext3-no-reflink", ident("Linux", "ext3", "5.10.0"), IC | GROW, GROW),
    ("xfs-modern-keeps-probe", ident("Linux", "xfs", "6.1.0-18-amd64"), IC | GROW, IC | GROW),
    ("xfs-pre-4.9-no-reflink", ident("Linux", "xfs", "4.4.0-210-generic"), IC | GROW, GROW),
    ("xfs-4.19-keeps-probe", ident("Linux", "xfs", "4.19.0"), IC | GROW, IC | GROW),
    ("btrfs-keeps-probe", ident("Linux", "btrfs", "6.18.44"), IC | GROW, IC | GROW),
    ("tmpfs-no-reflink", ident("Linux", "tmpfs", "6.18.44"), IC | GROW, GROW),
    ("lio-no-remote-or-tracking", ident("LIO-ORG", "FILEIO", "4.0"), RC | DT | GROW, GROW),
    ("qsd-grows", ident("QEMU", "qsd", "8.2.2"), DT, DT | GROW),
]


@pytest.mark.parametrize(("identity", "probed", "expected"), [c[1:] for c in PACKAGED],
                         ids=[c[0] for c in PACKAGED])
def test_packaged_table(identity: ArrayIdentity, probed: Ability, expected: Ability) -> None:
    table = load_table()
    assert table.rules, "the packaged table must not be empty"
    assert effective_abilities(identity=identity, probed=probed, table=table, overrides={}) == expected


# ---- loading and validation ---------------------------------------------------------------

def test_load_table_from_file(tmp_path: Path) -> None:
    path = tmp_path / "abilities.yaml"
    path.write_text(
        "# custom\n"
        "rules:\n"
        "  - match: {vendor: ACME, model: [a, 'b*'], version: 2}\n"
        "    add: [internal-copy]\n"
        "    remove: [grow-lun]\n"
        "    why: firmware 2 clones\n"
        "  - match: {}\n"
        "    add: [dirty-tracking]\n")
    table = load_table(path)
    assert table.rules == (
        AbilityRule(vendor=("ACME",), model=("a", "b*"), version=("2",), add=IC, remove=GROW,
                    why="firmware 2 clones"),
        AbilityRule(add=DT),
    )
    assert effective_abilities(identity=ident("acme", "bx", "2"), probed=GROW, table=table,
                               overrides={}) == IC | DT
    assert effective_abilities(identity=ident("acme", "bx", "3"), probed=GROW, table=table,
                               overrides={}) == GROW | DT


def test_empty_file_is_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_table(path) == AbilityTable()


BAD: list[tuple[str, Any]] = [
    ("not-a-mapping", ["rules"]),
    ("extra-top-key", {"rules": [], "more": 1}),
    ("rules-not-list", {"rules": {"a": 1}}),
    ("rule-not-mapping", {"rules": ["x"]}),
    ("unknown-rule-key", {"rules": [{"match": {}, "ad": ["grow-lun"]}]}),
    ("unknown-match-key", {"rules": [{"match": {"firmware": "1"}}]}),
    ("unknown-ability", {"rules": [{"add": ["teleport"]}]}),
    ("ability-not-list", {"rules": [{"remove": "grow-lun"}]}),
    ("empty-glob-list", {"rules": [{"match": {"vendor": []}}]}),
]


@pytest.mark.parametrize("data", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_tables_are_refused(data: Any) -> None:
    with pytest.raises(errors.InvalidRequest):
        parse_table(data, where="test")


def test_missing_file_and_bad_yaml_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidRequest):
        load_table(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(errors.InvalidRequest):
        load_table(bad)
