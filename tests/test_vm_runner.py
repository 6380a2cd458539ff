"""The kernel tier's runner (tests/vm) without booting a guest: its failure messages, the kernel
extraction, the initramfs, the JUnit counts and the host agent's request channel."""

from __future__ import annotations

import json
import lzma
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/vm is run as `python3 -m tests.vm` from the root
    sys.path.insert(0, str(ROOT))

from tests.vm import image, run  # noqa: E402
from tests.vm.agent import HostAgent  # noqa: E402


def _runner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The runner's command line, with only the IOSM_VM_* settings given here."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("IOSM_VM_")}
    return subprocess.run([sys.executable, "-m", "tests.vm", *args], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_wrong_kernel_path_fails_naming_the_cause() -> None:
    done = _runner({"IOSM_VM_KERNEL": "/nonexistent"}, "--cmd", "true")
    assert done.returncode == run.VM_FAILED
    assert "iosm-vm: FAIL: kernel not found: /nonexistent" in done.stdout


def test_unknown_accel_fails_naming_the_cause(tmp_path: Path) -> None:
    kernel = next(iter(sorted(Path("/boot").glob("vmlinuz-*"))), None)
    if kernel is None or os.geteuid() != 0:
        pytest.skip("needs an installed kernel and root")
    done = _runner({"IOSM_VM_ACCEL": "warp"}, "--cmd", "true")
    assert done.returncode == run.VM_FAILED
    assert "IOSM_VM_ACCEL=warp" in done.stdout


def _bzimage(version: str, payload: bytes) -> bytes:
    """A minimal bzImage-shaped file: setup header with the version pointer, then an xz payload
    with junk after it (as the real one has)."""
    head = bytearray(0x600)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x400 - 0x200)
    text = f"{version} (builder@example) #1 SMP".encode()
    head[0x400 : 0x400 + len(text)] = text
    return bytes(head) + b"\xfd7zXZ\x00 not a stream" + lzma.compress(payload) + b"\0" * 64


def test_vmlinux_is_extracted_once_and_cached(tmp_path: Path) -> None:
    elf = b"\x7fELF" + os.urandom(5000)
    path = tmp_path / "vmlinuz-9.9.9-test"
    path.write_bytes(_bzimage("9.9.9-test", elf))
    assert image.kernel_version(path) == "9.9.9-test"
    kernel = image.Kernel(path, "9.9.9-test")
    out = image.vmlinux(kernel, tmp_path / "cache")
    assert out.read_bytes() == elf
    stamp = out.stat().st_mtime_ns
    time.sleep(0.01)
    assert image.vmlinux(kernel, tmp_path / "cache") == out
    assert out.stat().st_mtime_ns == stamp


def test_bzimage_without_an_elf_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz-bad"
    path.write_bytes(_bzimage("1.0", b"not an elf"))
    with pytest.raises(image.VmError, match="kernel not usable"):
        image.vmlinux(image.Kernel(path, "1.0"), tmp_path / "cache")


def _read_newc(archive: bytes) -> list[tuple[str, int, bytes]]:
    """An independent reader of the newc format, to check what _Cpio writes."""
    entries, pos = [], 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = (name_at + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, archive[data_at : data_at + size]))
        pos = (data_at + size + 3) & ~3


def test_cpio_newc_entries_read_back() -> None:
    archive = image._Cpio()
    archive.add("bin", b"", 0o040755)
    archive.add("bin/x", b"abc", 0o100755)
    archive.add("odd-name", b"12345", 0o100644)
    entries = _read_newc(archive.finish())
    assert entries == [("bin", 0o040755, b""), ("bin/x", 0o100755, b"abc"),
                       ("odd-name", 0o100644, b"12345")]


