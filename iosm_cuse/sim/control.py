"""Live control of the modem model: what the network, the SIM, the radio and the modem itself
do while a host runs (docs/control.md). Sans-IO.

The actions and their arguments are declared once, in `ACTIONS`; the daemon's control socket
offers each as `modem.<action>` (iosm_cuse/control.py) and forwards it to the model process,
where `apply` checks it again against the same declaration and applies it to the model's
`ModemState`, sending the MBIM indications a real modem sends for that change through the MBIM
function. A scenario (iosm_cuse/scenario.py) is a timeline of the same actions.

This module is imported by the CLI and the daemon for `ACTIONS`: at module level it needs the
standard library and `wire/` only; what it applies to is imported where it is applied.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from iosm_cuse.sim.config import LTE_SIGNAL_RANGES
from iosm_cuse.wire.args import MCCMNC, PHONE_NUMBER, Arg, ArgError, check_args

if TYPE_CHECKING:
    from iosm_cuse.sim.gateway import Gateway
    from iosm_cuse.sim.mbim import MbimFunction
    from iosm_cuse.sim.mbim.modem import Indication, ModemState


class Network(enum.StrEnum):
    """What the network lets the modem do (`modem register`)."""

    HOME = "home"            # registered on its home network (or --operator as home)
    ROAMING = "roaming"      # registered on a visited network
    SEARCHING = "searching"  # no coverage: looking for a network
    DENIED = "denied"        # the network refuses registration (NwError: the reject cause)
    OFF = "off"              # deregistered, not searching


class SimCard(enum.StrEnum):
    READY = "ready"
    ABSENT = "absent"
    PIN = "pin"              # inserted, asking for its PIN
    PUK = "puk"              # inserted, PIN blocked: asking for its PUK


class Switch(enum.StrEnum):
    ON = "on"
    OFF = "off"


class FccLock(enum.StrEnum):
    LOCK = "lock"
    UNLOCK = "unlock"


class CrashStage(enum.StrEnum):
    """The exec stage a crashing modem shows the host."""

    CRASH = "crash"          # in-band crash (0x8BADF00D)
    CD_READY = "cd-ready"    # core dump ready (0xBADC0DED): the host sees a link down


def _choices(e: type[enum.StrEnum]) -> tuple[str, ...]:
    return tuple(m.value for m in e)


SESSION = Arg("session", int, lo=0, hi=255)
CAUSE = Arg("cause", int, required=False, lo=0, hi=255)

# The actions, declared once: name -> its arguments (checked by wire.args.check_args).
ACTIONS: dict[str, tuple[Arg, ...]] = {
    "register": (Arg("state", str, choices=_choices(Network)),
                 Arg("operator", str, required=False, pattern=MCCMNC),
                 Arg("name", str, required=False, max_len=64),
                 CAUSE),
    "signal": (Arg("rssi", int, lo=0, hi=31, also=(99,)),
               Arg("ber", int, required=False, lo=0, hi=7, also=(99,)),
               *(Arg(name, int, required=False, lo=lo, hi=hi)
                 for name, (lo, hi) in LTE_SIGNAL_RANGES.items())),
    "sim": (Arg("state", str, choices=_choices(SimCard)),),
    "detach": (),
    "deactivate": (SESSION, CAUSE),
    "radio": (Arg("state", str, choices=_choices(Switch)),),
    "fcc": (Arg("state", str, choices=_choices(FccLock)),),
    "sms.deliver": (Arg("sender", str, pattern=PHONE_NUMBER),
                    Arg("text", str, max_len=1600)),
    "sms.outbox": (),
    "ussd.notify": (Arg("text", str, max_len=182),),
    "crash": (Arg("stage", str, required=False, choices=_choices(CrashStage)),),
    "shape": (SESSION,
              Arg("delay_ms", float, required=False, lo=0, hi=60_000),
              Arg("loss_percent", float, required=False, lo=0, hi=100),
              Arg("rate_mbit", float, required=False, lo=0.001, hi=100_000),
              Arg("clear", bool, required=False)),
    "state": (),
}

# Actions that only report: a scenario step may not use them (they change nothing).
QUERIES = frozenset({"state", "sms.outbox"})


class ActionError(ArgError):
    """An action that cannot be applied: bad arguments (EINVAL), an unknown action or one this
    model lacks (EOPNOTSUPP), a session that is not up (ENOENT)."""


def check(action: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """`args` checked against the action's declaration (None for each optional one left out)."""
    spec = ACTIONS.get(action)
    if spec is None:
        raise ActionError(f"unknown action {action!r}", errno.EOPNOTSUPP)
    try:
        return check_args(action, spec, dict(args))
    except ArgError as exc:
        raise ActionError(exc.message, exc.errno) from None


