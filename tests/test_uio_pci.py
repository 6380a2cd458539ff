"""PCI discovery against a fake sysfs tree (a real directory tree with the kernel's layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from uio_fakesys import FakeSysfs

from iosm_cuse.bus.pci import (
    IVSHMEM_PCI_ID,
    PciError,
    PciId,
    device_for_uio,
    find_iosm_devices,
    normalize_bdf,
    parse_pci_id,
    parse_resource,
    read_device,
    require_uio,
    scan_pci,
)


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_pci("0000:00:01.0", 0x1AF4, 0x1041, {0: 0x4000})  # a virtio device: not ours
    fs.add_pci("0000:00:03.0", 0x1AF4, 0x1110, {0: 0x100, 2: 0x400000})  # ivshmem
    fs.add_pci("0000:03:00.0", 0x8086, 0x7560, {0: 0x1000, 2: 0x1000})  # XMM7560
    fs.add_pci("0000:04:00.0", 0x8086, 0x7360, {0: 0x1000, 2: 0x1000})  # XMM7360
    return fs


def test_scan_lists_all_devices_with_ids(sysfs: FakeSysfs) -> None:
    devs = scan_pci(sysfs.root)
    assert [d.bdf for d in devs] == ["0000:00:01.0", "0000:00:03.0", "0000:03:00.0", "0000:04:00.0"]
    assert devs[1].pci_id == IVSHMEM_PCI_ID
    assert devs[2].pci_id == PciId(0x8086, 0x7560) and devs[2].is_iosm
    assert not devs[0].is_iosm


def test_find_iosm_devices_only_modems_unless_test_id_given(sysfs: FakeSysfs) -> None:
    assert [d.bdf for d in find_iosm_devices(sysfs.root)] == ["0000:03:00.0", "0000:04:00.0"]
    with_test = find_iosm_devices(sysfs.root, frozenset({IVSHMEM_PCI_ID}))
    assert [d.bdf for d in with_test] == ["0000:00:03.0", "0000:03:00.0", "0000:04:00.0"]


def test_driver_and_uio_binding_follow_the_tree(sysfs: FakeSysfs) -> None:
    dev = read_device("03:00.0", sysfs.root)
    assert dev.driver is None and not dev.uio_bound
    sysfs.bind("0000:03:00.0", "uio_pci_generic", "uio0")
    dev = read_device("0000:03:00.0", sysfs.root)
    assert dev.driver == "uio_pci_generic" and dev.uio == ("uio0",)
    assert require_uio(dev) == "uio0"
    assert device_for_uio("uio0", sysfs.root).bdf == "0000:03:00.0"
    sysfs.unbind("0000:03:00.0")
    assert read_device("0000:03:00.0", sysfs.root).driver is None


def test_not_uio_bound_error_says_how_to_bind(sysfs: FakeSysfs) -> None:
    with pytest.raises(PciError, match=r"not bound to any driver.*8086 7560 > /sys/bus/pci/drivers/"
                                       r"uio_pci_generic/new_id"):
        require_uio(read_device("0000:03:00.0", sysfs.root))
    sysfs.bind("0000:04:00.0", "iosm")
    with pytest.raises(PciError, match=r"bound to iosm.*0000:04:00.0/driver/unbind"):
        require_uio(read_device("0000:04:00.0", sysfs.root))


def test_missing_device_and_uio_node_errors(sysfs: FakeSysfs) -> None:
    with pytest.raises(PciError, match=r"no PCI device 0000:09:00\.0"):
        read_device("0000:09:00.0", sysfs.root)
    with pytest.raises(PciError, match="no UIO device uio7"):
        device_for_uio("uio7", sysfs.root)


def test_bars_from_resource_file(sysfs: FakeSysfs) -> None:
    dev = read_device("0000:00:03.0", sysfs.root)
    assert [b.index for b in dev.bars] == [0, 2]
    assert dev.bar(2).size == 0x400000 and dev.bar(2).is_memory
    with pytest.raises(PciError, match="no BAR4"):
        dev.bar(4)


@pytest.mark.parametrize("bad", ["", "0000:00:03", "../../etc", "0000:00:03.8", "uio0",
                                 "0000:00:03.0/../x", "00:3.0"])
def test_bad_addresses_rejected(bad: str) -> None:
    with pytest.raises(PciError, match="bad PCI address"):
        normalize_bdf(bad)


def test_bad_uio_names_rejected(sysfs: FakeSysfs) -> None:
    with pytest.raises(PciError, match="bad UIO device name"):
        device_for_uio("../uio0", sysfs.root)


def test_pci_id_parse() -> None:
    assert parse_pci_id("1AF4:1110") == IVSHMEM_PCI_ID
    assert str(IVSHMEM_PCI_ID) == "1af4:1110"
    with pytest.raises(PciError):
        parse_pci_id("1af4-1110")


@given(st.text(max_size=400))
def test_parse_resource_never_crashes(text: str) -> None:
    for bar in parse_resource(text):
        assert 0 <= bar.index < 6 and bar.size > 0


def test_unreadable_entries_skipped(sysfs: FakeSysfs) -> None:
    (sysfs.dev_dir("0000:00:01.0") / "vendor").write_text("garbage\n")
    assert "0000:00:01.0" not in [d.bdf for d in scan_pci(sysfs.root)]