def test_initramfs_loads_9p_modules_in_dependency_order(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOSM_VM_KERNEL", raising=False)
    monkeypatch.delenv("IOSM_VM_KVER", raising=False)
    try:
        kernel = image.find_kernel()
    except image.VmError as exc:
        pytest.skip(str(exc))
    entries = {name: data for name, _, data in _read_newc(
        image.initramfs(kernel, tmp_path, tmp_path / "run"))}
    init = entries["init"].decode()
    order = init.split("for m in ", 1)[1].split(";", 1)[0].split()
    for before, after in (("virtio_ring.ko", "virtio.ko"), ("virtio.ko", "9pnet_virtio.ko"),
                          ("9pnet.ko", "9pnet_virtio.ko"), ("9pnet.ko", "9p.ko"),
                          ("virtio.ko", "virtio_pci.ko")):
        assert order.index(before) < order.index(after)
    assert all(f"modules/{name}" in entries for name in order)
    assert entries["bin/busybox"][:4] == b"\x7fELF"



def test_systemd_initramfs_puts_the_guest_etc_over_an_overlay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--systemd: overlay is loaded after 9p, the guest's /etc additions are in the archive
    (its target as default.target, masked units linked to /dev/null, the run's paths), and the
    init hands over to systemd, not to guest.sh."""
    monkeypatch.delenv("IOSM_VM_KERNEL", raising=False)
    monkeypatch.delenv("IOSM_VM_KVER", raising=False)
    try:
        kernel = image.find_kernel()
    except image.VmError as exc:
        pytest.skip(str(exc))
    run_dir = tmp_path / "run"
    entries = {name: (mode, data) for name, mode, data in _read_newc(
        image.initramfs(kernel, tmp_path, run_dir, systemd=True))}
    init = entries["init"][1].decode()
    order = init.split("for m in ", 1)[1].split(";", 1)[0].split()
    assert order[-1] == "overlay.ko" and "9p.ko" in order
    assert "mount -t overlay" in init and "cp -a /etc-guest/. /newroot/etc/" in init
    assert init.rstrip().endswith("exec switch_root /newroot /lib/systemd/systemd")
    units = "etc-guest/systemd/system"
    symlink = 0o120777
    assert entries[f"{units}/default.target"] == (symlink, b"iosm-vm.target")
    for name in image.MASKED_UNITS:
        assert entries[f"{units}/{name}"] == (symlink, b"/dev/null")
    test_unit = entries[f"{units}/iosm-vm-test.service"][1].decode()
    assert "ExecStart=/bin/sh ${IOSM_VM_GUEST_SH} ${IOSM_VM_RUN_DIR} systemd" in test_unit
    assert "SuccessAction=poweroff-force" in test_unit
    assert "FailureAction=poweroff-force" in test_unit
    env = entries["etc-guest/iosm-vm.env"][1].decode().splitlines()
    assert env == [f"IOSM_VM_GUEST_SH={tmp_path}/tests/vm/guest.sh", f"IOSM_VM_RUN_DIR={run_dir}"]
    plain = {name for name, _, _ in _read_newc(image.initramfs(kernel, tmp_path, run_dir))}
    assert not any(name.startswith("etc-guest") for name in plain)


def test_each_boot_runs_its_own_kernel_tests() -> None:
    assert "'kernel and not systemd_pid1'" in run._pytest_command(Path("j.xml"), [])
    assert "'kernel and systemd_pid1'" in run._pytest_command(Path("j.xml"), [], systemd=True)


def test_junit_counts(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="7" failures="1" errors="1" '
                     'skipped="2"></testsuite></testsuites>')
    assert run._junit_counts(junit) == (5, 3, 2)
    assert run._junit_counts(tmp_path / "missing.xml") is None


def _ask(agent: HostAgent, name: str, message: dict[str, object]) -> dict[str, object]:
    """What the guest-side fixtures do: rename a request in, wait for the response."""
    tmp = agent.directory / f"{name}.tmp"
    tmp.write_text(json.dumps(message))
    tmp.rename(agent.directory / f"{name}.req")
    response = agent.directory / f"{name}.resp"
    until(response.exists, 30, "no response", poll=0.02)
    answer: dict[str, object] = json.loads(response.read_text())
    return answer


def test_host_agent_runs_starts_and_stops(tmp_path: Path) -> None:
    agent = HostAgent(tmp_path, tmp_path, {**os.environ, "IOSM_VM_IVSHMEM": "/dev/shm/x"})
    agent.start()
    try:
        done = _ask(agent, "a", {"op": "run", "argv": ["sh", "-c", "echo $IOSM_VM_IVSHMEM; pwd"]})
        assert done["returncode"] == 0
        assert done["stdout"] == f"/dev/shm/x\n{tmp_path}\n"
        started = _ask(agent, "b", {"op": "start", "argv": ["sh", "-c", "echo up; sleep 600"]})
        log = agent.directory / f"{started['handle']}.log"
        until(lambda: log.read_text() == "up\n", 30, "the started process never wrote",
              poll=0.02)
        stopped = _ask(agent, "c", {"op": "stop", "handle": started["handle"]})
        assert stopped["returncode"] == -15
        assert stopped["output"] == "up\n"
        assert "error" in _ask(agent, "d", {"op": "stop", "handle": "nope"})
        assert "error" in _ask(agent, "e", {"op": "fly"})
    finally:
        agent.close()
