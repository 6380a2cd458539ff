"""The UIO backend's device access: BAR mmaps through sysfs, UIO maps, and the UIO interrupt.

`UioDevice` opens a PCI device bound to a UIO driver (uio_pci_generic, or a small module of
ours) given `uio:<bdf>`, `/dev/uioN` or `uioN`; the Bus built on it is further down.

What uio_pci_generic gives and does not give (see udev/README.md): BARs are reachable through
sysfs `resourceN`; the interrupt is legacy INTx only, delivered by `read()` on /dev/uioN and
re-armed by writing 1; no MSI and no DMA memory. A device without an INTx pin (QEMU's
ivshmem-plain) has no interrupt at all, and the bus then polls.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from iosm_cuse.bus.base import BAR0, BAR2, Bus, BusError, DmaPool
from iosm_cuse.bus.pci import (
    IOSM_PCI_IDS,
    IVSHMEM_PCI_ID,
    SYSFS,
    PciDevice,
    PciError,
    PciId,
    device_for_uio,
    read_device,
    require_uio,
)
from iosm_cuse.bus.shm import BAR0_SIZE, BAR2_SIZE, ShmLayout

log = logging.getLogger("iosm_cuse.bus.uio")

DEV = Path("/dev")
PAGE = mmap.PAGESIZE
_IRQ_COUNT = struct.Struct("=I")  # what read() on /dev/uioN returns: the event count, u32
_IRQ_ENABLE = _IRQ_COUNT.pack(1)  # what write() takes: 1 = unmask (uio_pci_generic: INTx)


class UioError(PciError, BusError):
    """The device cannot serve as a bus; the message says why and what to do."""


def parse_device_spec(spec: str, sysfs: Path = SYSFS) -> PciDevice:
    """'uio:0000:03:00.0', 'uio:03:00.0', '/dev/uio0', 'uio0' (or 'uio:/dev/uio0') -> the PCI
    device."""
    ref = spec.removeprefix("uio:")
    name = ref.removeprefix(str(DEV) + "/")
    if name.startswith("uio") and "/" not in name:
        return device_for_uio(name, sysfs)
    if spec.startswith("uio:"):
        return read_device(ref, sysfs)
    raise UioError(f"bad UIO device {spec!r}: expected uio:<PCI address> or /dev/uioN")


@dataclass(frozen=True)
class UioMap:
    """One of /sys/class/uio/uioN/maps/mapK: mmap /dev/uioN at offset K pages."""

    index: int
    name: str
    addr: int  # the physical/bus address the driver reported
    size: int


def read_maps(uio_name: str, sysfs: Path = SYSFS) -> list[UioMap]:
    root = sysfs / "class" / "uio" / uio_name / "maps"
    maps = []
    for k in range(5):  # MAX_UIO_MAPS
        d = root / f"map{k}"
        if not d.is_dir():
            break
        try:
            size = int((d / "size").read_text().strip(), 16)
            addr = int((d / "addr").read_text().strip(), 16)
        except (OSError, ValueError):
            continue
        try:
            name = (d / "name").read_text().strip()
        except OSError:
            name = ""
        maps.append(UioMap(k, name, addr, size))
    return maps


class UioDevice:
    """A UIO-bound PCI device: its BARs and UIO maps as mmaps, and its interrupt fd.

    Accepted ids: the IOSM modems, plus `test_ids` (ivshmem only when asked for)."""

    def __init__(self, spec: str, test_ids: frozenset[PciId] = frozenset(),
                 sysfs: Path = SYSFS, dev: Path = DEV) -> None:
        try:
            self.pci = parse_device_spec(spec, sysfs)
            self.uio_name = require_uio(self.pci)
        except UioError:
            raise
        except PciError as exc:  # one error type for callers of the backend
            raise UioError(str(exc)) from exc
        if self.pci.pci_id not in IOSM_PCI_IDS | test_ids:
            hint = " (a test device: pass it explicitly)" if self.pci.pci_id == IVSHMEM_PCI_ID \
                else ""
            raise UioError(f"{self.pci.bdf} ({self.pci.pci_id}) is not an IOSM modem{hint}")
        self.sysfs = sysfs
        self.maps = read_maps(self.uio_name, sysfs)
        self._mmaps: list[mmap.mmap] = []
        self._rearm = True
        node = dev / self.uio_name
        try:
            self.fd = os.open(node, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise UioError(f"cannot open {node}: {exc.strerror}") from exc
        # uio_pci_generic registers an interrupt only for a device with an IRQ line; the UIO
        # core then answers EIO to write(), which arm_irq() takes as "none" too.
        self.has_irq = self.pci.irq > 0 and self.arm_irq()

    def arm_irq(self) -> bool:
        """Unmask the interrupt (uio_pci_generic re-arms INTx on a write of 1). False if the
        device has none: the UIO core answers EIO when the driver registered no IRQ."""
        if not self._rearm:
            return True
        try:
            os.write(self.fd, _IRQ_ENABLE)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return False
            if exc.errno == errno.ENOSYS:  # an interrupt without irqcontrol: nothing to re-arm
                self._rearm = False
                return True
            raise
        return True

    def read_irq(self) -> int | None:
        """The interrupt count if an interrupt arrived since the last read, else None."""
        try:
            data = os.read(self.fd, _IRQ_COUNT.size)
        except BlockingIOError:
            return None
        if len(data) != _IRQ_COUNT.size:
            return None
        count: int = _IRQ_COUNT.unpack(data)[0]
        return count

    def map_bar(self, index: int, min_size: int = 0) -> mmap.mmap:
        """mmap BAR `index` through sysfs resourceN (read/write, shared)."""
        try:
            bar = self.pci.bar(index)
        except PciError as exc:
            raise UioError(str(exc)) from exc
        if not bar.is_memory:
            raise UioError(f"{self.pci.bdf} BAR{index} is not a memory BAR")
        if bar.size < min_size:
            raise UioError(f"{self.pci.bdf} BAR{index} is {bar.size} bytes, too small: the "
                           f"layout needs {min_size} (for ivshmem: give QEMU a larger "
                           "memory-backend size)")
        path = self.pci.resource_path(index)
        return self._mmap_file(path, bar.size, 0)

    def map_uio(self, index: int, min_size: int = 0) -> tuple[UioMap, mmap.mmap]:
        """mmap UIO map `index` of /dev/uioN (offset index pages, as the UIO core wants)."""
        found = [m for m in self.maps if m.index == index]
        if not found:
            raise UioError(f"{self.uio_name} exports no map{index}")
        m = found[0]
        if m.size < min_size:
            raise UioError(f"{self.uio_name} map{index} is {m.size} bytes, need {min_size}")
        size = (m.size + PAGE - 1) // PAGE * PAGE  # the UIO core maps whole pages only
        return m, self._mmap_fd(self.fd, size, index * PAGE)

    def _mmap_file(self, path: Path, size: int, offset: int) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except OSError as exc:
            raise UioError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            return self._mmap_fd(fd, size, offset)
        finally:
            os.close(fd)

    def _mmap_fd(self, fd: int, size: int, offset: int) -> mmap.mmap:
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=offset)
        except OSError as exc:
            raise UioError(f"{self.pci.bdf}: mmap of {size} bytes failed: {exc.strerror}") \
                from exc
        self._mmaps.append(mm)
        return mm

    def close(self) -> None:
        for mm in self._mmaps:
            # a memoryview still exported: its owner drops it, and the map goes with it
            with contextlib.suppress(BufferError):
                mm.close()
        self._mmaps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the Bus ------------------------------------------------------------------------------------

# Room the ivshmem region must leave for the DMA pool after the register pages (rings, TDs and a
# few transfer buffers); QEMU's memory-backend sizes are MiB anyway.
MIN_IVSHMEM_DMA = 256 * 1024
DMA_MAP_NAME = "dma"  # a UIO map with this name is a DMA-coherent pool; its addr is the bus address


class UioBus(Bus):
    """The host's Bus over a UIO-bound device.

    - ivshmem (1af4:1110): BAR2 holds everything, in `ShmLayout.single_file` order (the layout
      `iosm-cuse modem --shm <backing file>` serves on the host): BAR0 page, BAR2 page, DMA pool;
      DMA address = offset in the BAR.
    - an IOSM modem: BAR0 and BAR2 through sysfs; the DMA pool must be a UIO map named 'dma'
      (from a UIO module of ours: uio_pci_generic has none), its `addr` the bus address.

    The interrupt is `read()` on /dev/uioN, re-armed by writing 1; a device without one is
    polled every `poll_interval` seconds.
    """

    shared: memoryview | None = None  # ivshmem only: the whole shared region

    def __init__(self, device: UioDevice) -> None:
        self.device = device
        self._irq_count = 0
        self._bars: dict[int, memoryview] = {}
        self._closed = False
        try:
            if device.pci.pci_id == IVSHMEM_PCI_ID:
                self._open_ivshmem()
            else:
                self._open_modem()
        except BaseException:
            self.close()
            raise
        if not device.has_irq:
            log.info("%s (%s): no interrupt from %s, polling every %.0f ms", device.pci.bdf,
                     device.uio_name, device.pci.driver or "its driver", self.poll_interval * 1e3)

    def _open_ivshmem(self) -> None:
        size = self.device.pci.bar(BAR2).size
        mm = self.device.map_bar(BAR2, min_size=BAR0_SIZE + BAR2_SIZE + MIN_IVSHMEM_DMA)
        layout = ShmLayout.single_file(size)
        self.layout = layout
        whole = memoryview(mm)
        self._bars = {BAR0: whole[layout.bar0.offset:layout.bar0.offset + layout.bar0.size],
                      BAR2: whole[layout.bar2.offset:layout.bar2.offset + layout.bar2.size]}
        self.dma = DmaPool(whole[layout.dma.offset:layout.dma.offset + layout.dma.size],
                           layout.dma_base_addr)
        self._views = [whole]
        self.shared = whole  # the whole region, indexed by offset in the host's backing file

    def _open_modem(self) -> None:
        pool = [m for m in self.device.maps if m.name == DMA_MAP_NAME]
        if not pool:
            raise UioError(
                f"{self.device.pci.bdf}: {self.device.pci.driver or 'the UIO driver'} exports no "
                f"DMA memory (no UIO map named {DMA_MAP_NAME!r}); uio_pci_generic cannot drive "
                "an IOSM modem: it needs a UIO module with a DMA-coherent pool and MSI, or VFIO "
                "(see udev/README.md)")
        bar0 = memoryview(self.device.map_bar(BAR0))
        bar2 = memoryview(self.device.map_bar(BAR2))
        m, mm = self.device.map_uio(pool[0].index)
        dma = memoryview(mm)[:m.size]
        self._bars = {BAR0: bar0, BAR2: bar2}
        self.dma = DmaPool(dma, m.addr)
        self._views = [bar0, bar2, dma]

    @property
    def event_fd(self) -> int | None:
        return self.device.fd if self.device.has_irq and self.device.fd >= 0 else None

    def ack_event(self) -> int:
        """Interrupts since the last call; re-arms the (INTx) interrupt."""
        if self.event_fd is None:
            return 0
        count = self.device.read_irq()
        if count is None:
            return 0
        new = (count - self._irq_count) & 0xFFFFFFFF
        self._irq_count = count
        self.device.arm_irq()
        return new

    def notify(self) -> None:
        """Doorbell writes are the device's signal; ivshmem-plain has no doorbell: the model
        polls its registers."""
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bars.clear()
        if hasattr(self, "dma"):
            self.dma.mem.release()
        self.shared = None
        for view in getattr(self, "_views", []):
            view.release()
        self.device.close()


def open_uio_bus(spec: str, test_ids: frozenset[PciId] = frozenset({IVSHMEM_PCI_ID}),
                 sysfs: Path = SYSFS, dev: Path = DEV) -> UioBus:
    """`uio:<bdf>`, `/dev/uioN` or `uioN` -> a host Bus. The spec names the device explicitly,
    so the ivshmem test device is accepted here; discovery (`find_iosm_devices`) never offers
    it. Raises UioError with what to do."""
    return UioBus(UioDevice(spec, test_ids, sysfs, dev))


class UioModemDevice:
    """What the daemon drives (`bus`, `description`, `close()`, `recover()`): a UIO-bound modem
    or the ivshmem test device with the model on the VM's host."""

    def __init__(self, bus: UioBus) -> None:
        self.bus = bus
        pci = bus.device.pci
        what = "ivshmem test device" if pci.pci_id == IVSHMEM_PCI_ID else f"modem {pci.pci_id}"
        self.description = f"{what} {pci.bdf} ({bus.device.uio_name})"

    @classmethod
    async def open(cls, spec: str) -> UioModemDevice:
        return cls(open_uio_bus(spec))

    async def recover(self) -> None:
        """After the modem went down: it owns no DMA memory any more; the engine then repeats
        the boot handshake. (A function reset through sysfs `reset` would go here for real
        hardware; nothing drives one yet.)"""
        self.bus.dma.reset()

    async def close(self) -> None:
        self.bus.close()
