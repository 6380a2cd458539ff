"""What the guest boots: an uncompressed vmlinux (cached) and a small busybox initramfs.

Stdlib only: this runs before any virtual environment exists.
"""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Mounting the host's root and the work tree over 9p needs these (and their dependencies).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# With systemd as PID 1 the root is an overlay: the host's root read-only below, tmpfs above.
SYSTEMD_BOOT_MODULES = (*BOOT_MODULES, "overlay")
SYSTEMD_UNITS = Path(__file__).resolve().parent / "systemd"
# Units the systemd guest must not start: they are slow under TCG, touch interfaces or files
# that are not the guest's, or wait for things that never come. Masked (linked to /dev/null)
# in the overlay's /etc, so the host's own configuration is never read for them.
MASKED_UNITS = (
    "getty.target",  # no logins on the test console
    "timers.target",  # apt-daily, man-db, e2scrub... would wake up during a test
    "networking.service",  # ifupdown would configure the host's interfaces file
    "systemd-networkd.service", "systemd-networkd.socket",
    "systemd-networkd-wait-online.service", "NetworkManager-wait-online.service",
    "systemd-timesyncd.service",  # no network to sync time over
    "systemd-remount-fs.service",  # the root is the overlay the initramfs made; no fstab root
    "systemd-hwdb-update.service",  # ~10 s under TCG, and the host's hwdb.bin is there
    "ldconfig.service", "systemd-journal-catalog-update.service",
    "systemd-update-done.service",  # ConditionNeedsUpdate: the fresh /etc looks out of date
    "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-journal-flush.service",  # volatile journal (journald-volatile.conf)
)

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"
ELF_MAGIC = b"\x7fELF"


class VmError(Exception):
    """The guest could not be prepared or run; the message names the cause."""


@dataclass(frozen=True)
class Kernel:
    path: Path  # what the user chose or we found (bzImage or ELF)
    version: str  # the modules directory name under /lib/modules


def find_kernel() -> Kernel:
    """IOSM_VM_KERNEL if set, else the newest /boot/vmlinuz-* that has its modules installed."""
    chosen = os.environ.get("IOSM_VM_KERNEL")
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise VmError(f"kernel not found: {chosen} (from IOSM_VM_KERNEL)")
        version = os.environ.get("IOSM_VM_KVER") or kernel_version(path)
        return _with_modules(Kernel(path, version))
    candidates = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime, reverse=True)
    for candidate in candidates:
        version = candidate.removeprefix("/boot/vmlinuz-")
        if Path("/lib/modules", version, "modules.dep").is_file():
            return Kernel(Path(candidate), version)
    raise VmError(
        "kernel not found: no /boot/vmlinuz-* with modules in /lib/modules "
        "(install linux-image-amd64, or set IOSM_VM_KERNEL)"
    )


def _with_modules(kernel: Kernel) -> Kernel:
    if not Path("/lib/modules", kernel.version, "modules.dep").is_file():
        raise VmError(
            f"kernel modules not found: /lib/modules/{kernel.version} for {kernel.path} "
            "(set IOSM_VM_KVER if the version was guessed wrong)"
        )
    return kernel


def kernel_version(path: Path) -> str:
    """The release string, from a bzImage's setup header or an ELF's 'Linux version' banner."""
    data = path.read_bytes()
    if data[0x202:0x206] == b"HdrS":
        offset = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
        return data[offset : offset + 256].split(b" ", 1)[0].decode()
    match = re.search(rb"Linux version (\S+)", data)
    if match is None:
        raise VmError(f"kernel version unknown: {path} (set IOSM_VM_KVER)")
    return match.group(1).decode()


def vmlinux(kernel: Kernel, cache: Path) -> Path:
    """The uncompressed ELF kernel: Debian's has CONFIG_PVH, so QEMU boots it without firmware
    or decompression (about 6 s less per boot under TCG)."""
    if kernel.path.read_bytes()[:4] == ELF_MAGIC:
        return kernel.path
    stat = kernel.path.stat()
    out = cache / f"vmlinux-{kernel.version}-{stat.st_size}-{int(stat.st_mtime)}"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    elf = _decompress_bzimage(kernel.path.read_bytes(), kernel.path)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    tmp.replace(out)  # atomic: several runs may share the cache
    return out


