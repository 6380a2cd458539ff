"""The modem model assembled from its options: the one place that says which function sits on
which channel (docs/architecture.md, Contract 3 and Contract 5).

    MBIM function on channel 6 -> tells the gateway of sessions, reads its counters
    AT interpreters on 2 and 4 -> answer from the MBIM function's ModemState; what AT+CFUN=
                                  changes reaches the MBIM host as its indications
    MuxDevice on channel 0     -> the packet gateway behind it, and back (gateway.downlink)

A model process gets its functions from a `functions` factory spec (sim/process.py); `MODEL`
names `assemble`, what `iosm-cuse up` and `iosm-cuse modem` run. `DATA_PATH_ONLY` names the same
assembly without the MBIM function, with sessions connected from the start, for tests and
benchmarks that move packets without an MBIM client (and without the AT interpreters, which
share the MBIM function's state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, cast

from iosm_cuse.wire import channels
from iosm_cuse.wire.ipc import CAP_UL_FLOW_CREDIT

# The parent (the daemon) imports this module for ModelOptions and the factory specs only: what
# runs in the model process is imported where it is built.
if TYPE_CHECKING:
    from iosm_cuse.sim.config import ModemConfig
    from iosm_cuse.sim.control import CrashStage
    from iosm_cuse.sim.device import ChannelFunction, DeviceModel
    from iosm_cuse.sim.gateway import Gateway
    from iosm_cuse.sim.mbim import MbimFunction, PacketStatistics
    from iosm_cuse.sim.mux import MuxDevice

log = logging.getLogger(__name__)

# The channels, as the channel table declares them for both sides.
MBIM_CHANNEL = channels.MBIM_CHANNEL
MUX_CHANNEL = channels.IP_MUX_CHANNEL
AT_CHANNELS = channels.AT_CHANNELS

# Factory specs for ModelProcess.spawn(functions=...) and serve_file.
MODEL = "iosm_cuse.sim.assembly:assemble"
DATA_PATH_ONLY = "iosm_cuse.sim.assembly:assemble_data_path"

# UL credit granted per session by a model announcing credit flow control (capability bit 21);
# re-granted after half of it was used, so a stream never waits on a round trip at this size.
MODEL_CREDIT_WINDOW = 64 * 1024


class OptionsError(ValueError):
    """The model's options name something it does not have."""


