"""The model's protocol recorder (iosm_cuse/sim/recorder.py): off by default, and when on, the
events an IPC host causes, as JSON lines; and the normalisation the differential compares."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ShmPair, engine_running, run, until_async

from iosm_cuse.sim import recorder
from iosm_cuse.sim.device import DeviceModel, Send
from iosm_cuse.sim.mux import MuxDevice
from iosm_cuse.wire.channels import MuxMode
from iosm_cuse.wire.mux import COMMANDS, Command, encode_lite_cmd


class Echo:
    def __init__(self) -> None:
        self.send: Send | None = None

    def opened(self, send: Send) -> None:
        self.send = send

    def receive(self, data: bytes) -> None:
        assert self.send is not None
        self.send(data)

    def closed(self) -> None:
        self.send = None


def test_off_by_default_and_from_the_environment(tmp_path: Path) -> None:
    assert recorder.recorder_from_env({}) is None
    path = tmp_path / "r.jsonl"
    rec = recorder.recorder_from_env({recorder.ENV: str(path)})
    assert rec is not None
    rec("ipc", state="INIT")
    rec("doorbell")
    with open(path, "a") as f:
        f.write('{"n": 3, "ev": "ul_t')              # a torn last line: the process was killed
    assert recorder.load(path) == [{"n": 1, "ev": "ipc", "state": "INIT"},
                                   {"n": 2, "ev": "doorbell"}]


def test_an_ipc_host_is_recorded_pipe_by_pipe_and_td_by_td(shm_pair: ShmPair) -> None:
    events: list[recorder.Event] = []

    async def body() -> None:
        model = DeviceModel(shm_pair.dev)
        assert model.record is None
        model.record = recorder.Recorder(events.append)
        model.attach(6, Echo())
        got: list[bytes] = []
        async with engine_running(model, shm_pair.host) as eng:
            ch = await eng.open_channel(6, got.append)
            for i in range(3):
                ch.send(b"x" * (10 + i))
            await until_async(lambda: len(got) == 3, 5, "three echoes")
            await ch.close()

    run(body())
    json.dumps(events)                                   # JSON-serialisable, every one
    norm = recorder.normalise(events)
    assert norm["ipc"] == ["INIT", "RUNNING", "UNINIT"]          # the engine's stop: UNINIT
    assert norm["msgs"]["OPEN_PIPE"] == [(12, norm["msgs"]["OPEN_PIPE"][0][1]),
                                         (13, norm["msgs"]["OPEN_PIPE"][1][1])]
    assert [m.split(":")[0] for m in norm["msg_order"]].count("CLOSE_PIPE") == 2
    assert norm["ul_td"] == {6: 3} and norm["dl_td"] == {6: 3}
    assert [e["size"] for e in events if e["ev"] == "ul_td"] == [10, 11, 12]
    assert norm["doorbells"] >= 1 and [e["n"] for e in events] == list(range(1, len(events) + 1))


def test_mux_commands_are_recorded_in_both_directions() -> None:
    events: list[recorder.Event] = []
    mux = MuxDevice(lambda if_id, pkt: None, "lite")
    mux.record = recorder.Recorder(events.append)
    mux.opened(lambda data: True)
    c = COMMANDS[MuxMode.LITE]
    mux.receive(encode_lite_cmd(Command(c.open_session, 2, 7, {"flow_ctrl": 0, "ipv4v6_hints": 0,
                                                               "dl_head_pad_len": 0})))
    mux.receive(encode_lite_cmd(Command(c.close_session, 2, 8)))
    assert [(e["ev"], e["cmd"], e["if_id"]) for e in events] == [
        ("mux_ul", "OPEN_SESSION", 2), ("mux_dl", "OPEN_SESSION_RESP", 2),
        ("mux_ul", "CLOSE_SESSION", 2), ("mux_dl", "CLOSE_SESSION_RESP", 2)]


def test_normalise_keeps_orders_and_counts_and_drops_timing() -> None:
    a = [{"ev": "ipc", "state": "INIT"}, {"ev": "doorbell"}, {"ev": "ipc", "state": "INIT"},
         {"ev": "mux_dl", "cmd": "FCTH", "if_id": 0}, {"ev": "mux_dl", "cmd": "FCTH", "if_id": 0},
         {"ev": "ul_td", "channel": 0, "size": 5}, {"ev": "ul_td", "channel": 0, "size": 9}]
    b = [{"ev": "ipc", "state": "INIT"}, {"ev": "mux_dl", "cmd": "FCTH", "if_id": 0},
         {"ev": "doorbell"}, {"ev": "doorbell"},
         {"ev": "ul_td", "channel": 0, "size": 1}, {"ev": "ul_td", "channel": 0, "size": 2}]
    na, nb = recorder.normalise(a), recorder.normalise(b)
    assert {k: v for k, v in na.items() if k != "doorbells"} == \
        {k: v for k, v in nb.items() if k != "doorbells"}
    b.append({"ev": "ul_td", "channel": 6, "size": 1})     # one more TD on another channel
    assert recorder.normalise(b)["ul_td"] != na["ul_td"]
