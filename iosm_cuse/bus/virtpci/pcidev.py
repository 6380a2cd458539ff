"""The PCI function behind virt-pci, pure: its config space and the virtio_pcidev messages
(docs/uml-virtpci.md §6, §7).

UML's virt-pci driver turns every config-space and BAR access of the guest kernel into a message
on queue 0: `{u8 op, u8 bar, u16 reserved, u32 size, u64 addr, data}`; reads come with a
writable buffer for the answer. Interrupts go the other way on queue 1, as an MSI message carrying
the data the kernel programmed into the MSI capability. `PciFunction.handle` answers one message
against the BAR memories it was given; it reports doorbell writes (BAR0) so the adapter can wake
the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from iosm_cuse.wire.record import Record
from iosm_cuse.wire.rejects import Rejects


class Op(enum.IntEnum):
    CFG_READ = 1
    CFG_WRITE = 2
    MMIO_READ = 3
    MMIO_WRITE = 4
    MMIO_MEMSET = 5
    INT = 6
    MSI = 7
    PME = 8


PCIDEV_MSG = Record.sequential("virtio_pcidev_msg", ("op", "B"), ("bar", "B"),
                               ("_reserved", "H"), ("size", "I"), ("addr", "Q"))
_MSG = PCIDEV_MSG.record
MSI_MSG_SIZE = PCIDEV_MSG.size + 4  # what the front end's interrupt buffers hold
CFG_SIZE = 256  # conventional config space; the extended space reads as all-ones
CFG_WINDOW = 4096  # what virt-pci maps per function
MAX_MMIO = 4096  # no BAR access is larger than a page

# ---- config space layout (PCI Local Bus spec type 0 header) ---------------------------------

VENDOR_ID, DEVICE_ID, COMMAND, STATUS, REVISION, CLASS_PROG = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
CACHE_LINE, LATENCY, HEADER_TYPE, BAR_BASE = 0x0C, 0x0D, 0x0E, 0x10
SUBSYS_VENDOR, SUBSYS_ID, CAP_PTR, INT_LINE, INT_PIN = 0x2C, 0x2E, 0x34, 0x3C, 0x3D
STATUS_CAP_LIST = 1 << 4
COMMAND_WRITABLE = 0x0547  # I/O, memory, bus master, parity, SERR, INTx disable
BAR_MEM64 = 0x4  # memory BAR, 64-bit, not prefetchable
CAP_ID_MSI = 0x05
MSI_CAP = 0x40
MSI_CTRL, MSI_ADDR_LO, MSI_ADDR_HI, MSI_DATA = MSI_CAP + 2, MSI_CAP + 4, MSI_CAP + 8, MSI_CAP + 12
MSI_CTRL_ENABLE = 1 << 0
MSI_CTRL_64BIT = 1 << 7
MSI_CTRL_MME = 0x70  # multiple message enable: one vector offered, so the field stays 0

# The modem's function (docs/uml-virtpci.md §7): class 0x0d4000, revision 1, BAR0 4 KiB
# (doorbells), BAR2 256 bytes (scratchpad), both 64-bit memory, one MSI vector.
MODEM_CLASS = 0x0D4000
MODEM_REVISION = 0x01
BAR_SIZES = {0: 4096, 2: 256}


@dataclass(frozen=True)
class PcidevMsg:
    op: int
    bar: int
    size: int
    addr: int
    data: bytes


def decode_msg(raw: bytes, rejects: Rejects) -> PcidevMsg | None:
    if len(raw) < PCIDEV_MSG.size:
        rejects("pcidev_short", "virt-pci message of %d bytes", len(raw))
        return None
    op, bar, size, addr = _MSG.unpack_from(raw)
    return PcidevMsg(op, bar, size, addr, raw[PCIDEV_MSG.size:])


def encode_msg(op: int, bar: int = 0, size: int = 0, addr: int = 0, data: bytes = b"") -> bytes:
    return _MSG.pack(op, bar, size, addr) + data


def encode_msi(data: int) -> bytes:
    """The interrupt message: virt-pci hands the data to generic_handle_irq()."""
    return encode_msg(Op.MSI, 0, 4, 0, (data & 0xFFFFFFFF).to_bytes(4, "little"))


class ConfigSpace:
    """256 bytes of type-0 header plus one MSI capability; writes go through a per-byte
    writable mask, so BAR sizing (write all-ones, read back the mask) falls out of it."""

    def __init__(self, vendor: int, device: int, *, subsystem: tuple[int, int] | None = None,
                 class_code: int = MODEM_CLASS, revision: int = MODEM_REVISION,
                 bars: dict[int, int] | None = None) -> None:
        self.bytes = bytearray(CFG_SIZE)
        self.mask = bytearray(CFG_SIZE)
        b = self.bytes
        sub_vendor, sub_device = subsystem or (vendor, device)
        self._put(VENDOR_ID, 2, vendor)
        self._put(DEVICE_ID, 2, device)
        self._put(STATUS, 2, STATUS_CAP_LIST)
        b[REVISION] = revision
        self._put(CLASS_PROG, 3, class_code)
        self._put(SUBSYS_VENDOR, 2, sub_vendor)
        self._put(SUBSYS_ID, 2, sub_device)
        b[CAP_PTR] = MSI_CAP
        b[INT_PIN] = 1  # INTA, as the real function reports (iosm asks for MSI only)
        self._mask(COMMAND, 2, COMMAND_WRITABLE)
        self._mask(CACHE_LINE, 1, 0xFF)
        self._mask(LATENCY, 1, 0xFF)
        self._mask(INT_LINE, 1, 0xFF)
        self.bar_sizes = dict(bars if bars is not None else BAR_SIZES)
        for index, size in self.bar_sizes.items():
            off = BAR_BASE + 4 * index
            self._put(off, 4, BAR_MEM64)
            self._mask(off, 4, ~(size - 1) & 0xFFFFFFF0)
            self._mask(off + 4, 4, 0xFFFFFFFF)  # upper half of the 64-bit address
        b[MSI_CAP] = CAP_ID_MSI
        self._put(MSI_CTRL, 2, MSI_CTRL_64BIT)
        self._mask(MSI_CTRL, 2, MSI_CTRL_ENABLE)
        self._mask(MSI_ADDR_LO, 4, 0xFFFFFFFC)
        self._mask(MSI_ADDR_HI, 4, 0xFFFFFFFF)
        self._mask(MSI_DATA, 2, 0xFFFF)

    def _put(self, off: int, n: int, value: int) -> None:
        self.bytes[off:off + n] = (value & ((1 << 8 * n) - 1)).to_bytes(n, "little")

    def _mask(self, off: int, n: int, value: int) -> None:
        self.mask[off:off + n] = (value & ((1 << 8 * n) - 1)).to_bytes(n, "little")

    def _get(self, off: int, n: int) -> int:
        return int.from_bytes(self.bytes[off:off + n], "little")

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at `offset`; beyond the conventional space, all-ones (no extended space)."""
        return bytes(self.bytes[i] if i < CFG_SIZE else 0xFF for i in range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data, offset):
            if i < CFG_SIZE:
                m = self.mask[i]
                self.bytes[i] = (self.bytes[i] & ~m) | (value & m)

    @property
    def msi_enabled(self) -> bool:
        return bool(self._get(MSI_CTRL, 2) & MSI_CTRL_ENABLE)

    @property
    def msi_address(self) -> int:
        return self._get(MSI_ADDR_LO, 4) | self._get(MSI_ADDR_HI, 4) << 32

    @property
    def msi_data(self) -> int:
        return self._get(MSI_DATA, 2)

    @property
    def memory_enabled(self) -> bool:
        return bool(self._get(COMMAND, 2) & 0x2)

    def bar_address(self, index: int) -> int:
        off = BAR_BASE + 4 * index
        return (self._get(off, 4) & 0xFFFFFFF0) | self._get(off + 4, 4) << 32


