"""Issue 14, tier 3: the fault matrix on the real CUSE port in the Debian-kernel guest.

The same rows as tests/test_faults_host.py where the transport matters: a CUSE port tells its
clients of a dead modem as the kernel's WWAN port does (docs/mbim-port.md §1: reads fail with
EIO, poll reports POLLHUP | POLLERR), a stopped daemon must leave no client blocked, and the
kernel's own count of open files (through the server's OPEN/RELEASE) shows no handle leaked.
Python is ~11x slower under TCG: few daemon starts, every wait generous but bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guest_up
import pytest
from guest_up import IOSM_CUSE, STEP_TIMEOUT
from helpers import PortClient, blocked_reader, mid_transaction, poller, until

pytestmark = pytest.mark.kernel

PORT = "/dev/wwan0mbim0"
READY = f"MBIM port {PORT} (cuse)"


def _run(*argv: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def _status() -> dict[str, Any]:
    res = _run(IOSM_CUSE, "status", "--json")
    assert res.returncode == 0, res.stderr
    st: dict[str, Any] = json.loads(res.stdout)
    return st


def _connect(session: int) -> str:
    """Attach, connect `session`, address and raise its link; the gateway's address."""
    link = "wwan0" if session == 0 else f"wwan0-{session}"
    assert _run("mbimcli", "-d", PORT, "--attach-packet-service").returncode == 0
    con = _run("mbimcli", "-d", PORT,
               f"--connect=session-id={session},access-string=internet,ip-type=ipv4")
    assert con.returncode == 0 and "'activated'" in con.stdout, con.stdout + con.stderr
    addr = re.search(r"IP \[0\]: '([0-9.]+/[0-9]+)'", con.stdout)
    gw = re.search(r"Gateway: '([0-9.]+)'", con.stdout)
    assert addr and gw, con.stdout
    subprocess.run(["ip", "addr", "replace", addr.group(1), "dev", link], check=True)
    subprocess.run(["ip", "link", "set", link, "up"], check=True)
    return gw.group(1)


def _links() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith("wwan0")}


@pytest.fixture(scope="module")
def stack() -> Iterator[subprocess.Popen[str]]:
    subprocess.run(["modprobe", "-q", "cuse"], check=False)
    subprocess.run(["modprobe", "-q", "tun"], check=False)
    proc = guest_up.start("--device", "sim", "--transport", "cuse", ready=READY)
    try:
        yield proc
    finally:
        guest_up.stop(proc)


