"""The port rule of 70-iosm-cuse.rules (MBIM and AT ports) on a real CUSE node, under
`udevadm test` in the Debian-kernel guest (no udevd there: devtmpfs creates the node root:root
0600, the rule must turn it into GROUP dialout, MODE 0660).

The CUSE device is brought up here with the bare CUSE_INIT handshake (docs/cuse.md §2), so the
test depends only on the kernel and the rule, not on the daemon.
"""

from __future__ import annotations

import grp
import os
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

UDEV = Path(__file__).resolve().parents[2] / "udev"
# not wwan0...: the stack tests own those
NAMES = ("wwan7mbim0", "wwan7at0")
CUSE_INIT = 4096
IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header, 40 bytes
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header, 16 bytes
INIT_OUT = struct.Struct("<8I40x")  # cuse_init_out, 72 bytes


@pytest.fixture(params=NAMES)
def cuse_node(request: pytest.FixtureRequest) -> Iterator[Path]:
    name: str = request.param
    subprocess.run(["modprobe", "cuse"], check=True, timeout=60)
    fd = os.open("/dev/cuse", os.O_RDWR)
    try:
        req = os.read(fd, 8192 + 80)
        length, opcode, unique = IN_HEADER.unpack_from(req)[:3]
        assert opcode == CUSE_INIT and length == len(req)
        info = f"DEVNAME={name}\0".encode()
        body = INIT_OUT.pack(7, 38, 0, 0, 4096, 4096, 0, 0) + info
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)
        node = Path("/dev") / name
        deadline = time.monotonic() + 30
        while not node.exists():
            assert time.monotonic() < deadline, f"{node} never appeared"
            time.sleep(0.05)
        yield node
    finally:
        os.close(fd)  # the kernel removes the device with the connection


def test_ports_get_group_and_mode(cuse_node: Path) -> None:
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "70-iosm-cuse.rules").write_text((UDEV / "70-iosm-cuse.rules").read_text())
    try:
        st = cuse_node.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == 0  # devtmpfs default
        sysfs = f"/sys/class/cuse/{cuse_node.name}"
        res = subprocess.run(["udevadm", "test", "--action=add", sysfs], capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr[-2000:]
        st = cuse_node.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660, res.stdout + res.stderr
        assert st.st_gid == grp.getgrnam("dialout").gr_gid
    finally:
        (rules / "70-iosm-cuse.rules").unlink(missing_ok=True)
