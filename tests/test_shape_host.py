"""Tier 2: traffic shaping measured on the real data path.

    client netns: <link> (TUN, 10.99.0.2) --LinkManager--> MuxHost --> IpcEngine --> shared
        memory --> model process: device MUX --> Gateway (shaped downlink) --> gateway TUN
        (10.99.0.1) in the gateway netns the model creates

The shaping is set over the model process's command socket (`shape`, sim/process.py), as the
daemon's `modem shape` does. Measured: the added round-trip time against the set delay (within
20 %), the share of lost replies against the set loss (within 2 points, seeded: the same run
drops the same packets), and the received rate of a paced UDP sender in the gateway
namespace against the set cap (within 10 %).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pytest
from helpers import until_async

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for TUN and netns")]

TAG = f"{os.getpid() % 100000}"
LINK = f"shp{TAG}"
CLIENT_NS = f"iosmt-shc{TAG}"
GW_NS = f"iosmt-shg{TAG}"
GW_TUN = f"shg{TAG}"
UE, GW = "10.99.0.2", "10.99.0.1"


async def sh(*argv: str, timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(argv)}: rc {proc.returncode}: {text}"
    return text


@dataclass
class Path_:
    model: Any

    async def shape(self, **args: Any) -> dict[str, Any]:
        """The live-control `shape` action with these arguments, or with none the model's
        state (its shapes and the shapers' counters); the action's result."""
        action = "shape" if args else "state"
        reply: dict[str, Any] = await self.model.command("control", action=action, args=args)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    async def ping(self, count: int, interval: float, size: int = 56) -> tuple[int, float]:
        """(replies received, average RTT in ms) of pings from the client to the gateway."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", CLIENT_NS, "ping", "-4", "-n", "-q", "-c", str(count), "-i",
            str(interval), "-W", "2", "-s", str(size), GW, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
        received = re.search(r"(\d+) received", out)
        rtt = re.search(r"= [0-9.]+/([0-9.]+)/", out)
        assert received, out
        return int(received.group(1)), float(rtt.group(1)) if rtt else float("nan")


@asynccontextmanager
async def shaped_path() -> AsyncIterator[Path_]:
    from iosm_cuse.hw.engine import IpcEngine
    from iosm_cuse.hw.mux.host import MuxHost
    from iosm_cuse.link.manager import LinkManager
    from iosm_cuse.sim.assembly import DATA_PATH_ONLY
    from iosm_cuse.sim.device import DeviceConfig
    from iosm_cuse.sim.process import ModelProcess

    model = await ModelProcess.spawn(
        functions=DATA_PATH_ONLY, config=asdict(DeviceConfig.for_mux("lite")),
        options={"gateway": f"netns:{GW_NS}", "tun_name": GW_TUN, "mux": "lite",
                 "connect": [0]})
    engine = mgr = None
    try:
        engine = IpcEngine(model.bus)
        await engine.start()
        mgr = LinkManager(MuxHost(engine), LINK)
        await mgr.start()
        await sh("ip", "netns", "add", CLIENT_NS)
        await sh("ip", "link", "set", LINK, "netns", CLIENT_NS)
        for argv in (("link", "set", "lo", "up"), ("addr", "add", f"{UE}/24", "dev", LINK),
                     ("link", "set", LINK, "up")):
            await sh("ip", "-n", CLIENT_NS, *argv)
        await until_async(lambda: mgr is not None and mgr.show(LINK)[0].session == "open", 5,
                          "the session to open")
        await until_async(lambda: ",UP" in subprocess.run(
            ["ip", "-n", GW_NS, "link", "show", GW_TUN], capture_output=True, text=True).stdout,
            10, "the model's gateway TUN up (addressed before: the gateway sets it up last)")
        yield Path_(model)
    finally:
        if mgr is not None:
            await mgr.stop()
        if engine is not None:
            await engine.stop()
        await model.close()
        for ns in (CLIENT_NS, GW_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_delay_adds_the_set_round_trip_time_within_20_percent() -> None:
    async def body() -> None:
        async with shaped_path() as p:
            got, base = await p.ping(20, 0.05)
            assert got == 20
            reply = await p.shape(session=0, delay_ms=100)
            assert reply["shapes"] == {"0": {"delay_ms": 100.0, "loss_percent": 0.0,
                                             "rate_mbit": None}}
            got, shaped = await p.ping(20, 0.05)
            assert got == 20
            added = shaped - base
            print(f"RTT {base:.2f} ms unshaped, {shaped:.2f} ms with 100 ms delay")
            assert 80 <= added <= 120, (base, shaped)
            cleared = await p.shape(session=0, clear=True)
            assert cleared["shapes"] == {}
            _, after = await p.ping(10, 0.05)
            assert after < base + 20

    asyncio.run(body())


def test_loss_drops_the_set_share_of_replies_within_2_points() -> None:
    async def body() -> None:
        async with shaped_path() as p:
            await p.shape(session=0, loss_percent=10)
            n = 3000
            got, _ = await p.ping(n, 0.002)
            lost = 1 - got / n
            reply = await p.shape()
            counters = reply["shaped"]["0"]
            print(f"loss {lost:.2%} of {n} replies; shaper {counters}")
            assert abs(lost - 0.10) <= 0.02
            assert counters["lost"] == n - got and counters["passed"] == got

    asyncio.run(body())


SENDER = r"""
import socket, sys, time
dst, port, mbit, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
gap = (size + 28) * 8 / (mbit * 1e6)
t0 = time.monotonic()
i = 0
while True:
    due = t0 + i * gap
    now = time.monotonic()
    if due - t0 > seconds:
        break
    if due > now:
        time.sleep(due - now)
    s.sendto(b"x" * size, (dst, port))
    i += 1
print(i, flush=True)
"""

RECEIVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(10)
first = last = None
n = nbytes = 0
while True:
    try:
        data = s.recv(65536)
    except socket.timeout:
        break
    last = time.monotonic()
    if first is None:
        first = last
    n += 1
    nbytes += len(data) + 28
    s.settimeout(1.5)
print(n, nbytes, first, last, flush=True)
"""


def test_rate_caps_what_the_host_receives_within_10_percent() -> None:
    async def body() -> None:
        async with shaped_path() as p:
            await p.shape(session=0, rate_mbit=10)
            port, size = "5301", 1200
            recv = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", CLIENT_NS, sys.executable, "-c", RECEIVER, UE, port,
                stdout=subprocess.PIPE)
            assert recv.stdout is not None
            assert (await asyncio.wait_for(recv.stdout.readline(), 30)).startswith(b"ready")
            sent = await sh("ip", "netns", "exec", GW_NS, sys.executable, "-c", SENDER, UE,
                            port, "20", "3", str(size))
            out = (await asyncio.wait_for(recv.communicate(), 60))[0].decode().split()
            n, nbytes, first, last = int(out[0]), int(out[1]), float(out[2]), float(out[3])
            rate = (nbytes - (size + 28)) * 8 / (last - first) / 1e6
            counters = (await p.shape())["shaped"]["0"]
            print(f"sent {sent.strip()} at 20 Mbit/s, received {n} at {rate:.2f} Mbit/s; "
                  f"shaper {counters}")
            assert rate == pytest.approx(10, rel=0.10)
            assert counters["overflowed"] > 0  # the offered 20 Mbit/s overflowed the queue
            assert n == counters["passed"]

    asyncio.run(body())


def test_bad_shape_commands_are_refused_and_change_nothing() -> None:
    async def body() -> None:
        async with shaped_path() as p:
            await p.shape(session=0, delay_ms=5)
            for bad in ({"session": 9, "delay_ms": 1}, {"session": 0, "loss_percent": 200},
                        {"session": 0, "rate_mbit": "fast"}, {"session": "0"},
                        {"session": 0, "clear": "yes"}, {"session": 0, "jitter": 3}):
                reply = await p.model.command("control", action="shape", args=bad)
                assert reply["ok"] is False and reply["errno"] == errno.EINVAL, reply
                assert "shape" in reply["error"] or "session" in reply["error"], reply
            assert (await p.shape())["shapes"] == {"0": {"delay_ms": 5.0, "loss_percent": 0.0,
                                                         "rate_mbit": None}}
            got, _ = await p.ping(3, 0.05)
            assert got == 3

    asyncio.run(body())
