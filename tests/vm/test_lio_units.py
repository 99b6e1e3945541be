"""The `lio` driver's and the iSCSI transport's pure parts, on the host (no VM needed)."""
from __future__ import annotations

import pytest

from csi_virtvol import errors
from csi_virtvol.backends.lio import LioDriver, parse_inquiry
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId
from csi_virtvol.transport import iscsi

SG_INQ = """standard INQUIRY:
  PQual=0  PDT=0  RMB=0  LU_CONG=0  hot_pluggable=0  version=0x06  [SPC-4]
  [AERC=0]  [TrmTsk=0]  NormACA=0  HiSUP=0  Resp_data_format=2
  SCCS=1  ACC=0  TPGS=3  3PC={bit}  Protect=0  [BQue=0]
  EncServ=0  MultiP=0  [MChngr=0]  [ACKREQQ=0]  Addr16=0
    length=96 (0x60)   Peripheral device type: disk
 Vendor identification: LIO-ORG 
 Product identification: IBLOCK          
 Product revision level: 4.0 
 Unit serial number: 1111-aaaa
"""


@pytest.mark.parametrize("bit", [0, 1])
def test_parse_inquiry_trims_padding_and_reads_3pc(bit: int) -> None:
    inq = parse_inquiry(SG_INQ.replace("{bit}", str(bit)))
    assert (inq.vendor, inq.product, inq.revision, inq.tpc) == ("LIO-ORG", "IBLOCK", "4.0", bool(bit))
    assert inq.identity.key() == "LIO-ORG/IBLOCK/4.0"


def test_parse_inquiry_refuses_what_is_not_inquiry_data() -> None:
    with pytest.raises(errors.BackendError):
        parse_inquiry("sg_inq: error opening file: /dev/sdz: No such file or directory")


def test_iscsi_addresses_round_trip() -> None:
    text = "iscsi://127.0.0.1:3260/iqn.2003-01.org.example:a1/7"
    addr = iscsi.parse_address(text)
    assert (addr.host, addr.port, addr.iqn, addr.lun) == ("127.0.0.1", 3260, "iqn.2003-01.org.example:a1", 7)
    assert str(addr) == text
    v6 = iscsi.parse_address("iscsi://[::1]:3261/iqn.2003-01.org.example:a1/0")
    assert (v6.host, v6.port, v6.portal) == ("::1", 3261, "[::1]:3261")
    assert iscsi.split_portal("10.0.0.9") == ("10.0.0.9", 3260)


@pytest.mark.parametrize("bad", ["nbd://x/y", "iscsi://127.0.0.1:3260/not-an-iqn/1",
                                 "iscsi://127.0.0.1:3260/iqn.2003-01.org.example:a1/x",
                                 "iscsi://127.0.0.1:3260/iqn.2003-01.org.example:a1", "iscsi:///iqn.2003-01.a:b/1"])
def test_malformed_iscsi_addresses_are_refused(bad: str) -> None:
    with pytest.raises(errors.InvalidRequest):
        iscsi.parse_address(bad)


@pytest.mark.parametrize("params", [{"pool": "/tmp/p"}, {"pool": "/tmp/p", "iqn": "target-a"},
                                    {"pool": "/tmp/p", "iqn": "iqn.2003-01.org.example:a", "emulate_3pc": "maybe"},
                                    {"pool": "/tmp/p", "iqn": "iqn.2003-01.org.example:a", "portal": "a:b:c"}])
def test_bad_params_are_refused_before_touching_anything(params: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidRequest):
        LioDriver(ArraySpec(id=ArrayId("a"), kind="lio", params=params))


def test_initiator_name_is_read_from_open_iscsi_s_file(tmp_path: object) -> None:
    from pathlib import Path
    f = Path(str(tmp_path)) / "initiatorname.iscsi"
    f.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert iscsi.initiator_name(str(f)) == "iqn.1993-08.org.debian:01:abc"
    f.write_text("# nothing\n")
    with pytest.raises(errors.BackendUnavailable):
        iscsi.initiator_name(str(f))