class Target(Protocol):
    """What the actions apply to: the assembled model (sim.assembly.Assembly)."""

    @property
    def mbim(self) -> MbimFunction | None: ...

    @property
    def gateway(self) -> Gateway: ...

    def crash(self, stage: CrashStage) -> None: ...


def apply(target: Target, action: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check and apply one action; its result: the indications sent (by CID name) and what the
    action reports. Raises ActionError, having changed nothing."""
    checked = check(action, args)
    result = _APPLY[action](target, checked)
    return {"action": action, **result}


# ---- the actions ------------------------------------------------------------------------------

Result = dict[str, Any]


def _modem(target: Target) -> tuple[MbimFunction, ModemState]:
    if target.mbim is None:
        raise ActionError("this model has no MBIM function", errno.EOPNOTSUPP)
    return target.mbim, target.mbim.modem


def _sent(fn: MbimFunction, indications: list[Indication]) -> Result:
    """Send the indications to the host (when open and subscribed) and name them."""
    from iosm_cuse.mbim import cids

    fn.indicate(indications)
    names = []
    for ind in indications:
        spec = cids.lookup(ind.service, ind.cid)
        names.append(spec.name if spec is not None else f"{ind.service.name}:{ind.cid}")
    return {"indications": names}


def _register(target: Target, a: Result) -> Result:
    from iosm_cuse.sim.config import Provider

    fn, modem = _modem(target)
    network = Network(a["state"])
    if a["cause"] is not None and network is not Network.DENIED:
        raise ActionError("register: --cause goes with denied")
    if (a["operator"] or a["name"]) and network not in (Network.HOME, Network.ROAMING):
        raise ActionError("register: --operator and --name go with home or roaming")
    provider = None
    if a["operator"] is not None or a["name"] is not None:
        base = modem.config.home_provider if network is Network.HOME \
            else modem.roaming_provider()
        pid = a["operator"] or base.id
        known = base.name if pid == base.id else modem.provider_name(pid)
        provider = Provider(pid, a["name"] if a["name"] is not None else known)
    return _sent(fn, modem.set_network(network, provider, a["cause"]))


def _signal(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, set_signal(modem, a["rssi"], a["ber"], rsrp=a["rsrp"], rsrq=a["rsrq"],
                                snr=a["snr"]))


def _sim(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, modem.set_sim(SimCard(a["state"])))


def _detach(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, modem.detach())


def _deactivate(target: Target, a: Result) -> Result:
    from iosm_cuse.sim.mbim.modem import NW_REGULAR_DEACTIVATION

    fn, modem = _modem(target)
    sid = a["session"]
    if sid not in modem.sessions:
        raise ActionError(f"deactivate: session {sid} is not active", errno.ENOENT)
    cause = NW_REGULAR_DEACTIVATION if a["cause"] is None else a["cause"]
    return _sent(fn, modem.deactivate(sid, cause))


def _radio(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, modem.set_hw_radio(Switch(a["state"]) is Switch.ON))


def _fcc(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, modem.set_fcc_lock(FccLock(a["state"]) is FccLock.LOCK))


def _sms_deliver(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, deliver_sms(modem, a["sender"], a["text"]))


def _sms_outbox(target: Target, a: Result) -> Result:
    _, modem = _modem(target)
    return {"indications": [], "messages": sms_outbox(modem)}


def _ussd_notify(target: Target, a: Result) -> Result:
    fn, modem = _modem(target)
    return _sent(fn, ussd_notify(modem, a["text"]))


def _crash(target: Target, a: Result) -> Result:
    stage = CrashStage(a["stage"] or CrashStage.CRASH)
    target.crash(stage)
    return {"indications": [], "stage": stage.value}


def _shape(target: Target, a: Result) -> Result:
    sid, shaping = a["session"], ("delay_ms", "loss_percent", "rate_mbit")
    if a["clear"]:
        if any(a[k] is not None for k in shaping):
            raise ActionError("shape: --clear takes no --delay, --loss or --rate")
        clear_shape(target.gateway, sid)
    elif all(a[k] is None for k in shaping):
        raise ActionError("shape: give --delay, --loss or --rate (or --clear)")
    else:
        set_shape(target.gateway, sid, delay_ms=float(a["delay_ms"] or 0.0),
                  loss_percent=float(a["loss_percent"] or 0.0),
                  rate_mbit=None if a["rate_mbit"] is None else float(a["rate_mbit"]))
    return {"indications": [], "shapes": _shapes_json(target.gateway)}


def _state(target: Target, a: Result) -> Result:
    # A data-path-only model (no MBIM function) still reports its gateway's shaping.
    modem = target.mbim.modem if target.mbim is not None else None
    return {"indications": [], "state": state_of(modem) if modem is not None else None,
            "shapes": _shapes_json(target.gateway), "shaped": _shaped_json(target.gateway)}


_APPLY: dict[str, Callable[[Target, Result], Result]] = {
    "register": _register, "signal": _signal, "sim": _sim, "detach": _detach,
    "deactivate": _deactivate, "radio": _radio, "fcc": _fcc, "sms.deliver": _sms_deliver,
    "sms.outbox": _sms_outbox, "ussd.notify": _ussd_notify, "crash": _crash,
    "shape": _shape, "state": _state,
}
assert _APPLY.keys() == ACTIONS.keys()


def state_of(modem: ModemState) -> Result:
    """Everything live control sets, as it stands now (`modem state`)."""
    reg = modem.register_values()
    return {
        "network": modem.network.value,
        "register_state": reg["RegisterState"].name.lower(),
        "provider": {"id": reg["ProviderId"], "name": reg["ProviderName"]},
        "reject_cause": reg["NwError"],
        "radio": {"hw": "on" if modem.hw_radio_on else "off",
                  "sw": "on" if modem.radio_on else "off", "fcc_locked": modem.fcc_locked},
        "sim": modem.sim_card(),
        "pin_retries": modem.pin_retries, "puk_retries": modem.puk_retries,
        "signal": {"rssi": modem.rssi, "ber": modem.error_rate},
        "packet_service": "attached" if modem.attached else "detached",
        "sessions": {str(sid): {"apn": s.apn, "ip_type": s.ip_type.name.lower(),
                                "ipv4": str(s.ipv4) if s.ipv4 else None,
                                "ipv6": str(s.ipv6) if s.ipv6 else None}
                     for sid, s in sorted(modem.sessions.items())},
    }


# ---- interfaces of the model other parts provide ---------------------------------------------
# The SMS and USSD services and extended signal (ModemState) and traffic shaping (Gateway):
# the only calls live control makes to them.


def _unsupported(what: str) -> ActionError:
    return ActionError(f"{what}: not supported by this model", errno.EOPNOTSUPP)


def _refused(what: str, change: Callable[[], list[Indication]]) -> list[Indication]:
    """A change the model refuses with ValueError (a value it cannot carry, such as a text
    longer than one SMS) is an EINVAL answer, nothing changed."""
    try:
        return change()
    except ValueError as exc:
        raise ActionError(f"{what}: {exc}") from None


def set_signal(modem: ModemState, rssi: int, error_rate: int | None, *, rsrp: int | None,
               rsrq: int | None, snr: int | None) -> list[Indication]:
    return _refused("signal", lambda: modem.set_signal(rssi, error_rate, rsrp=rsrp, rsrq=rsrq,
                                                       snr=snr))


def deliver_sms(modem: ModemState, sender: str, text: str) -> list[Indication]:
    return _refused("sms deliver", lambda: modem.deliver_sms(sender, text))


def sms_outbox(modem: ModemState) -> list[dict[str, Any]]:
    """What hosts sent."""
    return modem.sms_outbox()


def ussd_notify(modem: ModemState, text: str) -> list[Indication]:
    """A network-initiated USSD message."""
    return _refused("ussd notify", lambda: modem.ussd_notify(text))


def set_shape(gateway: Gateway, session_id: int, *, delay_ms: float, loss_percent: float,
              rate_mbit: float | None) -> None:
    try:
        gateway.set_shape(session_id, delay_ms=delay_ms, loss_percent=loss_percent,
                          rate_mbit=rate_mbit)
    except ValueError as exc:
        raise ActionError(f"shape: {exc}") from None


def clear_shape(gateway: Gateway, session_id: int) -> None:
    gateway.clear_shape(session_id)


def _shapes_json(gateway: Gateway) -> dict[str, Any]:
    """Gateway.shapes() with JSON keys."""
    return {str(sid): dict(v) for sid, v in sorted(gateway.shapes().items())}


def _shaped_json(gateway: Gateway) -> dict[str, Any]:
    """What each shaped session's shaper did (passed, lost, overflowed...), with JSON keys."""
    return {str(sid): dict(v) for sid, v in sorted(gateway.shape_counters().items())}
