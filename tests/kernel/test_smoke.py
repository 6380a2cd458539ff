"""Smoke tests of the kernel tier's harness: what the guest of Debian's kernel must offer the
project (CUSE, TUN in a namespace, ivshmem through uio_pci_generic shared with the host, and
processes on the host beside the guest). They run in the guest via tests/vm."""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import select
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # conftest's types, for readers and type checkers only
    from conftest import HostRun, Ivshmem

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
TUN_ADDR = "10.99.71.1"
PEER_ADDR = "10.99.71.2"


@pytest.mark.kernel
def test_cuse_device_exists() -> None:
    subprocess.run(["modprobe", "cuse"], check=True, timeout=60)
    st = os.stat("/dev/cuse")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 203)


# --- TUN: a ping through a TUN device inside a namespace the test made ----------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_reply(packet: bytes) -> bytes | None:
    """The ICMP echo reply to an IPv4 echo request to PEER_ADDR, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    header_len = (packet[0] & 0xF) * 4
    if packet[16:20] != bytes(map(int, PEER_ADDR.split("."))) or packet[header_len] != 8:
        return None
    ip = bytearray(packet[:header_len])
    ip[12:16], ip[16:20] = packet[16:20], packet[12:16]
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
    icmp = bytearray(packet[header_len:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", _checksum(bytes(icmp)))
    return bytes(ip + icmp)


def _answer_pings(fd: int, stop: threading.Event, answered: list[int]) -> None:
    while not stop.is_set():
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        reply = _echo_reply(os.read(fd, 65536))
        if reply is not None:
            os.write(fd, reply)
            answered.append(len(reply))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def tun_in_netns() -> Iterator[tuple[str, int]]:
    """A TUN device made with TUNSETIFF, moved into a new namespace, addressed and up."""
    subprocess.run(["modprobe", "tun"], check=False, timeout=60)
    netns = f"iosm-smoke-{os.getpid()}"
    name = f"iosmtun{os.getpid() % 10000}"
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
        assert ifr[:16].rstrip(b"\0").decode() == name
        _ip("netns", "add", netns)
        try:
            _ip("link", "set", name, "netns", netns)  # the fd stays attached to the device
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "addr", "add", f"{TUN_ADDR}/24", "dev", name)
            _ip("-n", netns, "link", "set", name, "up")
            yield netns, fd
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False, timeout=60)
    finally:
        os.close(fd)


def _ping_argv() -> list[str]:
    if shutil.which("ping"):
        return ["ping"]
    busybox = shutil.which("busybox")
    assert busybox, "neither ping nor busybox on this root"
    return [busybox, "ping"]


def _ping_through_tun(netns: str, fd: int) -> None:
    stop = threading.Event()
    answered: list[int] = []
    responder = threading.Thread(target=_answer_pings, args=(fd, stop, answered), daemon=True)
    responder.start()
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *_ping_argv(), "-c", "2", "-W", "10", PEER_ADDR],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        stop.set()
        responder.join(5)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 packets received" in done.stdout or "2 received" in done.stdout, done.stdout
    assert len(answered) == 2


@pytest.mark.kernel
def test_tun_carries_ping_in_netns(tun_in_netns: tuple[str, int]) -> None:
    _ping_through_tun(*tun_in_netns)


@pytest.mark.host
def test_tun_carries_ping_in_netns_on_host(tun_in_netns: tuple[str, int]) -> None:
    """The same check on the host kernel, so the test's own logic is proven without a guest."""
    _ping_through_tun(*tun_in_netns)


# --- ivshmem: BAR2 through uio_pci_generic is the host's file ---------------------------------


@pytest.fixture
def bar2(ivshmem: Ivshmem) -> Iterator[mmap.mmap]:
    fd = os.open(ivshmem.resource2, os.O_RDWR | os.O_SYNC)
    try:
        with mmap.mmap(fd, ivshmem.size, mmap.MAP_SHARED) as mapping:
            yield mapping
    finally:
        os.close(fd)


def _host_read(host_run: HostRun, path: str, offset: int, length: int) -> str:
    script = "import sys; f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2]));" \
             " print(f.read(int(sys.argv[3])).hex())"
    done = host_run([sys.executable, "-c", script, path, str(offset), str(length)])
    assert done["returncode"] == 0, done["stderr"]
    return str(done["stdout"]).strip()


@pytest.mark.kernel
def test_ivshmem_bound_to_uio_pci_generic(ivshmem: Ivshmem) -> None:
    assert os.path.basename(os.readlink(f"/sys/bus/pci/devices/{ivshmem.bdf}/driver")) == \
        "uio_pci_generic"
    assert stat.S_ISCHR(os.stat(ivshmem.uio).st_mode)
    assert ivshmem.size == ivshmem.info["size"]


@pytest.mark.kernel
def test_ivshmem_bytes_cross_both_ways(ivshmem: Ivshmem, bar2: mmap.mmap,
                                       host_run: HostRun) -> None:
    info = ivshmem.info
    host_at = info["host_token_offset"]
    assert bar2[host_at : host_at + 16].hex() == info["host_token"], "host's bytes not in BAR2"
    guest_at = info["guest_token_offset"]
    bar2[guest_at : guest_at + 16] = bytes.fromhex(info["guest_token"])
    # tests/vm checks the host file again after the guest is gone, and fails the run if the
    # token is missing there.
    with open(info["guest_wrote_marker"], "w") as marker:
        marker.write("wrote\n")
    assert _host_read(host_run, ivshmem.host_path, guest_at, 16) == info["guest_token"]


@pytest.mark.kernel
def test_host_process_writes_seen_live(ivshmem: Ivshmem, bar2: mmap.mmap,
                                       host_process: Callable[[list[str]], Any]) -> None:
    """A process on the host (as the modem model will be) writes into the shared file while
    the guest watches BAR2."""
    token = secrets.token_bytes(16)
    offset = 8192
    script = ("import os, sys, time; f = open(os.environ['IOSM_VM_IVSHMEM'], 'r+b');"
              " f.seek(int(sys.argv[1])); f.write(bytes.fromhex(sys.argv[2])); f.flush();"
              " time.sleep(600)")
    bar2[offset : offset + 16] = bytes(16)
    host_process([sys.executable, "-c", script, str(offset), token.hex()])
    deadline = time.monotonic() + 60
    while bar2[offset : offset + 16] != token:
        assert time.monotonic() < deadline, "the host process's bytes never appeared in BAR2"
        time.sleep(0.05)