def test_model_killed_clients_see_a_hangup_and_links_stay(stack: subprocess.Popen[str]) -> None:
    add = _run(IOSM_CUSE, "link", "add", "dev", "wwan0-1", "parentdev-name", "wwan0", "type",
               "wwan", "linkid", "1")
    assert add.returncode == 0, add.stderr
    gateway = _connect(1)
    links = _links()
    assert links == {"wwan0", "wwan0-1"}
    # Load while the model dies (iperf3 under TCG measures nothing; a ping stream suffices).
    load = subprocess.Popen(["ping", "-q", "-i", "0.05", "-w", "60", "-I", "wwan0-1",
                             gateway], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        clients = [PortClient("reader", PORT).start(blocked_reader),
                   PortClient("poller", PORT).start(poller)]
        time.sleep(0.5)
        model_pid = _status()["modem"]["pid"]
        killed = time.monotonic()
        os.kill(model_pid, signal.SIGKILL)
        until(lambda: all(c.returned() for c in clients), 60,
              lambda: f"clients still blocked: {[c.name for c in clients if not c.returned()]}")
        told_s = time.monotonic() - killed
        ended = {c.name: c.ended for c in clients}
        assert ended == {"reader": "EIO", "poller": "POLLERR|POLLHUP"}, ended
        seen: list[dict[str, Any]] = []

        def running_again() -> bool:
            seen.append(_status())
            return bool(seen[-1]["modem"]["restarts"] >= 1
                        and seen[-1]["modem"]["ipc_state"] == "RUNNING")

        # Each status is a Python start under TCG: ask seldom, or the asking slows the restart.
        until(running_again, 90, lambda: seen[-1]["modem"], poll=2.0)
        recovered_s = time.monotonic() - killed
    finally:
        load.kill()
        load.wait()
    assert _links() == links, "links must survive the model's crash"
    assert seen[-1]["port"]["openers"] == 0, seen[-1]["port"]
    # The new model knows no connection: connect again, through the same link.
    gateway = _connect(1)
    ping = _run("ping", "-c", "1", "-W", "5", "-I", "wwan0-1", gateway)
    assert ping.returncode == 0, ping.stdout
    print(f"guest (TCG): clients told after {told_s:.2f} s, IPC running again after "
          f"{recovered_s:.2f} s, traffic again after {time.monotonic() - killed:.2f} s")


_CLIENT = r"""
import os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.write(fd, struct.pack("<IIII", 1, 16, 1, 4096))  # MBIM OPEN
print("open", flush=True)
if sys.argv[2] == "read":
    while True:
        os.read(fd, 4096)
tid = 2
while True:  # device caps queries, never reading an answer
    os.write(fd, struct.pack("<IIIII", 3, 48, tid, 1, 0) + bytes.fromhex(
        "a289cc33bcbb8b4fb6b0133ec2aae6df") + struct.pack("<III", 1, 0, 0))
    tid += 1
"""


def test_clients_killed_mid_read_and_mid_write_leave_no_opener(
        stack: subprocess.Popen[str]) -> None:
    procs = {doing: subprocess.Popen([sys.executable, "-c", _CLIENT, PORT, doing],
                                     stdout=subprocess.PIPE, text=True)
             for doing in ("read", "write")}
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        port = _status()["port"]
        assert port["openers"] == 2, port
        assert sorted(port["opener_pids"]) == sorted(p.pid for p in procs.values()), port
        for proc in procs.values():
            proc.kill()
            proc.wait(STEP_TIMEOUT)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    until(lambda: _status()["port"]["openers"] == 0, 30, lambda: _status()["port"], poll=0.5)
    assert _status()["port"]["opener_pids"] == []
    caps = _run("mbimcli", "-d", PORT, "--query-device-caps")
    assert caps.returncode == 0, caps.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_daemon_stopped_under_a_reader_a_poller_and_a_transaction(
        stack: subprocess.Popen[str], sig: int) -> None:
    guest_up.stop(stack)  # the module's daemon is done (idempotent); each stop gets its own
    proc = guest_up.start("--device", "sim", "--transport", "cuse", ready=READY)
    try:
        model_pid = _status()["modem"]["pid"]
        clients = [PortClient("transaction", PORT).start(mid_transaction),
                   PortClient("reader", PORT).start(blocked_reader),
                   PortClient("poller", PORT).start(poller)]
        time.sleep(0.5)
        assert not any(c.returned() for c in clients), [(c.name, c.ended) for c in clients]
        stopped = time.monotonic()
        proc.send_signal(sig)
        until(lambda: all(c.returned() for c in clients), 60,
              lambda: f"clients still blocked: {[c.name for c in clients if not c.returned()]}")
        ended = {c.name: c.ended for c in clients}
        print(f"guest {signal.Signals(sig).name}: clients returned after "
              f"{time.monotonic() - stopped:.2f} s: {ended}")
        assert proc.wait(STEP_TIMEOUT) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        # Whatever each saw, each was told: a read error, or poll reporting the end.
        for name, how in ended.items():
            assert how in ("EIO", "ENODEV", "ECONNABORTED", "ENOTCONN") or \
                how.startswith("POLL"), (name, how)
        if sig == signal.SIGTERM:  # answered by the daemon itself, as a hangup
            assert ended == {"transaction": "EIO", "reader": "EIO",
                             "poller": "POLLERR|POLLHUP"}, ended
    finally:
        guest_up.stop(proc)
    until(lambda: not Path(f"/proc/{model_pid}").exists(), 60, "model outlived its daemon",
          poll=0.2)
    until(lambda: not os.path.exists(PORT), 30, f"{PORT} left behind", poll=0.2)
    assert _links() == set()
    if sig != signal.SIGKILL:
        return
    # The next `up` works: the kernel released the CUSE name, the TUNs and the locks.
    nxt = guest_up.start("--device", "sim", "--transport", "cuse", ready=READY)
    try:
        caps = _run("mbimcli", "-d", PORT, "--query-device-caps")
        assert caps.returncode == 0, caps.stderr
    finally:
        guest_up.stop(nxt)
