"""The `lio` driver and the iSCSI transport on real LIO targets, inside vmtest.

On the host this module skips; test_lio_vm.py boots one VM that runs it (and the
ArrayDriver contract for `lio`, test_lio_contract.py) there.  Every array is a
real iSCSI target on 127.0.0.1, reached by this VM's own open-iscsi initiator.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.backends import registry
from csi_virtvol.backends.base import HostAccessCapable, InternalCopyCapable
from csi_virtvol.backends.lio import PROBE_LUN, TARGET_ROOT, TPG, XATTR_LUN, LioDriver, parse_inquiry
from csi_virtvol.model.array import Ability, LunOrigin
from csi_virtvol.model.ids import LunId
from csi_virtvol.transport import Attacher, iscsi

from liotarget import (IN_VM, NOT_IN_VM, MiB, device_size, ext4_mount, iscsid, lio_spec, read_at, remove_array,
                       remove_target, sh, write_at)

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]

OTHER = "iqn.2024-01.org.csi-virtvol.test:other-node"


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("lio")
    with ext4_mount(work) as mnt, iscsid(work):
        yield mnt


@pytest.fixture(scope="module")
def tpc_on(pools: Path) -> Iterator[LioDriver]:
    driver = LioDriver(lio_spec(pools, name="lio-3pc"))
    yield driver
    remove_array(driver)


@pytest.fixture(scope="module")
def tpc_off(pools: Path) -> Iterator[LioDriver]:
    driver = LioDriver(lio_spec(pools, name="lio-no3pc", emulate_3pc=False))
    yield driver
    remove_array(driver)


def name(prefix: str = "lun") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def tpg(driver: LioDriver) -> Path:
    return Path(TARGET_ROOT) / "iscsi" / driver.spec.params["iqn"] / TPG


# ---- identity and abilities by INQUIRY ------------------------------------------------------

def test_inquiry_gives_identity_and_3pc_sets_internal_copy(tpc_on: LioDriver, tpc_off: LioDriver) -> None:
    on, off = tpc_on.describe(), tpc_off.describe()
    for info in (on, off):
        assert info.identity.vendor == "LIO-ORG"
        assert info.identity.model == "IBLOCK"
        assert info.identity.version  # the target's revision, e.g. "4.0"
    assert on.probed == Ability.GROW_LUN | Ability.INTERNAL_COPY
    assert off.probed == Ability.GROW_LUN
    # the probe read the bit from the LUN: sg_inq on the probe LUN's device agrees
    for driver, bit in ((tpc_on, True), (tpc_off, False)):
        dev = iscsi.device_of(iscsi.format_address(portal="127.0.0.1:3260", iqn=driver.spec.params["iqn"],
                                                   lun=PROBE_LUN))
        assert dev is not None
        assert parse_inquiry(sh("sg_inq", dev)).tpc is bit
    # the vendor table (LIO-ORG rule) applies on top; the probe decides internal copy
    _, eff_on = registry.open_array(tpc_on.spec)
    _, eff_off = registry.open_array(tpc_off.spec)
    assert Ability.INTERNAL_COPY in eff_on.abilities and Ability.INTERNAL_COPY not in eff_off.abilities
    assert isinstance(tpc_on, InternalCopyCapable) and isinstance(tpc_on, HostAccessCapable)


def test_a_lun_of_a_3pc_off_array_shows_3pc_clear(tpc_off: LioDriver) -> None:
    lun = tpc_off.create_lun(name=name(), size=4 * MiB)
    try:
        assert parse_inquiry(sh("sg_inq", tpc_off.open_path(lun_id=lun.id))).tpc is False
        with pytest.raises(errors.UnsupportedCapability):
            tpc_off.copy_lun_internal(source=lun.id, name=name("copy"))
    finally:
        tpc_off.delete_lun(lun_id=lun.id)


# ---- LUNs, addresses, data through the target -----------------------------------------------

def test_lun_address_is_the_iscsi_lun_and_data_lands_in_the_image(tpc_on: LioDriver) -> None:
    lun = tpc_on.create_lun(name=name(), size=8 * MiB)
    addr = iscsi.parse_address(lun.address)
    assert (addr.portal, addr.iqn) == ("127.0.0.1:3260", tpc_on.spec.params["iqn"])
    assert addr.lun >= 1 and addr.lun != PROBE_LUN
    assert (tpg(tpc_on) / "lun" / f"lun_{addr.lun}").is_dir()
    dev = tpc_on.open_path(lun_id=lun.id)
    assert dev.startswith("/dev/sd") and device_size(dev) == 8 * MiB
    data = os.urandom(MiB)
    write_at(dev, 3 * MiB, data)
    image = Path(tpc_on.spec.params["pool"]) / "luns" / f"{lun.id}.img"
    assert read_at(str(image), 3 * MiB, MiB) == data  # it went through LIO to the image
    tpc_on.delete_lun(lun_id=lun.id)
    assert not image.exists() and not (tpg(tpc_on) / "lun" / f"lun_{addr.lun}").exists()
    assert iscsi.device_of(lun.address) is None
    tpc_on.delete_lun(lun_id=lun.id)  # idempotent


def test_transport_attach_and_detach_are_idempotent_and_log_out_last(tpc_on: LioDriver) -> None:
    a = tpc_on.create_lun(name=name(), size=4 * MiB)
    b = tpc_on.create_lun(name=name(), size=4 * MiB)
    me = iscsi.initiator_name()
    for lun in (a, b):
        tpc_on.grant_access(lun_id=lun.id, initiator=me)
    probe = iscsi.format_address(portal="127.0.0.1:3260", iqn=tpc_on.spec.params["iqn"], lun=PROBE_LUN)
    iscsi.detach(probe)  # the driver's own probe device: now this target has no device here
    try:
        dev_a = iscsi.attach(a.address)
        assert iscsi.attach(a.address) == dev_a
        dev_b = iscsi.attach(b.address)
        assert dev_b != dev_a and os.path.exists(dev_b)
        iscsi.detach(a.address)
        iscsi.detach(a.address)
        assert iscsi.device_of(a.address) is None
        assert (tpc_on.spec.params["iqn"], "127.0.0.1:3260") in iscsi.sessions()  # b still in use
        iscsi.detach(b.address)
        assert tpc_on.spec.params["iqn"] not in {t for t, _ in iscsi.sessions()}  # logged out
        iscsi.detach(b.address)
        assert iscsi.attach(b.address) == iscsi.device_of(b.address)  # logs in again
    finally:
        for lun in (a, b):
            tpc_on.delete_lun(lun_id=lun.id)
        iscsi.attach(probe)


def test_attacher_maps_iscsi_addresses(tpc_on: LioDriver, tmp_path: Path) -> None:
    lun = tpc_on.create_lun(name=name(), size=4 * MiB)
    tpc_on.grant_access(lun_id=lun.id, initiator=iscsi.initiator_name())
    attacher = Attacher(str(tmp_path / "attach"))
    try:
        (dev,) = attacher.attach(user="vol-1", addresses=[lun.address])
        assert dev.startswith("/dev/sd") and device_size(dev) == 4 * MiB
        attacher.detach_user(user="vol-1")
        assert iscsi.device_of(lun.address) is None
    finally:
        tpc_on.delete_lun(lun_id=lun.id)


# ---- grow -------------------------------------------------------------------------------------

def test_resize_grows_the_lun_under_a_live_session(tpc_on: LioDriver) -> None:
    lun = tpc_on.create_lun(name=name(), size=4 * MiB)
    try:
        dev = tpc_on.open_path(lun_id=lun.id)
        write_at(dev, 0, b"before")
        grown = tpc_on.resize_lun(lun_id=lun.id, size=12 * MiB)
        assert grown.size == 12 * MiB and grown.address == lun.address
        assert device_size(dev) == 12 * MiB  # same device, new size
        write_at(dev, 11 * MiB, b"after")
        assert read_at(dev, 0, 6) == b"before" and read_at(dev, 11 * MiB, 5) == b"after"
    finally:
        tpc_on.delete_lun(lun_id=lun.id)


# ---- EXTENDED COPY --------------------------------------------------------------------------

def test_copy_lun_internal_by_xcopy_is_byte_identical(tpc_on: LioDriver) -> None:
    size = 24 * MiB  # more than one 16 MiB EXTENDED COPY segment
    src = tpc_on.create_lun(name=name("src"), size=size)
    content = os.urandom(size)
    try:
        write_at(tpc_on.open_path(lun_id=src.id), 0, content)
        copy = tpc_on.copy_lun_internal(source=src.id, name=name("copy"))
        assert copy.size == size and copy.origin is LunOrigin.PROVISIONED and copy.address != src.address
        image = Path(tpc_on.spec.params["pool"]) / "luns" / f"{copy.id}.img"
        assert image.read_bytes() == content  # the target wrote it
        assert read_at(tpc_on.open_path(lun_id=copy.id), 0, size) == content
        # point in time: later writes to the source do not reach the copy
        write_at(tpc_on.open_path(lun_id=src.id), 0, b"\0" * 4096)
        assert read_at(tpc_on.open_path(lun_id=copy.id), 0, 4096) == content[:4096]
        assert tpc_on.copy_lun_internal(source=src.id, name=copy.id) == copy  # idempotent
        with pytest.raises(errors.NotFound):
            tpc_on.copy_lun_internal(source=LunId("no-such-lun"), name=name("copy"))
    finally:
        for lun in tpc_on.list_luns():
            tpc_on.delete_lun(lun_id=lun.id)


# ---- ACL ----------------------------------------------------------------------------------------

def test_grant_and_revoke_map_and_unmap_the_lun_for_an_initiator(tpc_on: LioDriver) -> None:
    lun = tpc_on.create_lun(name=name(), size=4 * MiB)
    n = iscsi.parse_address(lun.address).lun
    me = iscsi.initiator_name()
    try:
        with pytest.raises(errors.NotFound):  # not granted: this initiator does not see it
            iscsi.attach(lun.address)
        for _ in range(2):
            tpc_on.grant_access(lun_id=lun.id, initiator=OTHER)
        assert (tpg(tpc_on) / "acls" / OTHER / f"lun_{n}").is_dir()
        assert tpc_on.initiators(lun_id=lun.id) == [OTHER]
        with pytest.raises(errors.NotFound):  # granted to another node only
            iscsi.attach(lun.address)
        tpc_on.grant_access(lun_id=lun.id, initiator=me)
        dev = iscsi.attach(lun.address)
        write_at(dev, 0, b"granted")
        iscsi.detach(lun.address)
        for _ in range(2):
            tpc_on.revoke_access(lun_id=lun.id, initiator=me)
        assert not (tpg(tpc_on) / "acls" / me / f"lun_{n}").exists()
        with pytest.raises(errors.NotFound):
            iscsi.attach(lun.address)
        tpc_on.revoke_access(lun_id=lun.id, initiator=OTHER)
        assert not (tpg(tpc_on) / "acls" / OTHER / f"lun_{n}").exists()
        assert tpc_on.initiators(lun_id=lun.id) == []
        with pytest.raises(errors.InvalidRequest):
            tpc_on.grant_access(lun_id=lun.id, initiator="not an iqn")
    finally:
        tpc_on.delete_lun(lun_id=lun.id)
    tpc_on.revoke_access(lun_id=lun.id, initiator=me)  # a missing LUN: no error


# ---- the kernel forgets, the images remember ----------------------------------------------------

def test_a_reopened_array_rebuilds_its_target_with_the_same_numbers_and_acls(pools: Path) -> None:
    driver = LioDriver(lio_spec(pools))
    try:
        lun = driver.create_lun(name=name(), size=4 * MiB)
        write_at(driver.open_path(lun_id=lun.id), 0, b"survives")
        driver.grant_access(lun_id=lun.id, initiator=OTHER)
        foreign = Path(driver.spec.params["pool"]) / "luns" / "planted.img"
        with open(foreign, "wb") as f:
            f.truncate(2 * MiB)
        spec = driver.spec
        remove_target(driver)
        again = LioDriver(spec)
        assert again.get_lun(lun_id=lun.id) == lun
        n = iscsi.parse_address(lun.address).lun
        assert (tpg(again) / "acls" / OTHER / f"lun_{n}").is_dir()
        planted = again.get_lun(lun_id=LunId("planted"))
        assert planted is not None and planted.origin is LunOrigin.DISCOVERED
        assert iscsi.parse_address(planted.address).lun not in (n, PROBE_LUN)
        assert os.getxattr(str(foreign), XATTR_LUN)
        assert read_at(again.open_path(lun_id=lun.id), 0, 8) == b"survives"
        driver = again
    finally:
        remove_array(driver)



# ---- the node: two LIO LUNs over iSCSI, composed by dm-linear --------------------------------

def test_stage_expand_unstage_over_iscsi_and_dm_linear(tpc_on: LioDriver, tmp_path: Path) -> None:
    from csi_virtvol.node.layout import BackingExtent
    from csi_virtvol.node.stager import Stager

    luns = [tpc_on.create_lun(name=name(f"ext{i}"), size=8 * MiB) for i in range(2)]
    me = iscsi.initiator_name()
    for lun in luns:
        tpc_on.grant_access(lun_id=lun.id, initiator=me)  # what ControllerPublish does
    att = Attacher(str(tmp_path / "attach"))
    stager = Stager(str(tmp_path / "node"), composer="dm")
    staging = tmp_path / "staging"
    staging.mkdir()
    try:
        paths = att.attach(user="vol", addresses=[x.address for x in luns])
        assert all(p.startswith("/dev/sd") for p in paths)
        stager.stage("vol", [BackingExtent(path=p, offset=0, length=8 * MiB) for p in paths], str(staging),
                     access="block")
        rec = stager.get("vol")
        assert rec is not None and rec.composer == "dm"
        dev = rec.device
        payload = os.urandom(16 * MiB)
        write_at(dev, 0, payload)
        images = [Path(tpc_on.spec.params["pool"]) / "luns" / f"{x.id}.img" for x in luns]
        assert images[0].read_bytes() == payload[:8 * MiB]  # each half on its LUN, through LIO
        assert images[1].read_bytes() == payload[8 * MiB:]
        # expand: grow the last LUN on the array, rescan it here, reload the dm table
        tpc_on.resize_lun(lun_id=luns[1].id, size=16 * MiB)
        paths2 = att.attach(user="vol", addresses=[x.address for x in luns])
        assert paths2 == paths and device_size(paths[1]) == 16 * MiB
        size = stager.expand("vol", [BackingExtent(path=paths[0], offset=0, length=8 * MiB),
                                     BackingExtent(path=paths[1], offset=0, length=16 * MiB)])
        assert size == 24 * MiB == device_size(dev)
        tail = os.urandom(MiB)
        write_at(dev, 23 * MiB, tail)
        assert read_at(dev, 0, 16 * MiB) == payload
        assert read_at(str(images[1]), 15 * MiB, MiB) == tail
    finally:
        stager.unstage("vol", str(staging))
        att.detach_user(user="vol")
        for lun in luns:
            tpc_on.delete_lun(lun_id=lun.id)
    assert all(iscsi.device_of(x.address) is None for x in luns)