def _decompress_bzimage(data: bytes, path: Path) -> bytes:
    """Find the compressed payload inside the bzImage and return the ELF within it."""
    for magic, decompress in ((XZ_MAGIC, _unxz), (GZIP_MAGIC, _gunzip)):
        start = data.find(magic)
        while start != -1:
            try:
                elf = decompress(data[start:])
            except (lzma.LZMAError, OSError, EOFError):
                elf = b""
            if elf[:4] == ELF_MAGIC:
                return elf
            start = data.find(magic, start + 1)
    raise VmError(f"kernel not usable: no xz or gzip payload with an ELF kernel in {path}")


def _unxz(blob: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)


def _gunzip(blob: bytes) -> bytes:
    return gzip.GzipFile(fileobj=_Reader(blob)).read()


class _Reader:
    """A minimal file object so gzip stops at the end of its member (trailing bytes follow)."""

    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._blob) if size < 0 else self._pos + size
        chunk = self._blob[self._pos : end]
        self._pos += len(chunk)
        return chunk


def module_load_order(version: str, names: tuple[str, ...]) -> list[Path]:
    """Module files in the order they must be inserted, as the host's modprobe resolves them."""
    order: list[Path] = []
    for name in names:
        try:
            out = subprocess.run(
                ["modprobe", "-S", version, "--show-depends", name],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        except FileNotFoundError as exc:
            raise VmError("modprobe not found (install kmod)") from exc
        except subprocess.CalledProcessError as exc:
            reason = exc.stderr.strip()
            raise VmError(f"module {name} not found for kernel {version}: {reason}") from exc
        for line in out.splitlines():
            words = shlex.split(line)
            if words[:1] == ["insmod"] and Path(words[1]) not in order:
                order.append(Path(words[1]))
    return order


INIT_TEMPLATE = """#!/bin/busybox sh
# PID 1 of the initramfs: mount the host's root read-only and the work tree read-write over 9p,
# then switch_root into the host's root and hand over to tests/vm/guest.sh.
/bin/busybox --install -s /bin
export PATH=/bin
die() {{ echo "iosm-vm init: $*"; poweroff -f; }}
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /modules/$m || die "insmod $m failed"; done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts,ro,cache=loose hostroot /newroot || die "mount hostroot failed"
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || die "no /tmp on the host root"
mount -t tmpfs -o mode=755 tmpfs /newroot/run || die "no /run on the host root"
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp || die "no /var/tmp on the host root"
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
# The work tree is not cached, so edits made on the host while the guest runs (and files the
# host writes into the run directory) are seen whole; .venv is cached (imports of pytest & co.
# are ~11x slower under TCG and it does not change during a run).
mkdir -p /newroot{work} 2>/dev/null  # a work tree under /tmp needs its mount point on the tmpfs
mount -t 9p -o $opts work /newroot{work} || die "mount work tree {work} failed"
if [ -d /newroot{work}/.venv ]; then
    mount -t 9p -o $opts,ro,cache=loose venv /newroot{work}/.venv || die "mount .venv failed"
fi
exec switch_root /newroot /bin/sh {work}/tests/vm/guest.sh {run_dir}
"""


SYSTEMD_INIT_TEMPLATE = """#!/bin/busybox sh
# PID 1 of the initramfs for a guest with systemd as PID 1: the host's root read-only over 9p
# under a tmpfs in an overlay (so /etc and /var are writable and nothing reaches the host), the
# work tree read-write over 9p, the guest's units from /etc-guest, then systemd.
/bin/busybox --install -s /bin
export PATH=/bin
die() {{ echo "iosm-vm init: $*"; poweroff -f; }}
mkdir -p /proc /sys /dev /newroot /lower /upper
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /modules/$m || die "insmod $m failed"; done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts,ro,cache=loose hostroot /lower || die "mount hostroot failed"
mount -t tmpfs -o mode=755 tmpfs /upper || die "no tmpfs for the overlay"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \\
    || die "mount overlay failed"
cp -a /etc-guest/. /newroot/etc/ || die "cannot write the guest's /etc"
# The host may be a container: its /.dockerenv makes systemd in the guest believe it is one too
# and skip units with ConditionVirtualization=!container (ModemManager's). Hide it in the guest.
rm -f /newroot/.dockerenv /newroot/run/.containerenv
# Empty /tmp and /var/tmp, as in the plain boot: through the overlay they would show the host's,
# and systemd-tmpfiles' boot-time clean-up would walk all of it over 9p (~45 s under TCG).
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || die "no /tmp on the host root"
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp || die "no /var/tmp on the host root"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot{work}
mount -t 9p -o $opts work /newroot{work} || die "mount work tree {work} failed"
if [ -d /newroot{work}/.venv ]; then
    mount -t 9p -o $opts,ro,cache=loose venv /newroot{work}/.venv || die "mount .venv failed"
fi
exec switch_root /newroot /lib/systemd/systemd
"""


def initramfs(kernel: Kernel, work: Path, run_dir: Path, systemd: bool = False) -> bytes:
    """A newc cpio archive: busybox, the 9p/virtio modules and an init for this work tree;
    with `systemd`, also overlay and the guest's /etc additions, and systemd as PID 1."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).is_file():
        raise VmError("busybox not found (install busybox-static)")
    if systemd and not Path("/lib/systemd/systemd").is_file():
        raise VmError("systemd not found (install systemd, udev, dbus, polkitd, modemmanager, "
                      "network-manager)")
    modules = module_load_order(kernel.version, SYSTEMD_BOOT_MODULES if systemd else BOOT_MODULES)
    archive = _Cpio()
    for directory in ("bin", "modules", "proc", "sys", "dev", "newroot"):
        archive.add(directory, b"", 0o040755)
    if systemd:
        _add_guest_etc(archive, work, run_dir)
    archive.add("bin/busybox", Path(busybox).read_bytes(), 0o100755)
    names = []
    for module in modules:
        name = module.name.split(".ko")[0] + ".ko"
        archive.add(f"modules/{name}", _module_bytes(module), 0o100644)
        names.append(name)
    template = SYSTEMD_INIT_TEMPLATE if systemd else INIT_TEMPLATE
    init = template.format(
        modules=" ".join(names), work=shlex.quote(str(work)), run_dir=shlex.quote(str(run_dir))
    )
    archive.add("init", init.encode(), 0o100755)
    return archive.finish()


def _add_guest_etc(archive: _Cpio, work: Path, run_dir: Path) -> None:
    """/etc-guest: what the init copies over the overlay's /etc before systemd starts."""
    units = "etc-guest/systemd/system"
    for directory in ("etc-guest", "etc-guest/systemd", units, "etc-guest/systemd/journald.conf.d"):
        archive.add(directory, b"", 0o040755)
    for name in ("iosm-vm.target", "iosm-vm-test.service"):
        archive.add(f"{units}/{name}", (SYSTEMD_UNITS / name).read_bytes(), 0o100644)
    archive.add("etc-guest/systemd/journald.conf.d/iosm-vm.conf",
                (SYSTEMD_UNITS / "journald-volatile.conf").read_bytes(), 0o100644)
    archive.add(f"{units}/default.target", b"iosm-vm.target", 0o120777)
    for name in MASKED_UNITS:
        archive.add(f"{units}/{name}", b"/dev/null", 0o120777)
    # No mounts from the host's fstab: the initramfs has mounted everything the guest needs.
    archive.add("etc-guest/fstab", b"# tests/vm: the initramfs mounts everything\n", 0o100644)
    env = {"IOSM_VM_GUEST_SH": work / "tests" / "vm" / "guest.sh", "IOSM_VM_RUN_DIR": run_dir}
    text = "".join(f"{key}={shlex.quote(str(value))}\n" for key, value in env.items())
    archive.add("etc-guest/iosm-vm.env", text.encode(), 0o100644)


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        raise VmError(f"zstd-compressed module not supported: {path}")
    return data


class _Cpio:
    """The 'newc' cpio format, enough for an initramfs (no hard links, no device nodes)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add(self, name: str, data: bytes, mode: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._ino += 1
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]

    def finish(self) -> bytes:
        self.add("TRAILER!!!", b"", 0)
        return b"".join(self._parts)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
