"""The modem's state behind its MBIM function: SIM, radio, registration, packet service, sessions.

Sans-IO and free of MBIM framing. A change is a method call that returns what it caused: the
``Indication``s (a CID and its values) a subscribed host hears of, and, for what a host may be
refused, the status (``Change``). The function (``function.py``) frames them; the live control
of later issues (register, signal, SIM, detach, deactivate, radio) calls the same methods.

Requests arrive decoded: enum values are members of their enum (``iosm_cuse/mbim/cids.py``
rejects the rest), so nothing here re-checks them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any

from iosm_cuse.mbim import cids
from iosm_cuse.mbim.cids import (
    ActivationState,
    BasicConnect,
    CellularClass,
    IpType,
    PacketServiceState,
    PinOperation,
    PinState,
    PinType,
    ProviderState,
    RadioState,
    ReadyState,
    RegisterAction,
    RegisterMode,
    RegisterState,
    VoiceCallState,
)
from iosm_cuse.mbim.constants import Status
from iosm_cuse.mbim.infobuf import encode
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.config import ModemConfig, SessionIp

log = logging.getLogger(__name__)

Values = dict[str, Any]

NW_MISSING_OR_UNKNOWN_APN = 27     # 3GPP cause carried in NwError
NW_IPV4_ONLY_ALLOWED = 50
NW_IPV6_ONLY_ALLOWED = 51
# 3GPP TS 24.008 cause #36, "regular deactivation": the NwError of a CONNECT reporting a
# session taken down on request, which ModemManager names instead of "Unknown error"
# (docs/modemmanager.md §4)
NW_REGULAR_DEACTIVATION = 36
NOT_REGISTERED_SIGNAL = 99         # MBIM's "unknown" Rssi and ErrorRate


@dataclass(frozen=True)
class Indication:
    """A state change as a subscribed host hears of it: one INDICATE_STATUS's CID and values."""

    service: Service
    cid: int
    values: Values

    def info(self) -> bytes:
        """The information buffer, in the CID's notification layout."""
        spec = cids.lookup(self.service, self.cid)
        assert spec is not None and spec.notification is not None, (self.service, self.cid)
        return encode(spec.notification, self.values)


def _basic_connect(cid: BasicConnect, values: Values) -> Indication:
    return Indication(Service.BASIC_CONNECT, cid, values)


@dataclass(frozen=True)
class Change:
    """What a refusable change did: NONE and its indications, or the status refusing it."""

    status: Status = Status.NONE
    indications: tuple[Indication, ...] = ()
    nw_error: int = 0                  # 3GPP cause of a network refusal, for NwError


@dataclass(frozen=True)
class SessionState:
    """An activated data session, as the packet gateway needs it."""

    session_id: int
    apn: str
    ip_type: IpType                     # granted: IPV4, IPV6 or IPV4V6
    ipv4: IPv4Interface | None
    ipv4_gateway: IPv4Address | None
    ipv4_dns: tuple[IPv4Address, ...]
    ipv6: IPv6Interface | None
    ipv6_gateway: IPv6Address | None
    ipv6_dns: tuple[IPv6Address, ...]
    mtu: int

    @classmethod
    def build(cls, session_id: int, apn: str, ip_type: IpType, ip: SessionIp) -> SessionState:
        v4 = ip_type in (IpType.IPV4, IpType.IPV4V6)
        v6 = ip_type in (IpType.IPV6, IpType.IPV4V6)
        return cls(session_id, apn, ip_type,
                   ip.ipv4 if v4 else None, ip.ipv4_gateway if v4 else None,
                   ip.ipv4_dns if v4 else (),
                   ip.ipv6 if v6 else None, ip.ipv6_gateway if v6 else None,
                   ip.ipv6_dns if v6 else (), ip.mtu)


@dataclass
class PacketStatistics:
    """Counters for PACKET_STATISTICS; "in" is towards the host (downlink)."""

    in_discards: int = 0
    in_errors: int = 0
    in_octets: int = 0
    in_packets: int = 0
    out_octets: int = 0
    out_packets: int = 0
    out_errors: int = 0
    out_discards: int = 0


SessionListener = Callable[[int, SessionState | None], None]


