"""UioDevice against a fake sysfs tree: specs, id policy, BAR and UIO-map mmaps, errors.
(Interrupt semantics need the real UIO core: tests/kernel/test_uio_ivshmem.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from uio_fakesys import FakeSysfs

from iosm_cuse.hw.pci import IVSHMEM_PCI_ID
from iosm_cuse.hw.uio import UioDevice, UioError, parse_device_spec, read_maps

IVSHMEM, XMM = "0000:00:03.0", "0000:03:00.0"


@pytest.fixture
def fs(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 0x100, 2: 0x10000})
    fs.add_pci(XMM, 0x8086, 0x7560, {0: 0x1000, 2: 0x1000})
    (tmp_path / "dev").mkdir()
    for n in ("uio0", "uio1"):
        (tmp_path / "dev" / n).write_bytes(b"")
    return fs


def _dev(fs: FakeSysfs) -> Path:
    return fs.root.parent / "dev"


def test_specs_resolve_to_the_same_device(fs: FakeSysfs) -> None:
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")
    for spec in (f"uio:{IVSHMEM}", "uio:00:03.0", "/dev/uio0", "uio0"):
        assert parse_device_spec(spec, fs.root).bdf == IVSHMEM
    for bad in ("sim", "/dev/sda", "uio:nonsense", "/dev/uio0/../sda"):
        with pytest.raises(UioError if not bad.startswith("uio:") else Exception):
            parse_device_spec(bad, fs.root)


def test_ivshmem_only_when_asked_for(fs: FakeSysfs) -> None:
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")
    with pytest.raises(UioError, match=r"not an IOSM modem \(a test device"):
        UioDevice(f"uio:{IVSHMEM}", sysfs=fs.root, dev=_dev(fs))
    d = UioDevice(f"uio:{IVSHMEM}", frozenset({IVSHMEM_PCI_ID}), fs.root, _dev(fs))
    d.close()


def test_bar_mmap_is_the_resource_file(fs: FakeSysfs) -> None:
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")
    d = UioDevice("/dev/uio0", frozenset({IVSHMEM_PCI_ID}), fs.root, _dev(fs))
    try:
        mm = d.map_bar(2, min_size=0x8000)
        assert len(mm) == 0x10000
        mm[100:104] = b"ping"
        mm.flush()
        with open(fs.dev_dir(IVSHMEM) / "resource2", "rb") as f:
            f.seek(100)
            assert f.read(4) == b"ping"  # shared mapping: the other side sees it
        with pytest.raises(UioError, match="BAR2 is 65536 bytes, too small: the layout needs"):
            d.map_bar(2, min_size=0x10001)
        with pytest.raises(UioError, match="no BAR4"):
            d.map_bar(4)
    finally:
        d.close()


def test_not_bound_error_names_the_fix(fs: FakeSysfs) -> None:
    with pytest.raises(UioError, match=r"not bound to any driver.*new_id"):
        UioDevice(f"uio:{XMM}", sysfs=fs.root, dev=_dev(fs))
    with pytest.raises(UioError, match=r"no PCI device 0000:09:00\.0"):
        UioDevice("uio:0000:09:00.0", sysfs=fs.root, dev=_dev(fs))


def test_missing_node_reported(fs: FakeSysfs) -> None:
    fs.bind(XMM, "uio_pci_generic", "uio5")
    with pytest.raises(UioError, match=r"cannot open .*uio5"):
        UioDevice(f"uio:{XMM}", sysfs=fs.root, dev=_dev(fs))


def test_uio_maps_read_and_mapped_by_page_offset(fs: FakeSysfs) -> None:
    fs.bind(XMM, "uio_pci_generic", "uio1")
    fs.add_map("uio1", 0, 0x1000, addr=0xFE000000)
    fs.add_map("uio1", 1, 0x3000, addr=0x7F000000)
    (fs.root / "class/uio/uio1/maps/map1/name").write_text("dma\n")
    maps = read_maps("uio1", fs.root)
    assert [(m.index, m.name, m.addr, m.size) for m in maps] == [
        (0, "", 0xFE000000, 0x1000), (1, "dma", 0x7F000000, 0x3000)]
    node = _dev(fs) / "uio1"
    node.write_bytes(bytes(0x1000) + b"map1" + bytes(0x3000 - 4))  # page 1 = map1
    d = UioDevice(f"uio:{XMM}", sysfs=fs.root, dev=_dev(fs))
    try:
        m, mm = d.map_uio(1)
        assert m.name == "dma" and mm[:4] == b"map1" and len(mm) == 0x3000
        with pytest.raises(UioError, match="exports no map3"):
            d.map_uio(3)
    finally:
        d.close()
