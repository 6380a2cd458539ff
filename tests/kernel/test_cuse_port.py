"""The MBIM port on a real CUSE /dev/wwan0mbim0 in the Debian-kernel guest, with the modem
model's MBIM function in the server process (`python -m iosm_cuse.port_alone`, no IPC engine).

One server for the module (Python is ~11x slower under TCG); the last test kills it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

NAME = "wwan5mbim0"  # not wwan0mbim0, which the whole-stack tests own
NODE = Path("/dev") / NAME
STEP_TIMEOUT = 120
FIONREAD = 0x541B
IOCTL_WDM_MAX_COMMAND = 0x800248A0
MBIM_OPEN = struct.pack("<IIII", 1, 16, 1, 4096)
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def server() -> Iterator[subprocess.Popen[str]]:
    subprocess.run(["modprobe", "-q", "cuse"], check=False)
    proc = subprocess.Popen([sys.executable, "-m", "iosm_cuse.port_alone", "--transport", "cuse",
                             "--devname", NAME], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], STEP_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith(f"ready {NODE} (cuse)"), f"no ready line: {line!r}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(STEP_TIMEOUT)


def raw_read(fd: int, size: int = 4096) -> tuple[int, int]:
    """read(2) without Python's EINTR retry: (result, errno)."""
    buf = ctypes.create_string_buffer(size)
    n = libc.read(fd, buf, size)
    return n, ctypes.get_errno()


def test_mbimcli_device_caps(server: subprocess.Popen[str]) -> None:
    assert NODE.is_char_device()
    res = subprocess.run(["mbimcli", "-d", str(NODE), "--query-device-caps"],
                         capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert "Max sessions: '8'" in res.stdout


def test_ioctls_and_oversized_write(server: subprocess.Popen[str]) -> None:
    fd = os.open(NODE, os.O_RDWR | os.O_NONBLOCK)
    try:
        wdm = fcntl.ioctl(fd, IOCTL_WDM_MAX_COMMAND, b"\0\0")
        assert struct.unpack("<H", wdm) == (4096,)
        with pytest.raises(OSError) as e:
            os.write(fd, b"\0" * 4097)
        assert e.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, 0x5401, b"\0" * 64)  # TCGETS
        assert e.value.errno == errno.ENOTTY
        # poll() wakes within 100 ms of a message arriving: the OPEN_DONE for this OPEN.
        p = select.poll()
        p.register(fd, select.POLLIN)
        written: list[float] = []

        def write_later() -> None:
            time.sleep(0.3)
            os.write(fd, MBIM_OPEN)
            written.append(time.monotonic())

        t = threading.Thread(target=write_later)
        t.start()
        events = p.poll(STEP_TIMEOUT * 1000)
        woke = time.monotonic()
        t.join()
        assert events and events[0][1] & select.POLLIN
        assert woke - written[0] < 0.1, f"poll woke {woke - written[0]:.3f} s after the write"
        queued = struct.unpack("<i", fcntl.ioctl(fd, FIONREAD, b"\0" * 4))[0]
        assert queued == 16
        assert os.read(fd, 4096)[:4] == struct.pack("<I", 0x80000001)
    finally:
        os.close(fd)


def test_blocked_read_interrupted_by_a_signal(server: subprocess.Popen[str]) -> None:
    fd = os.open(NODE, os.O_RDWR)
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.siginterrupt(signal.SIGALRM, True)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        started = time.monotonic()
        n, err = raw_read(fd)  # nothing queued: the server parks it until the signal
        assert (n, err) == (-1, errno.EINTR)
        assert time.monotonic() - started >= 0.9
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(fd)


def test_a_second_server_for_the_same_name_is_refused(server: subprocess.Popen[str]) -> None:
    import asyncio

    from iosm_cuse.chardev.loopback import LoopbackOpener, answer_open
    from iosm_cuse.chardev.port import MbimPort
    from iosm_cuse.chardev.server import CuseServer

    async def start(check_first: bool) -> None:
        await CuseServer(MbimPort(LoopbackOpener(answer_open)), NAME,
                         wait_for_node=check_first).start(timeout=60)

    with pytest.raises(OSError) as e:
        asyncio.run(start(True))  # the node is there: refused before talking to the kernel
    assert e.value.errno == errno.EEXIST, e.value
    with pytest.raises(OSError) as e:
        asyncio.run(start(False))  # the kernel itself refuses the duplicate DEVNAME
    assert e.value.errno == errno.ENODEV, e.value
    assert NODE.is_char_device()  # the first server's device is untouched
    res = subprocess.run(["mbimcli", "-d", str(NODE), "--query-device-caps"],
                         capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert res.returncode == 0, res.stderr


def test_killed_server_releases_blocked_readers(server: subprocess.Popen[str]) -> None:
    fd = os.open(NODE, os.O_RDWR)
    result: list[tuple[int, int]] = []
    reader = threading.Thread(target=lambda: result.append(raw_read(fd)), daemon=True)
    reader.start()
    time.sleep(1.0)  # the READ is parked in the server
    server.kill()
    server.wait(STEP_TIMEOUT)
    reader.join(30)
    try:
        assert result, "reader still blocked after the server died"
        n, err = result[0]
        assert n == -1 and err in (errno.ECONNABORTED, errno.ENODEV, errno.ENOTCONN, errno.EIO)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while NODE.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not NODE.exists()