class ModemState:
    """The simulated modem as MBIM's BASIC_CONNECT sees it.

    It lives as long as the function, not as long as an MBIM OPEN: ``mbim-network`` runs
    separate mbimcli processes with ``--no-open`` / ``--no-close`` and expects the modem to
    remember.
    """

    def __init__(self, config: ModemConfig | None = None) -> None:
        self.config = c = config if config is not None else ModemConfig()
        # Told of every session that comes up (its SessionState) or goes down (None).
        self.session_listener: SessionListener | None = None
        # Where PACKET_STATISTICS reads its counters (e.g. the packet gateway's); when None,
        # the counters fed through add_traffic().
        self.statistics_source: Callable[[], PacketStatistics] | None = None
        self.radio_on = c.radio_on
        self.pin = c.pin
        self.pin_enabled = c.pin_required
        self.pin_locked = c.pin_required
        self.pin_retries = c.pin_retries
        self.puk_locked = False
        self.puk_retries = c.puk_retries
        self.sim_blocked = False
        self.register_mode = RegisterMode.AUTOMATIC if c.register_automatic else RegisterMode.MANUAL
        self.manual_provider: str | None = None
        self.attached = c.auto_attach and self.registered_provider is not None
        self.rssi = c.rssi
        self.error_rate = c.error_rate
        self.signal_interval = 0
        self.rssi_threshold = 0
        self.error_rate_threshold = 0
        self.sessions: dict[int, SessionState] = {}
        self.stats = PacketStatistics()

    # ------------------------------------------------------------------- derived state

    @property
    def ready_state(self) -> ReadyState:
        if not self.config.sim_present:
            return ReadyState.SIM_NOT_INSERTED
        if self.sim_blocked:
            return ReadyState.BAD_SIM
        if self.pin_locked or self.puk_locked:
            return ReadyState.DEVICE_LOCKED
        return ReadyState.INITIALIZED

    @property
    def sim_ready(self) -> bool:
        return self.ready_state is ReadyState.INITIALIZED

    @property
    def registered_provider(self) -> str | None:
        """MCCMNC of the network the modem is registered on, None when not registered."""
        if not (self.radio_on and self.sim_ready):
            return None
        if self.register_mode is RegisterMode.AUTOMATIC:
            return self.config.home_provider.id
        return self.manual_provider

    def sim_refusal(self) -> Status | None:
        """The status that refuses network operations for the SIM's state, None if ready."""
        rs = self.ready_state
        if rs is ReadyState.SIM_NOT_INSERTED:
            return Status.SIM_NOT_INSERTED
        if rs is ReadyState.BAD_SIM:
            return Status.BAD_SIM
        if rs is ReadyState.DEVICE_LOCKED:
            return Status.PIN_REQUIRED
        return None

    def pin_refusal(self) -> Status | None:
        """Why PIN operations cannot run (no SIM, or a blocked one), None if they can."""
        if not self.config.sim_present:
            return Status.SIM_NOT_INSERTED
        if self.sim_blocked:
            return Status.BAD_SIM
        return None

    def radio_refusal(self) -> Status | None:
        """Why the modem cannot talk to a network (SIM, radio), None if it can."""
        return self.sim_refusal() or (Status.RADIO_POWER_OFF if not self.radio_on else None)

    def attach_refusal(self) -> Status | None:
        """Why packet service cannot attach (SIM, radio, registration), None if it can."""
        return self.radio_refusal() or (
            Status.NOT_REGISTERED if self.registered_provider is None else None)

    def connect_refusal(self) -> Status | None:
        """Why a session cannot be activated for the modem's state, None if it can."""
        return self.attach_refusal() or (
            Status.PACKET_SERVICE_DETACHED if not self.attached else None)

    def provider_name(self, provider_id: str) -> str:
        for p in [self.config.home_provider, *self.config.visible_providers]:
            if p.id == provider_id:
                return p.name
        return ""

    # ------------------------------------------------------- reports, in their CIDs' shapes

    def ready_status_values(self) -> Values:
        ready = self.sim_ready
        return {
            "ReadyState": self.ready_state,
            "SubscriberId": self.config.imsi if ready else "",
            "SimIccId": self.config.iccid if self.config.sim_present else "",
            "ReadyInfo": 0,
            "TelephoneNumbers": list(self.config.own_numbers) if ready else [],
        }

    def radio_values(self) -> Values:
        return {"HwRadioState": RadioState.ON,
                "SwRadioState": RadioState.ON if self.radio_on else RadioState.OFF}

    def pin_values(self) -> Values:
        if self.puk_locked:
            return {"PinType": PinType.PUK1, "PinState": PinState.LOCKED,
                    "RemainingAttempts": self.puk_retries}
        if self.pin_locked:
            return {"PinType": PinType.PIN1, "PinState": PinState.LOCKED,
                    "RemainingAttempts": self.pin_retries}
        # Unlocked, a real modem still names the PIN it would ask for, so the host can show
        # its retries (docs/modemmanager.md §4).
        return {"PinType": PinType.PIN1, "PinState": PinState.UNLOCKED,
                "RemainingAttempts": self.pin_retries}

    def provider_values(self, provider_id: str, name: str, state: int) -> Values:
        """One MbimProvider as this modem sees it (registered or not, its signal)."""
        registered = self.registered_provider
        if provider_id == registered:
            state |= ProviderState.REGISTERED
        return {"ProviderId": provider_id, "ProviderState": state, "ProviderName": name,
                "CellularClass": CellularClass.GSM,
                "Rssi": self.rssi if registered else NOT_REGISTERED_SIGNAL,
                "ErrorRate": self.error_rate if registered else NOT_REGISTERED_SIGNAL}

    def register_values(self) -> Values:
        provider = self.registered_provider
        home = self.config.home_provider.id
        if provider is None:
            state = RegisterState.DEREGISTERED
        else:
            state = RegisterState.HOME if provider == home else RegisterState.ROAMING
        return {
            "NwError": 0, "RegisterState": state, "RegisterMode": self.register_mode,
            "AvailableDataClasses": self.config.data_class_mask if provider else 0,
            "CurrentCellularClass": CellularClass.GSM,
            "ProviderId": provider or "", "ProviderName": self.provider_name(provider or ""),
            "RoamingText": "", "RegistrationFlag": 0,
        }

    def packet_values(self) -> Values:
        if not self.attached:
            return {"NwError": 0, "PacketServiceState": PacketServiceState.DETACHED,
                    "HighestAvailableDataClass": 0, "UplinkSpeed": 0, "DownlinkSpeed": 0}
        mask = self.config.data_class_mask
        return {"NwError": 0, "PacketServiceState": PacketServiceState.ATTACHED,
                "HighestAvailableDataClass": 1 << (mask.bit_length() - 1) if mask else 0,
                "UplinkSpeed": self.config.uplink_speed,
                "DownlinkSpeed": self.config.downlink_speed}

    def signal_values(self) -> Values:
        registered = self.registered_provider is not None
        return {"Rssi": self.rssi if registered else NOT_REGISTERED_SIGNAL,
                "ErrorRate": self.error_rate if registered else NOT_REGISTERED_SIGNAL,
                "SignalStrengthInterval": self.signal_interval,
                "RssiThreshold": self.rssi_threshold,
                "ErrorRateThreshold": self.error_rate_threshold}

    def connect_values(self, session_id: int, nw_error: int = 0) -> Values:
        s = self.sessions.get(session_id)
        return {"SessionId": session_id,
                "ActivationState": ActivationState.ACTIVATED if s else ActivationState.DEACTIVATED,
                "VoiceCallState": VoiceCallState.NONE,
                "IpType": s.ip_type if s else IpType.DEFAULT,
                "ContextType": (ContextType.INTERNET if s else ContextType.NONE).value,
                "NwError": nw_error}

    def statistics(self) -> PacketStatistics:
        return self.statistics_source() if self.statistics_source is not None else self.stats

    # ---------------------------------------------------------------------------- changes

    def set_radio(self, on: bool) -> list[Indication]:
        """Switch the radio (software switch); turning it off deregisters and detaches."""
        if on == self.radio_on:
            return []
        out = self._network_change(lambda: setattr(self, "radio_on", on))
        out.append(_basic_connect(BasicConnect.RADIO_STATE, self.radio_values()))
        return out

    def pin_operation(self, pin_type: PinType, operation: PinOperation, pin: str,
                      new_pin: str) -> Change:
        """Enter, enable, disable or change the PIN, or enter the PUK (with a new PIN)."""
        refused = self.pin_refusal()
        if refused is not None:
            return Change(refused)
        before = self.ready_state
        status = Status.FAILURE
        out: list[Indication] = []

        def operate() -> None:
            # Unlocking registers the modem, blocking the SIM deregisters it: the ready-status
            # indication goes first, then what _network_change announces.
            nonlocal status
            status = self._pin_operation(pin_type, operation, pin, new_pin)
            if self.ready_state != before:
                out.append(_basic_connect(BasicConnect.SUBSCRIBER_READY_STATUS,
                                          self.ready_status_values()))
        out += self._network_change(operate)
        return Change(status, tuple(out))

    def register(self, action: RegisterAction, provider_id: str = "") -> Change:
        """Register automatically (on the home network) or manually on a visible one."""
        refused = self.radio_refusal()
        if refused is not None:
            return Change(refused)
        if action == RegisterAction.MANUAL:
            if provider_id not in {p.id for p in self.config.visible_providers}:
                return Change(Status.PROVIDER_NOT_VISIBLE)

            def manual() -> None:
                self.register_mode, self.manual_provider = RegisterMode.MANUAL, provider_id
            return Change(indications=tuple(self._network_change(manual)))
        return Change(indications=tuple(self._network_change(
            lambda: setattr(self, "register_mode", RegisterMode.AUTOMATIC))))

    def attach(self) -> Change:
        refused = self.attach_refusal()
        if refused is not None:
            return Change(refused)
        return Change(indications=tuple(self._network_change(
            lambda: setattr(self, "attached", True))))

    def detach(self) -> list[Indication]:
        """Detach packet service; every session goes down with it."""
        return self._network_change(lambda: setattr(self, "attached", False))

    def activate(self, session_id: int, apn: str, ip_type: IpType) -> Change:
        """Bring a session up with the IP type the network grants; up already is success."""
        if session_id in self.sessions:          # already up: report it, as real modems do
            return Change()
        refused = self.connect_refusal()
        if refused is not None:
            return Change(refused)
        if self.config.apns is not None and apn not in self.config.apns:
            return Change(Status.INVALID_ACCESS_STRING, nw_error=NW_MISSING_OR_UNKNOWN_APN)
        granted, nw_error = self._grant_ip_type(ip_type)
        if granted is None:
            return Change(Status.FAILURE, nw_error=nw_error)
        state = SessionState.build(session_id, apn, granted, self.config.session_ip(session_id))
        self.sessions[session_id] = state
        self._announce(session_id, state)
        return Change(indications=(self._connect_indication(session_id),))

    def deactivate(self, session_id: int) -> list[Indication]:
        """Take a session down; one that is not up stays so, quietly."""
        if session_id not in self.sessions:
            return []
        del self.sessions[session_id]
        self._announce(session_id, None)
        return [self._connect_indication(session_id, NW_REGULAR_DEACTIVATION)]

    def set_signal(self, rssi: int, error_rate: int | None = None) -> list[Indication]:
        """The radio conditions changed."""
        self.rssi = rssi
        if error_rate is not None:
            self.error_rate = error_rate
        return [_basic_connect(BasicConnect.SIGNAL_STATE, self.signal_values())]

    def set_signal_reporting(self, interval: int, rssi_threshold: int,
                             error_rate_threshold: int) -> None:
        self.signal_interval = interval
        self.rssi_threshold = rssi_threshold
        self.error_rate_threshold = error_rate_threshold

    def add_traffic(self, *, in_octets: int = 0, in_packets: int = 0, out_octets: int = 0,
                    out_packets: int = 0, in_discards: int = 0, out_discards: int = 0) -> None:
        """Count data-plane traffic for PACKET_STATISTICS ("in" = towards the host)."""
        s = self.stats
        s.in_octets += in_octets
        s.in_packets += in_packets
        s.out_octets += out_octets
        s.out_packets += out_packets
        s.in_discards += in_discards
        s.out_discards += out_discards

    # --------------------------------------------------------------------------- internals

    def _network_change(self, change: Callable[[], None]) -> list[Indication]:
        """Apply a change; what it did to registration, attach and sessions, as indications."""
        before = (self.registered_provider, self.attached)
        change()
        out: list[Indication] = []
        if self.registered_provider is None:
            self.attached = False
        elif before[0] is None and self.config.auto_attach:
            self.attached = True             # registered just now: attach as a real modem does
        if not self.attached:
            for sid in sorted(self.sessions):
                out += self.deactivate(sid)
        if self.registered_provider != before[0]:
            out.append(_basic_connect(BasicConnect.REGISTER_STATE, self.register_values()))
        if self.attached != before[1]:
            out.append(_basic_connect(BasicConnect.PACKET_SERVICE, self.packet_values()))
        return out

    def _pin_operation(self, pin_type: PinType, op: PinOperation, pin: str,
                       new_pin: str) -> Status:
        if pin_type == PinType.PUK1:
            if op != PinOperation.ENTER or not self.puk_locked:
                return Status.OPERATION_NOT_ALLOWED
            if not _valid_pin(new_pin):
                return Status.INVALID_PARAMETERS
            return self._enter_puk(pin, new_pin)
        if pin_type != PinType.PIN1:
            return Status.NO_DEVICE_SUPPORT
        if self.puk_locked:
            return Status.FAILURE            # only the PUK helps now; the reply says PUK1
        if op == PinOperation.CHANGE and not _valid_pin(new_pin):
            return Status.INVALID_PARAMETERS
        if op in (PinOperation.DISABLE, PinOperation.CHANGE) and not self.pin_enabled:
            return Status.PIN_DISABLED
        if not self._check_pin(pin):
            return Status.FAILURE
        if op == PinOperation.ENTER:
            self.pin_locked = False
        elif op == PinOperation.ENABLE:
            self.pin_enabled = True
        elif op == PinOperation.DISABLE:
            self.pin_enabled = False
        else:
            self.pin = new_pin
        return Status.NONE

    def _check_pin(self, pin: str) -> bool:
        if pin == self.pin:
            self.pin_retries = self.config.pin_retries
            return True
        self.pin_retries -= 1
        if self.pin_retries <= 0:
            self.pin_retries = 0
            self.puk_locked = True
        return False

    def _enter_puk(self, puk: str, new_pin: str) -> Status:
        if puk == self.config.puk:
            self.puk_locked = self.pin_locked = False
            self.pin = new_pin
            self.pin_retries = self.config.pin_retries
            self.puk_retries = self.config.puk_retries
            return Status.NONE
        self.puk_retries -= 1
        if self.puk_retries <= 0:
            self.puk_retries = 0
            self.sim_blocked = True
        return Status.FAILURE

    def _grant_ip_type(self, wanted: IpType) -> tuple[IpType | None, int]:
        """The IP type the network grants, with the fallbacks of 3GPP PDN types."""
        offered = set(self.config.network_ip_types)
        if wanted in (IpType.DEFAULT, IpType.IPV4V6, IpType.IPV4_AND_IPV6):
            for candidate, name in ((IpType.IPV4V6, "ipv4v6"), (IpType.IPV4, "ipv4"),
                                    (IpType.IPV6, "ipv6")):
                if name in offered:
                    return candidate, 0
            return None, NW_MISSING_OR_UNKNOWN_APN
        if wanted is IpType.IPV4:
            if "ipv4" in offered or "ipv4v6" in offered:
                return IpType.IPV4, 0
            return None, NW_IPV6_ONLY_ALLOWED
        if "ipv6" in offered or "ipv4v6" in offered:
            return IpType.IPV6, 0
        return None, NW_IPV4_ONLY_ALLOWED

    def _connect_indication(self, session_id: int, nw_error: int = 0) -> Indication:
        return _basic_connect(BasicConnect.CONNECT, self.connect_values(session_id, nw_error))

    def _announce(self, sid: int, state: SessionState | None) -> None:
        if self.session_listener is not None:
            try:
                self.session_listener(sid, state)
            except Exception:  # the listener's failure is not the host's problem
                log.exception("MBIM: session listener failed for session %d", sid)


def _valid_pin(pin: str) -> bool:
    return pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 8
