"""Host MUX over the real IPC engine <-> the device MUX in the modem model's own process (two
processes, shared-memory bus), both MUX modes (chosen by the model's capability register):
8 sessions opened at once, 10,000 datagrams of 20..1500 bytes per session each way with none
lost and each on its own session, then flow control asserted by the model stops the host's
uplink of one session (queued up to the limit, then dropped and counted) and releases it.

The model side is `attach_mux` below (the model process imports this module by name). It is
steered by control packets on session 0 (first byte 0xFF; traffic packets start with 1 or 2)
and answers with report packets on session 0.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

import pytest
from helpers import run, until_async
from mux_traffic import DOWN, UP, Checker, FlowWatch, device_send, host_send, packet

from iosm_cuse.hw.engine import EngineState, IpcEngine
from iosm_cuse.hw.mux.host import QUEUE_LIMIT_FC, MuxHost
from iosm_cuse.sim.device import DeviceConfig, DeviceModel
from iosm_cuse.sim.mux import MuxDevice
from iosm_cuse.sim.process import ModelProcess
from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.ipc import CAP_DL_AGGR, CAP_UL_AGGR, CAP_UL_FLOW_CREDIT

CTL = b"\xffCTL "
RPT = b"\xffRPT "
N = 10_000


# ---- the model side ------------------------------------------------------------------------------


class ModelGateway:
    """Checks every UL packet (per session, in order), runs commands from control packets."""

    def __init__(self) -> None:
        self.up = Checker(UP)
        self.mux: MuxDevice | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def uplink(self, if_id: int, pkt: bytes) -> None:
        if pkt.startswith(CTL):
            self._control(pkt[len(CTL):].decode().split())
        else:
            self.up(if_id, pkt)

    def _control(self, words: list[str]) -> None:
        assert self.mux is not None
        op = words[0]
        if op == "START":  # n DL packets per session, towards the host
            task = asyncio.get_running_loop().create_task(device_send(self.mux, int(words[1])))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif op == "FLOW":
            self.mux.assert_flow_control(int(words[1]), words[2] == "1")
        elif op == "REPORT":
            st = self.mux.status()
            report = {"next": self.up.next, "bad": self.up.bad[:2],
                      "counters": st["counters"], "rejects": st["rejects"],
                      "flow_asserted": st["flow_asserted"], "mode": st["mode"]}
            self.mux.downlink(0, RPT + json.dumps(report).encode())


def attach_mux(model: DeviceModel, options: dict[str, Any]) -> None:
    gw = ModelGateway()
    gw.mux = MuxDevice(gw, credit_window=int(options.get("credit_window", 0)))
    model.attach(0, gw.mux)
    model.mux_gateway = gw  # type: ignore[attr-defined]  # kept alive with the model


FACTORY = f"{__name__}:attach_mux"


# ---- the host side -------------------------------------------------------------------------------


class Host:
    def __init__(self, mux: MuxHost) -> None:
        self.mux = mux
        self.down = Checker(DOWN)
        self.flow = FlowWatch()
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        mux.on_receive = self.receive
        mux.on_flow = self.flow

    def receive(self, if_id: int, pkt: bytes) -> None:
        if pkt.startswith(RPT):
            self.reports.put_nowait(json.loads(pkt[len(RPT):]))
        else:
            self.down(if_id, pkt)

    def control(self, text: str) -> None:
        assert self.mux.transmit(0, CTL + text.encode())

    async def report(self) -> dict[str, Any]:
        self.control("REPORT")
        return await asyncio.wait_for(self.reports.get(), 5)

    async def report_when(self, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        last: list[dict[str, Any]] = []

        async def reported() -> bool:
            last.append(await self.report())
            return bool(cond(last[-1]))

        await until_async(reported, timeout, lambda: f"{what}; last report {last[-1]}", poll=0.05)
        return last[-1]


@pytest.mark.parametrize("mode", [MuxMode.LITE, MuxMode.AGGREGATION])
def test_two_processes_8_sessions_10k_each_way_and_flow_control(mode: MuxMode) -> None:
    async def main() -> None:
        mp = await ModelProcess.spawn(functions=FACTORY,
                                      config=asdict(DeviceConfig.for_mux(str(mode))))
        eng = IpcEngine(mp.bus)
        try:
            await eng.start()
            mux = MuxHost(eng)  # the daemon's way: mode and credits from the engine
            assert eng.mux is mux and mux.mode is mode and not mux.ul_credit
            h = Host(mux)
            await asyncio.gather(*(mux.open_session(i) for i in range(8)))
            assert mux.sessions == list(range(8))
            assert list(eng.channels) == [0]

            h.control(f"START {N}")
            await host_send(mux, h.flow, N)
            await until_async(lambda: h.down.total == 8 * N, 60,
                              f"DL packets ({h.down.total} of {8 * N})")
            r = await h.report_when(lambda r: sum(r["next"]) >= 8 * N, 60, "UL packets")
            assert r["mode"] == str(mode)
            assert r["next"] == [N] * 8 and not r["bad"], r
            assert h.down.next == [N] * 8 and not h.down.bad, h.down.bad
            assert not r["rejects"] and not mux.rejects.counters and not eng.counters
            st = mux.status()
            for i in range(8):
                c = st["sessions"][i]
                assert c["tx_dropped_queue_full"] == 0 and c["rx_packets"] >= N
            if mode is MuxMode.AGGREGATION:
                assert r["counters"]["ul_blocks"] < 8 * N / 4  # really aggregated
            # the 110 KiB stop was hit and lifted by the engine's UL completions (no timer)
            assert mux.global_stops > 0 and mux._poll is None

            # flow control asserted by the model stops session 3's uplink, and releases it
            h.control("FLOW 3 1")
            await until_async(lambda: mux.status()["sessions"][3]["device_flow_ctl"] == 1, 5,
                              "FLOW_CTL taken")
            ok = sum(mux.transmit(3, packet(UP, 3, N + i)) for i in range(QUEUE_LIMIT_FC + 10))
            assert ok == QUEUE_LIMIT_FC and h.flow.stopped[3]   # the link stops when full
            assert mux.status()["sessions"][3]["tx_dropped_queue_full"] == 10
            for i in range(50):  # session 4 is not held up
                assert mux.transmit(4, packet(UP, 4, N + i))
            r = await h.report_when(lambda r: r["next"][4] == N + 50, 10, "session 4")
            assert r["next"][3] == N and r["flow_asserted"] == [3]
            assert r["counters"]["flow_ctl_acks"] == 1
            h.control("FLOW 3 0")
            await until_async(lambda: not h.flow.stopped[3], 5, "on_flow(3, released)")
            r = await h.report_when(lambda r: r["next"][3] == N + QUEUE_LIMIT_FC, 10,
                                    "the queued packets of session 3")
            assert not r["bad"] and r["counters"]["flow_ctl_acks"] == 2
            assert r["counters"].get("ul_while_flow_ctl", 0) == 0

            for i in range(8):
                await mux.close_session(i)
            assert not eng.channels and eng.state is EngineState.RUNNING
        finally:
            await eng.stop()
            await mp.close()

    run(main(), timeout=240)


def test_sessions_come_back_by_themselves_after_a_modem_restart() -> None:
    async def main() -> None:
        mp = await ModelProcess.spawn(functions=FACTORY, config=asdict(DeviceConfig()))
        eng = IpcEngine(mp.bus)
        try:
            await eng.start()
            mux = MuxHost(eng)
            h = Host(mux)
            for i in (0, 2):
                await mux.open_session(i)
            await host_send(mux, h.flow, 100, range(0, 3, 2))
            await h.report_when(lambda r: r["next"][2] == 100, 10, "first packets")

            await mp.crash()
            await until_async(lambda: eng.state is EngineState.DOWN, 5, "engine DOWN")
            assert h.flow.stopped[0] and h.flow.stopped[2]  # links stop reading
            assert mux.sessions == [] and not mux.transmit(2, packet(UP, 2, 100))

            await mp.recover()
            await eng.start()
            await until_async(lambda: mux.sessions == [0, 2], 5, "sessions reopened")
            assert not h.flow.stopped[0] and not h.flow.stopped[2]
            for i in range(100, 200):
                assert mux.transmit(2, packet(UP, 2, i))
            r = await h.report_when(lambda r: r["next"][2] == 200, 10, "packets after restart")
            assert not r["bad"] and r["counters"]["sessions_opened"] == 4  # 2 before, 2 after
        finally:
            await eng.stop()
            await mp.close()

    run(main(), timeout=60)


@pytest.mark.parametrize("mode", [MuxMode.LITE, MuxMode.AGGREGATION])
def test_two_processes_credit_mode_from_the_capability_register(mode: MuxMode) -> None:
    """Capability bit 21: the host sends on credits only; the model grants a 32 KiB window
    per session and gives back what arrives."""

    async def main() -> None:
        caps = CAP_UL_FLOW_CREDIT | (CAP_UL_AGGR | CAP_DL_AGGR if mode is MuxMode.AGGREGATION
                                     else 0)
        mp = await ModelProcess.spawn(functions=FACTORY,
                                      config=asdict(DeviceConfig(capabilities=caps)),
                                      options={"credit_window": 32 * 1024})
        eng = IpcEngine(mp.bus)
        try:
            await eng.start()
            mux = MuxHost(eng)
            assert mux.mode is mode and mux.ul_credit
            h = Host(mux)
            await asyncio.gather(*(mux.open_session(i) for i in range(8)))
            await until_async(
                lambda: all(c["credits"] > 0 for c in mux.status()["sessions"].values()),
                5, "the first grants")
            h.control("START 2000")
            await host_send(mux, h.flow, 2000)
            await until_async(lambda: h.down.total == 8 * 2000, 60, "DL packets")
            r = await h.report_when(lambda r: sum(r["next"]) >= 8 * 2000, 60, "UL packets")
            assert r["next"] == [2000] * 8 and not r["bad"] and not h.down.bad
            assert r["counters"]["credit_grants"] > 8 and not r["rejects"]
            st = mux.status()
            assert st["ul_stops"] == 0 and not st["rejects"]  # credits, not pending bytes
            assert all(c["tx_dropped_queue_full"] == 0 for c in st["sessions"].values())
        finally:
            await eng.stop()
            await mp.close()

    run(main(), timeout=120)