@dataclass(frozen=True)
class ModelOptions:
    """What a model process is assembled from. It crosses to the model process as JSON
    (`as_json`, `from_json`), so every field is a plain value."""

    config: str | None = None  # a ModemConfig file; None: the built-in XMM7560 defaults
    gateway: str = "echo"  # echo | tun | netns:NAME (Gateway's modes)
    mux: str | None = None  # the MUX mode the device insists on; None: the host's choice
    mbim: bool = True  # the MBIM function on channel 6
    tun_name: str | None = None  # the gateway TUN in tun and netns modes; None: iosmgw<K>
    instance: int = 0  # K of wwanK: the modem's addresses and IMEI (ModemConfig.for_instance)
    connect: tuple[int, ...] = ()  # sessions connected from the start, as if by MBIM

    @classmethod
    def from_json(cls, options: Mapping[str, Any]) -> ModelOptions:
        """Missing or null keys take the defaults; an unknown key is an error, not a silent
        default (a typo would otherwise assemble a different model)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(f"unknown model options: {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if v is not None}
        if "connect" in given:
            given["connect"] = tuple(int(n) for n in given["connect"])
        return cls(**given)

    def as_json(self) -> dict[str, Any]:
        plain = asdict(self)
        plain["connect"] = list(self.connect)
        return plain


class Assembly:
    """The assembled functions of one model; the model process holds it until it stops and then
    awaits `close` (which removes the gateway's TUN and a namespace the gateway created)."""

    def __init__(self, model: DeviceModel, gateway: Gateway, mux: MuxDevice,
                 mbim: MbimFunction | None, starting: asyncio.Task[None]) -> None:
        self.model = model
        self.gateway = gateway
        self.mux = mux
        self.mbim = mbim
        self._starting = starting

    def control(self, action: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """One live-control action (sim/control.py): the model process's `control` command."""
        from iosm_cuse.sim import control

        return control.apply(self, action, args)

    def crash(self, stage: CrashStage) -> None:
        from iosm_cuse.sim.control import CrashStage
        from iosm_cuse.wire.ipc import ExecStage

        self.model.crash(ExecStage.CD_READY if stage is CrashStage.CD_READY
                         else ExecStage.CRASH)

    def stats(self) -> dict[str, Any]:
        """What the model process's `stats` command adds."""
        return {"gateway": self.gateway.counters,
                "function_rejects": {"mux": dict(self.mux.rejects.counters),
                                     "mbim": dict(self.mbim.rejects.counters)
                                     if self.mbim is not None else {}}}

    async def close(self) -> None:
        # A start still configuring may be about to create the namespace: let it finish first,
        # then remove it.
        if not self._starting.done():
            with contextlib.suppress(Exception):
                await self._starting
        await self.gateway.close()


def assemble(model: DeviceModel, options: Mapping[str, Any]) -> Assembly:
    """The `functions` factory of a model process: `build` from JSON options."""
    return build(model, ModelOptions.from_json(options))


def assemble_data_path(model: DeviceModel, options: Mapping[str, Any]) -> Assembly:
    """`assemble` without the MBIM function: the MUX and the gateway alone."""
    return build(model, ModelOptions.from_json({**options, "mbim": False}))


def build(model: DeviceModel, options: ModelOptions) -> Assembly:
    """Attach the model's functions to their channels and start the gateway (in the background:
    a TUN in a namespace takes a while, and the model must answer the host meanwhile)."""
    from iosm_cuse.sim.config import ModemConfig
    from iosm_cuse.sim.gateway import Gateway
    from iosm_cuse.sim.mux import MuxDevice

    config = ModemConfig.load(options.config) if options.config else ModemConfig()
    config = config.for_instance(options.instance)
    gateway = Gateway(config, options.gateway,
                      tun_name=options.tun_name or gateway_tun_name(options.instance))
    mux = MuxDevice(gateway.uplink, options.mux, credit_window=credit_window(model))
    mux.record = model.record          # the model's protocol recorder, if any (sim/recorder.py)
    gateway.downlink = mux.downlink
    mbim = _attach_mbim(model, config, gateway) if options.mbim else None
    if mbim is not None:
        _attach_at(model, mbim)
    for session in options.connect:
        gateway.session_changed(session, config.session_ip(session))
    model.attach(MUX_CHANNEL, mux)
    starting = asyncio.get_running_loop().create_task(gateway.start())
    starting.add_done_callback(_log_start_failure)
    return Assembly(model, gateway, mux, mbim, starting)


def gateway_tun_name(instance: int) -> str:
    """The gateway TUN of modem wwanK in tun and netns modes: iosmgw0 for the first, iosmgwK
    for the others, so several modems' gateways never take the same name."""
    return f"iosmgw{instance}"


def _attach_mbim(model: DeviceModel, config: ModemConfig, gateway: Gateway) -> MbimFunction:
    """The MBIM function tells the gateway which sessions are connected (Contract 3) and
    reports the gateway's counters as its packet statistics."""
    from iosm_cuse.sim.mbim import MbimChannelFunction, MbimFunction

    mbim = MbimFunction(config)
    mbim.session_listener = gateway.session_changed
    mbim.reboot_hook = lambda: _reboot_soon(model)
    mbim.statistics_source = lambda: gateway_statistics(gateway.counters)
    # MbimChannelFunction.opened annotates `send` as returning None where the device's Send
    # returns bool (queued or not); it ignores the result, so it is a ChannelFunction all the
    # same. The cast goes when that annotation says Send.
    model.attach(MBIM_CHANNEL, cast("ChannelFunction", MbimChannelFunction(mbim)))
    return mbim


REBOOT_AFTER = 0.2  # s: MODEM_REBOOT's answer leaves before the device drops off the bus


def _reboot_soon(model: DeviceModel) -> None:
    """MODEM_REBOOT as a device does it: it drops off the bus (in-band crash, exec stage
    CRASH) and the host's recovery resets it and brings its ports back."""
    asyncio.get_running_loop().call_later(REBOOT_AFTER, model.crash)


def _attach_at(model: DeviceModel, mbim: MbimFunction) -> None:
    """One AT interpreter per AT channel, both on the modem state the MBIM function answers
    from, so AT and MBIM agree; what AT changes, MBIM indicates (docs/at-ports.md)."""
    from iosm_cuse.sim.at import AtFunction, AtInterpreter

    for channel in AT_CHANNELS:
        at = AtInterpreter(mbim.modem, on_indications=mbim.indicate)
        model.attach(channel, AtFunction(at, channels.channel_config(channel).dl_buf_size))


def credit_window(model: DeviceModel) -> int:
    """A model whose capabilities announce UL flow on credits must grant them, or the host
    would never send a packet."""
    return MODEL_CREDIT_WINDOW if model.config.capabilities & CAP_UL_FLOW_CREDIT else 0


def gateway_statistics(c: Mapping[str, int]) -> PacketStatistics:
    """The gateway's counters as MBIM PACKET_STATISTICS ("in" is towards the host)."""
    from iosm_cuse.sim.mbim import PacketStatistics

    return PacketStatistics(
        in_discards=c["drop_downlink"] + c["drop_no_session"] + c["drop_shaped_loss"]
        + c["drop_shaped_queue"],
        in_octets=c["dl_bytes"], in_packets=c["dl_packets"],
        out_octets=c["ul_bytes"], out_packets=c["ul_packets"], out_errors=c["drop_malformed"],
        out_discards=c["drop_not_connected"] + c["drop_source"] + c["drop_link_local"]
        + c["drop_not_echo"] + c["drop_tun_write"])


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("packet gateway did not start: %s", task.exception())
