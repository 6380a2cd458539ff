"""UioDevice against a fake sysfs tree: specs, id policy, BAR and UIO-map mmaps, errors.
(Interrupt semantics need the real UIO core: tests/kernel/test_uio_ivshmem.py.)"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import pytest
from uio_fakesys import FakeSysfs

from iosm_cuse.bus.base import BAR0, BAR2, doorbell_offset
from iosm_cuse.bus.pci import IVSHMEM_PCI_ID
from iosm_cuse.bus.shm import DEVICE, ShmBus
from iosm_cuse.bus.uio import UioDevice, UioError, open_uio_bus, parse_device_spec, read_maps

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
    for spec in (f"uio:{IVSHMEM}", "uio:00:03.0", "/dev/uio0", "uio0", "uio:/dev/uio0"):
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


# --- the Bus over the device --------------------------------------------------------------------

def test_ivshmem_bus_agrees_with_the_shm_single_file_layout(fs: FakeSysfs) -> None:
    """The guest's UioBus over resource2 and the host model's ShmBus over the same bytes (the
    ivshmem backing file) see each other's registers and DMA memory at the same addresses."""
    size = 1 << 20
    res = fs.dev_dir(IVSHMEM) / "resource2"
    res.unlink()
    fs.dev_dir(IVSHMEM).joinpath("resource").write_text(
        "0x00000000fe000000 0x00000000fe0000ff 0x0000000000040200\n"
        f"{'0x0000000000000000 ' * 2}0x0000000000000000\n"
        f"0x0000000800000000 0x{0x800000000 + size - 1:016x} 0x000000000014220c\n")
    with open(res, "wb") as f:
        f.truncate(size)
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")
    host = open_uio_bus(f"uio:{IVSHMEM}", sysfs=fs.root, dev=_dev(fs))
    model = ShmBus.open_file(res, DEVICE)
    try:
        model.write32(BAR2, 0x10, 0xCAFE0001)  # device writes its scratchpad
        assert host.read32(BAR2, 0x10) == 0xCAFE0001
        host.write32(BAR0, doorbell_offset(1), 7)
        assert model.read32(BAR0, doorbell_offset(1)) == 7
        region = host.dma.alloc(100)
        region.view[:5] = b"hello"
        assert bytes(model.dma.view_at(region.addr, 5)) == b"hello"
        assert host.dma.base_addr == model.dma.base_addr and host.dma.size == model.dma.size
        with open(res, "rb") as f:  # DMA address = offset in the BAR, as the layout says
            f.seek(region.addr)
            assert f.read(5) == b"hello"
    finally:
        host.close()
        model.close()


def test_ivshmem_bar_too_small(fs: FakeSysfs) -> None:
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")  # BAR2 of 64 KiB in the fixture
    with pytest.raises(UioError, match="BAR2 is 65536 bytes, too small"):
        open_uio_bus("/dev/uio0", sysfs=fs.root, dev=_dev(fs))


def test_modem_under_uio_pci_generic_has_no_dma_pool(fs: FakeSysfs) -> None:
    fs.bind(XMM, "uio_pci_generic", "uio1")
    with pytest.raises(UioError, match=r"exports no DMA memory.*UIO module.*or VFIO"):
        open_uio_bus(f"uio:{XMM}", sysfs=fs.root, dev=_dev(fs))


def test_modem_with_a_dma_map_uses_its_bus_address(fs: FakeSysfs) -> None:
    fs.bind(XMM, "iosm_uio", "uio1")
    fs.add_map("uio1", 0, 0x1000, addr=0xFE000000)
    fs.add_map("uio1", 1, 0x4000, addr=0x7F000000)
    (fs.root / "class/uio/uio1/maps/map1/name").write_text("dma\n")
    (_dev(fs) / "uio1").write_bytes(bytes(0x5000))
    bus = open_uio_bus(f"uio:{XMM}", sysfs=fs.root, dev=_dev(fs))
    try:
        r = bus.dma.alloc(64)
        assert 0x7F000000 <= r.addr < 0x7F004000
        assert len(bus.bar(BAR0)) == 0x1000 and len(bus.bar(BAR2)) == 0x1000
        bus.write32(BAR2, 0, 0x12345678)
        with open(fs.dev_dir(XMM) / "resource2", "rb") as f:
            assert f.read(4) == bytes.fromhex("78563412")
    finally:
        bus.close()
        bus.close()  # idempotent


def test_interrupt_only_with_an_irq_line(fs: FakeSysfs, tmp_path: Path) -> None:
    """uio_pci_generic registers no interrupt for a device without an IRQ line (ivshmem-plain):
    the bus then offers no event fd and polls."""
    fs.bind(IVSHMEM, "uio_pci_generic", "uio0")
    with closing(UioDevice("/dev/uio0", frozenset({IVSHMEM_PCI_ID}), fs.root, _dev(fs))) as d:
        assert d.pci.irq == 0 and not d.has_irq
    (fs.dev_dir(IVSHMEM) / "irq").write_text("11\n")
    with closing(UioDevice("/dev/uio0", frozenset({IVSHMEM_PCI_ID}), fs.root, _dev(fs))) as d:
        assert d.pci.irq == 11 and d.has_irq  # the re-arm write was accepted
        assert (_dev(fs) / "uio0").read_bytes() == (1).to_bytes(4, "little")
