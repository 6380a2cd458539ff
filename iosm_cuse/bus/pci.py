"""PCI device discovery through sysfs: which devices are IOSM modems, and whether UIO owns them.

Everything here reads the kernel's sysfs interface (`/sys/bus/pci/devices/<bdf>/vendor`,
`device`, `driver`, `resource`, `uio/`) under a root that tests may point at a fake tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SYSFS = Path("/sys")


class PciError(Exception):
    """A device is missing, malformed or not usable; the message says what to do."""


class PciId(NamedTuple):
    vendor: int
    device: int

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


# Intel XMM7560 (the IOSM driver's only real id) and XMM7360, which shares its PCIe IPC.
IOSM_PCI_IDS: frozenset[PciId] = frozenset({PciId(0x8086, 0x7560), PciId(0x8086, 0x7360)})
# QEMU's ivshmem (plain and doorbell): a test device, accepted only when asked for.
IVSHMEM_PCI_ID = PciId(0x1AF4, 0x1110)

# The driver that needs no kernel module of ours; named in hints and the udev rules.
UIO_PCI_GENERIC = "uio_pci_generic"

_BDF = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_UIO_NAME = re.compile(r"^uio[0-9]{1,4}$")
_PCI_ID = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{4})$")
# struct resource flags (include/linux/ioport.h) that tell what a BAR is.
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200


def parse_pci_id(text: str) -> PciId:
    """'1af4:1110' -> PciId; raises PciError on anything else."""
    m = _PCI_ID.match(text.strip().lower())
    if m is None:
        raise PciError(f"bad PCI id {text!r}: expected vendor:device in hex, like 8086:7560")
    return PciId(int(m.group(1), 16), int(m.group(2), 16))


def normalize_bdf(text: str) -> str:
    """'00:03.0' or '0000:00:03.0' -> '0000:00:03.0'; rejects anything that is not a PCI address
    (the result becomes a sysfs path component, so nothing else may pass)."""
    m = _BDF.match(text.strip().lower())
    if m is None:
        raise PciError(f"bad PCI address {text!r}: expected [domain:]bus:slot.function, "
                       "like 0000:03:00.0")
    domain = m.group(1) or "0000"
    return f"{domain}:{m.group(2)}:{m.group(3)}.{m.group(4)}"


@dataclass(frozen=True)
class Bar:
    """One line of sysfs `resource`: the BAR's bus address range and flags."""

    index: int
    start: int
    size: int
    flags: int

    @property
    def is_memory(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM)


@dataclass(frozen=True)
class PciDevice:
    bdf: str
    pci_id: PciId
    driver: str | None
    sys_path: Path
    uio: tuple[str, ...]  # names of UIO devices the bound driver created, e.g. ("uio0",)
    bars: tuple[Bar, ...]
    irq: int = 0  # sysfs `irq`: 0 = no interrupt line (uio_pci_generic then registers none)

    @property
    def is_iosm(self) -> bool:
        return self.pci_id in IOSM_PCI_IDS

    @property
    def uio_bound(self) -> bool:
        return bool(self.uio)

    def bar(self, index: int) -> Bar:
        for bar in self.bars:
            if bar.index == index:
                return bar
        raise PciError(f"{self.bdf} ({self.pci_id}) has no BAR{index}")

    def resource_path(self, index: int) -> Path:
        return self.sys_path / f"resource{index}"


def parse_resource(text: str) -> tuple[Bar, ...]:
    """sysfs `resource`: one 'start end flags' line per BAR (then ROM and bridge windows);
    unused BARs are all zeros. Malformed lines are skipped, not trusted."""
    bars: list[Bar] = []
    for index, line in enumerate(text.splitlines()[:6]):
        fields = line.split()
        if len(fields) != 3:
            continue
        try:
            start, end, flags = (int(f, 16) for f in fields)
        except ValueError:
            continue
        if end > start or (end == start and start != 0):
            bars.append(Bar(index, start, end - start + 1, flags))
    return tuple(bars)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _read_hex(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip(), 16)
    except ValueError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def read_device(bdf: str, sysfs: Path = SYSFS) -> PciDevice:
    """The PCI device at `bdf`, as sysfs describes it now."""
    bdf = normalize_bdf(bdf)
    path = sysfs / "bus" / "pci" / "devices" / bdf
    if not path.is_dir():
        raise PciError(f"no PCI device {bdf} (nothing at {path}); `lspci -nn` lists the devices")
    vendor, device = _read_hex(path / "vendor"), _read_hex(path / "device")
    if vendor is None or device is None:
        raise PciError(f"{path}: vendor/device unreadable")
    driver_link = path / "driver"
    driver = Path(driver_link.readlink()).name if driver_link.is_symlink() else None
    uio_dir = path / "uio"
    uio = tuple(sorted(p.name for p in uio_dir.iterdir() if _UIO_NAME.match(p.name))) \
        if uio_dir.is_dir() else ()
    bars = parse_resource(_read_text(path / "resource") or "")
    irq = _read_int(path / "irq")
    return PciDevice(bdf, PciId(vendor, device), driver, path, uio, bars, irq or 0)


def scan_pci(sysfs: Path = SYSFS) -> list[PciDevice]:
    """Every PCI device sysfs lists, in address order; unreadable entries are skipped."""
    root = sysfs / "bus" / "pci" / "devices"
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        try:
            found.append(read_device(entry.name, sysfs))
        except PciError:
            continue
    return found


def find_iosm_devices(sysfs: Path = SYSFS, extra_ids: frozenset[PciId] = frozenset()
                      ) -> list[PciDevice]:
    """IOSM modems present (bound or not), plus devices with `extra_ids` (test devices)."""
    wanted = IOSM_PCI_IDS | extra_ids
    return [d for d in scan_pci(sysfs) if d.pci_id in wanted]


def device_for_uio(uio_name: str, sysfs: Path = SYSFS) -> PciDevice:
    """The PCI device behind /dev/uioN (through /sys/class/uio/uioN/device)."""
    if not _UIO_NAME.match(uio_name):
        raise PciError(f"bad UIO device name {uio_name!r}: expected uioN")
    link = sysfs / "class" / "uio" / uio_name / "device"
    if not link.exists():
        raise PciError(f"no UIO device {uio_name} (nothing at {link})")
    bdf = link.resolve().name
    try:
        return read_device(bdf, sysfs)
    except PciError as exc:
        raise PciError(f"{uio_name} is not a PCI device's UIO node ({exc})") from exc


def bind_hint(dev: PciDevice) -> str:
    """How to hand `dev` to uio_pci_generic, as shell commands for the error message."""
    vid_did = f"{dev.pci_id.vendor:04x} {dev.pci_id.device:04x}"
    steps = []
    if dev.driver is not None:
        steps.append(f"echo {dev.bdf} > /sys/bus/pci/devices/{dev.bdf}/driver/unbind")
    steps.append(f"modprobe {UIO_PCI_GENERIC}")
    steps.append(f"echo {vid_did} > /sys/bus/pci/drivers/{UIO_PCI_GENERIC}/new_id")
    return "; ".join(steps)


def require_uio(dev: PciDevice) -> str:
    """The device's UIO node name, or a PciError saying how to bind it."""
    if not dev.uio:
        bound = f"bound to {dev.driver}" if dev.driver else "not bound to any driver"
        raise PciError(f"{dev.bdf} ({dev.pci_id}) is {bound}, not to a UIO driver; bind it with: "
                       f"{bind_hint(dev)}   (or install the udev rules: iosm-cuse install-udev)")
    return dev.uio[0]
