"""A fake sysfs tree in a temporary directory, laid out the way the kernel lays it out.

Only the parts the PCI/UIO code reads: /sys/devices/pci0000:00/<bdf>/{vendor,device,resource,
resourceN,irq,driver,uio/uioN}, the /sys/bus/pci/devices and /sys/class/uio symlinks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class FakeSysfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        (root / "class" / "uio").mkdir(parents=True, exist_ok=True)
        (root / "devices" / "pci0000:00").mkdir(parents=True, exist_ok=True)

    def dev_dir(self, bdf: str) -> Path:
        return self.root / "devices" / "pci0000:00" / bdf

    def add_pci(self, bdf: str, vendor: int, device: int, bars: dict[int, int] | None = None,
                irq: int = 0) -> Path:
        """A device with memory BARs {index: size}; resourceN files are real files of that size."""
        path = self.dev_dir(bdf)
        path.mkdir(parents=True)
        (path / "vendor").write_text(f"0x{vendor:04x}\n")
        (path / "device").write_text(f"0x{device:04x}\n")
        (path / "irq").write_text(f"{irq}\n")
        lines = []
        base = 0xFE000000
        for index in range(13):
            size = (bars or {}).get(index, 0)
            if size:
                lines.append(f"0x{base:016x} 0x{base + size - 1:016x} 0x{0x40200:016x}")
                with open(path / f"resource{index}", "wb") as f:
                    f.truncate(size)
                base += size
            else:
                lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
        (path / "resource").write_text("\n".join(lines) + "\n")
        os.symlink(f"../../../devices/pci0000:00/{bdf}",
                   self.root / "bus" / "pci" / "devices" / bdf)
        return path

    def bind(self, bdf: str, driver: str, uio: str | None = None) -> None:
        drv = self.root / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        path = self.dev_dir(bdf)
        os.symlink(f"../../../bus/pci/drivers/{driver}", path / "driver")
        if uio is not None:
            node = path / "uio" / uio
            node.mkdir(parents=True)
            os.symlink("../../../" + bdf, node / "device")
            os.symlink(f"../../devices/pci0000:00/{bdf}/uio/{uio}",
                       self.root / "class" / "uio" / uio)

    def add_map(self, uio: str, index: int, size: int, addr: int = 0, offset: int = 0) -> None:
        m = self.root / "class" / "uio" / uio / "maps" / f"map{index}"
        m.mkdir(parents=True)
        (m / "size").write_text(f"0x{size:016x}\n")
        (m / "addr").write_text(f"0x{addr:016x}\n")
        (m / "offset").write_text(f"0x{offset:x}\n")

    def unbind(self, bdf: str) -> None:
        path = self.dev_dir(bdf)
        (path / "driver").unlink()
        uio_dir = path / "uio"
        if uio_dir.is_dir():
            for node in uio_dir.iterdir():
                (self.root / "class" / "uio" / node.name).unlink()
            shutil.rmtree(uio_dir)
