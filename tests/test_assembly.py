"""The model assembled from its options (sim/assembly.py), in this process: which function sits
on which channel (docs/architecture.md: MBIM on channel 6, the MUX on channel 0, the packet
gateway behind the MUX), the credit window capability bit 21 asks for, and a cleanup that
closes the gateway. Tier 1: a shared-memory bus and the echo gateway need no privileges."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from iosm_cuse.bus.shm import ShmBus
from iosm_cuse.sim.assembly import (
    DATA_PATH_ONLY,
    MBIM_CHANNEL,
    MODEL,
    MODEL_CREDIT_WINDOW,
    MUX_CHANNEL,
    Assembly,
    ModelOptions,
    OptionsError,
    assemble,
    assemble_data_path,
)
from iosm_cuse.sim.at import AtFunction
from iosm_cuse.sim.config import ModemConfig
from iosm_cuse.sim.device import DeviceConfig, DeviceModel
from iosm_cuse.sim.mbim import MbimChannelFunction
from iosm_cuse.sim.process import ModelFunctions, attach_functions
from iosm_cuse.wire.channels import AT_CHANNELS, MuxMode
from iosm_cuse.wire.ipc import CAP_UL_FLOW_CREDIT


@pytest.fixture
def bus() -> Iterator[ShmBus]:
    b = ShmBus.create()
    try:
        yield b
    finally:
        b.close()


def model_for(bus: ShmBus, mux: str, credit: bool) -> DeviceModel:
    caps = DeviceConfig.for_mux(mux).capabilities | (CAP_UL_FLOW_CREDIT if credit else 0)
    return DeviceModel(bus, DeviceConfig(capabilities=caps))


def ipv4_from(source: str, session: int = 0) -> bytes:
    """A minimal IPv4 header from `source` (dotted quad) to the session's gateway."""
    src = bytes(int(x) for x in source.split("."))
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, src,
                       bytes([10, 99, session, 1]))


@pytest.mark.parametrize("credit", [False, True], ids=["no-credit", "credit"])
@pytest.mark.parametrize("mux", ["lite", "aggregation"])
def test_the_model_is_assembled_on_the_channels_the_docs_name(bus: ShmBus, mux: str,
                                                              credit: bool) -> None:
    async def main() -> None:
        model = model_for(bus, mux, credit)
        assembly = assemble(model, ModelOptions(gateway="echo", mux=mux).as_json())
        try:
            assert set(model.functions) == {MBIM_CHANNEL, MUX_CHANNEL, *AT_CHANNELS} == \
                {6, 0, 2, 4}
            assert isinstance(model.functions[6], MbimChannelFunction)
            # both AT interpreters answer from the MBIM function's modem state
            for ch in AT_CHANNELS:
                at = model.functions[ch]
                assert isinstance(at, AtFunction)
                assert assembly.mbim is not None and at.interpreter.modem is assembly.mbim.modem
            assert model.functions[0] is assembly.mux
            assert assembly.mux.fixed_mode is MuxMode(mux)
            assert assembly.mux.credit_window == (MODEL_CREDIT_WINDOW if credit else 0)
            # the gateway behind the MUX, both ways, and told of sessions by MBIM
            assert assembly.mux.gateway == assembly.gateway.uplink
            assert assembly.gateway.downlink == assembly.mux.downlink
            assert assembly.gateway.mode == "echo"
            assert assembly.mbim is not None
            assert assembly.mbim.session_listener == assembly.gateway.session_changed
            # MBIM's packet statistics are the gateway's counters
            assert assembly.mbim.statistics_source is not None
            assembly.gateway.uplink(0, ipv4_from("10.99.0.2"))  # session 0 is not connected
            assert assembly.mbim.statistics_source().out_discards == 1
        finally:
            await assembly.close()

    asyncio.run(main())


def test_without_options_the_model_is_the_daemon_default(bus: ShmBus) -> None:
    async def main() -> None:
        model = DeviceModel(bus)
        assembly = assemble(model, {})
        try:
            assert set(model.functions) == {0, 2, 4, 6}
            assert assembly.gateway.mode == "echo"
            assert assembly.mux.fixed_mode is None  # the host's choice of MUX mode
            assert assembly.mux.credit_window == 0
        finally:
            await assembly.close()

    asyncio.run(main())


def test_the_data_path_alone_has_no_mbim_and_its_sessions_connected(bus: ShmBus) -> None:
    async def main() -> None:
        model = model_for(bus, "lite", credit=False)
        assembly = assemble_data_path(model, {"gateway": "echo", "mux": "lite",
                                              "connect": [0, 2]})
        try:
            assert set(model.functions) == {MUX_CHANNEL}
            assert assembly.mbim is None
            assert sorted(assembly.gateway.sessions) == [0, 2]
            before = assembly.gateway.counters["drop_not_connected"]
            assembly.gateway.uplink(1, ipv4_from("10.99.1.2", 1))
            assert assembly.gateway.counters["drop_not_connected"] == before + 1
        finally:
            await assembly.close()

    asyncio.run(main())


def test_the_cleanup_closes_the_gateway(bus: ShmBus, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []

    async def main() -> None:
        assembly = assemble(DeviceModel(bus), ModelOptions().as_json())

        async def close() -> None:
            closed.append(assembly.gateway.mode)

        monkeypatch.setattr(assembly.gateway, "close", close)
        assert closed == []
        await assembly.close()

    asyncio.run(main())
    assert closed == ["echo"]


def test_the_model_process_keeps_the_assembly_and_reports_its_gateway(bus: ShmBus) -> None:
    """sim/process.py's factory hook: the spec names `assemble`; what it returns is what the
    process closes on its way out, and its gateway counters answer `stats`."""

    async def main() -> None:
        functions = attach_functions(DeviceModel(bus), MODEL, {"gateway": "echo"})
        assert isinstance(functions, Assembly) and isinstance(functions, ModelFunctions)
        assert functions.stats() == {"gateway": functions.gateway.counters,
                                     "function_rejects": {"mux": {}, "mbim": {}}}
        await functions.close()
        data = attach_functions(DeviceModel(bus), DATA_PATH_ONLY, {"connect": [1]})
        assert isinstance(data, Assembly) and data.mbim is None
        await data.close()

    asyncio.run(main())


def test_options_cross_to_the_model_process_as_json() -> None:
    opts = ModelOptions(config="/etc/modem.json", gateway="netns:gw", mux="aggregation",
                        mbim=False, tun_name="gw0", connect=(1, 3))
    plain = opts.as_json()
    assert plain["connect"] == [1, 3]
    assert ModelOptions.from_json(plain) == opts
    assert ModelOptions.from_json({"config": None, "mux": None}) == ModelOptions()
    with pytest.raises(OptionsError, match="gatway"):
        ModelOptions.from_json({"gatway": "tun"})


def test_a_config_file_reaches_the_functions(bus: ShmBus, tmp_path: Path) -> None:
    path = tmp_path / "modem.toml"
    path.write_text('model = "XMM7560 (assembled)"\nmtu = 1400\n')

    async def main() -> None:
        assembly = assemble(DeviceModel(bus), {"config": str(path)})
        try:
            assert assembly.gateway.config == ModemConfig.load(path) != ModemConfig()
            assert assembly.gateway.config.mtu == 1400
            assert assembly.mbim is not None
            assert assembly.mbim.config.model == "XMM7560 (assembled)"
        finally:
            await assembly.close()

    asyncio.run(main())
