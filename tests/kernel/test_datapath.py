"""iperf3 through wwan0 in the Debian-kernel guest (tier 3).

The daemon runs with a real CUSE /dev/wwan0mbim0 and the model's packet gateway in a namespace
of its own, so the gateway TUN's offloads (TSO in, GRO out) meet the guest's kernel, not the
host's. mbimcli attaches and connects session 0, the address `--query-ip-configuration` reports
goes on wwan0 in a client namespace, and iperf3 runs both ways into the gateway namespace.

One daemon start for the module: Python is about 11x slower under TCG, so the figures here are
far below the host's; what counts is that TCP completes both ways and the offloads were used.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import guest_up
import pytest
from guest_up import IOSM_CUSE, STEP_TIMEOUT

pytestmark = pytest.mark.kernel

PORT = "/dev/wwan0mbim0"
SECONDS = 5


def _run(*argv: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def _ok(*argv: str, timeout: float = STEP_TIMEOUT) -> str:
    res = _run(*argv, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stdout}{res.stderr}"
    return res.stdout


@dataclass
class Connected:
    daemon: subprocess.Popen[str]
    client_ns: str
    gw_ns: str
    gateway: str


def _wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def connected() -> Iterator[Connected]:
    for module in ("cuse", "tun"):
        subprocess.run(["modprobe", "-q", module], check=False)
    assert os.path.exists("/dev/cuse"), "no /dev/cuse after modprobe cuse"
    client, gw_ns = f"iosmk-c{os.getpid()}", f"iosmk-gw{os.getpid()}"
    _ok("ip", "netns", "add", client)
    # nsenter switches the network namespace only: the gateway namespace the model creates
    # must stay visible under /run/netns
    proc: subprocess.Popen[str] | None = None
    try:
        proc = guest_up.start("--device", "sim", "--transport", "cuse", "--gateway",
                              f"netns:{gw_ns}", ready=f"MBIM port {PORT} (cuse)",
                              prefix=("nsenter", f"--net=/run/netns/{client}"))
        mbim = ("mbimcli", "-d", PORT)
        _ok(*mbim, "--attach-packet-service")
        con = _ok(*mbim, "--connect=session-id=0,access-string=internet,ip-type=ipv4")
        assert "'activated'" in con, con
        cfg = _ok(*mbim, "--query-ip-configuration=0")
        addr = re.search(r"IP \[0\]: '([0-9.]+/[0-9]+)'", cfg)
        gw = re.search(r"Gateway: '([0-9.]+)'", cfg)
        assert addr and gw, cfg
        _ok("ip", "-n", client, "link", "set", "lo", "up")
        _ok("ip", "-n", client, "addr", "add", addr.group(1), "dev", "wwan0")
        _ok("ip", "-n", client, "link", "set", "wwan0", "up")
        _wait_for(lambda: _run("ip", "-n", gw_ns, "addr", "show").stdout.count(gw.group(1)) > 0,
                  "the gateway TUN and its addresses")
        yield Connected(proc, client, gw_ns, gw.group(1))
    finally:
        if proc is not None:
            guest_up.stop(proc)
        subprocess.run(["ip", "netns", "del", client], check=False)
        subprocess.run(["ip", "netns", "del", gw_ns], check=False, capture_output=True)


def _iperf(c: Connected, *extra: str) -> dict[str, Any]:
    server = subprocess.Popen(["ip", "netns", "exec", c.gw_ns, "iperf3", "-s", "-1", "-B",
                               c.gateway], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: f"{c.gateway}:5201" in _run("ip", "netns", "exec", c.gw_ns, "ss",
                                                      "-ltn").stdout, "the iperf3 server")
        out = _ok("ip", "netns", "exec", c.client_ns, "iperf3", "-c", c.gateway, "-t",
                  str(SECONDS), "-J", *extra, timeout=SECONDS + STEP_TIMEOUT)
        result: dict[str, Any] = json.loads(out)
        return result
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def _link0() -> dict[str, int]:
    st = json.loads(_ok(IOSM_CUSE, "status", "--json"))
    counters: dict[str, int] = next(ln for ln in st["links"] if ln["linkid"] == 0)["counters"]
    return counters


def test_iperf3_tcp_up_and_down_through_wwan0(connected: Connected) -> None:
    before = _link0()
    up = _iperf(connected)
    received = up["end"]["sum_received"]
    assert received["seconds"] >= SECONDS - 0.5 and received["bits_per_second"] > 1e6, received
    down = _iperf(connected, "-R")
    received = down["end"]["sum_received"]
    assert received["seconds"] >= SECONDS - 0.5 and received["bits_per_second"] > 1e6, received
    after = _link0()
    # both directions crossed wwan0 (uplink = tx): data one way, its ACKs the other
    assert after["tx_packets"] - before["tx_packets"] > 1000, after
    assert after["rx_packets"] - before["rx_packets"] > 1000, after
    assert after["tx_dropped_mux"] == after["tx_dropped_too_big"] == 0, after
    print(f"guest TCP: up {up['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s, "
          f"down {received['bits_per_second'] / 1e6:.1f} Mbit/s")