@dataclass
class Outcome:
    """What one message did: the reply for a read (None for posted writes) and whether a BAR0
    register was written (the model's doorbell)."""

    reply: bytes | None = None
    doorbell: bool = False


class PciFunction:
    """Config space + BAR memories; answers virt-pci messages."""

    def __init__(self, config: ConfigSpace, bars: dict[int, memoryview], rejects: Rejects,
                 doorbell_bar: int = 0) -> None:
        self.config = config
        self.bars = bars
        self.rejects = rejects
        self.doorbell_bar = doorbell_bar
        self.counts: dict[str, int] = {op.name.lower(): 0 for op in Op}

    def handle(self, raw: bytes) -> Outcome:
        msg = decode_msg(raw, self.rejects)
        if msg is None:
            return Outcome()
        try:
            op = Op(msg.op)
        except ValueError:
            self.rejects("pcidev_op", "unknown virt-pci op %d", msg.op)
            return Outcome()
        self.counts[op.name.lower()] += 1
        if op is Op.CFG_READ:
            if not self._cfg_ok(msg):
                return Outcome(b"\xff" * min(msg.size, 8))
            return Outcome(self.config.read(msg.addr, msg.size))
        if op is Op.CFG_WRITE:
            if self._cfg_ok(msg):
                if len(msg.data) < msg.size:
                    self.rejects("pcidev_short", "config write of %d with %d data bytes",
                                 msg.size, len(msg.data))
                else:
                    self.config.write(msg.addr, msg.data[:msg.size])
            return Outcome()
        if op is Op.MMIO_READ:
            view = self._bar(msg)
            return Outcome(bytes(view) if view is not None else b"\xff" * min(msg.size, MAX_MMIO))
        if op is Op.MMIO_WRITE:
            view = self._bar(msg)
            if view is None:
                return Outcome()
            if len(msg.data) < msg.size:
                self.rejects("pcidev_short", "BAR%d write of %d with %d data bytes", msg.bar,
                             msg.size, len(msg.data))
                return Outcome()
            view[:] = msg.data[:msg.size]
            return Outcome(doorbell=msg.bar == self.doorbell_bar)
        if op is Op.MMIO_MEMSET:
            view = self._bar(msg)
            if view is None or not msg.data:
                if view is not None:
                    self.rejects("pcidev_short", "BAR%d memset without a byte", msg.bar)
                return Outcome()
            view[:] = msg.data[:1] * msg.size
            return Outcome(doorbell=msg.bar == self.doorbell_bar)
        self.rejects("pcidev_op", "%s travels device to host, not on the command queue",
                     op.name)
        return Outcome()

    def _cfg_ok(self, msg: PcidevMsg) -> bool:
        if msg.size not in (1, 2, 4, 8) or msg.addr + msg.size > CFG_WINDOW:
            self.rejects("pcidev_cfg", "config access of %d bytes at %#x", msg.size, msg.addr)
            return False
        return True

    def _bar(self, msg: PcidevMsg) -> memoryview | None:
        mem = self.bars.get(msg.bar)
        if mem is None or msg.bar not in self.config.bar_sizes:
            self.rejects("pcidev_bar", "access to BAR%d, which the function does not have",
                         msg.bar)
            return None
        size = self.config.bar_sizes[msg.bar]
        if msg.size == 0 or msg.size > MAX_MMIO or msg.addr + msg.size > min(size, len(mem)):
            self.rejects("pcidev_mmio", "BAR%d access of %d bytes at %#x", msg.bar, msg.size,
                         msg.addr)
            return None
        return mem[msg.addr:msg.addr + msg.size]
