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
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any

from iosm_cuse.mbim import cids
from iosm_cuse.mbim.cids import (
    ActivationState,
    AuthProtocol,
    BasicConnect,
    CellularClass,
    Compression,
    ContextSource,
    IpType,
    LteAttachRoaming,
    LteAttachState,
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
    Sms,
    SmsFlag,
    Ussd,
    UssdAction,
    UssdResponse,
    UssdSessionState,
    VoiceCallState,
)
from iosm_cuse.mbim.constants import Status
from iosm_cuse.mbim.infobuf import encode
from iosm_cuse.mbim.uuids import ContextType, Service
from iosm_cuse.sim.config import LTE_SIGNAL_RANGES, ModemConfig, Provider, SessionIp
from iosm_cuse.sim.control import Network, SimCard
from iosm_cuse.sim.mbim.sms import SmsError, SmsStore
from iosm_cuse.sim.mbim.sms_pdu import PduError, decode_ussd, encode_ussd

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
# 3GPP TS 24.008 reject cause #11, "PLMN not allowed": the NwError of a
# REGISTER_STATE reporting the network's refusal when the control names no other cause
NW_PLMN_NOT_ALLOWED = 11
# The network a `register roaming` without --operator roams on when the configuration lists
# no visible network besides home
DEFAULT_ROAMING_PROVIDER = Provider("00102", "iosm-roaming")
ATDS_UNKNOWN = 0xFF                # an ATDS SIGNAL value the modem does not report
THRESHOLD_OFF = 0xFFFFFFFF         # SIGNAL_STATE set: no reports for this threshold
CONTEXT_ID_APPEND = 0xFFFFFFFF     # PROVISIONED_CONTEXTS set: a new context
MAX_PROVISIONED_CONTEXTS = 16


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

    def __init__(self, config: ModemConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time) -> None:
        self.config = c = config if config is not None else ModemConfig()
        # clock: seconds, for the SIGNAL_STATE interval; wallclock: epoch seconds, for SMS
        # timestamps. Injected, so the state stays sans-IO and tests run on their own time.
        self.clock = clock
        self.wallclock = wallclock
        # Told of every session that comes up (its SessionState) or goes down (None).
        self.session_listener: SessionListener | None = None
        # Where PACKET_STATISTICS reads its counters (e.g. the packet gateway's); when None,
        # the counters fed through add_traffic().
        self.statistics_source: Callable[[], PacketStatistics] | None = None
        # The host's software radio switch; an FCC-locked modem keeps it OFF until unlocked.
        self.fcc_locked = c.fcc_locked
        self.radio_on = c.radio_on and not c.fcc_locked
        self.hw_radio_on = True            # the hardware (rfkill) switch, live control only
        self.sim_present = c.sim_present
        # What the network does, as live control sets it (sim/control.py): the network the
        # modem registers on automatically, or why it cannot.
        self.network = Network.HOME
        self.network_provider = c.home_provider
        self.reject_cause = 0              # NwError of a DENIED registration
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
        self.rsrp, self.rsrq, self.snr = c.rsrp, c.rsrq, c.snr
        self.signal_interval = 0
        self.rssi_threshold = 0
        self.error_rate_threshold = 0
        # What the last SIGNAL_STATE indication said, when it went, and whether one waits
        # for the interval to pass (next_timer()).
        self._signal_reported: tuple[int, int] = (self.rssi, self.error_rate)
        self._signal_sent_at: float | None = None
        self._signal_waiting = False
        self.sessions: dict[int, SessionState] = {}
        self.stats = PacketStatistics()
        self.sms = SmsStore(c.sms_max_messages, c.smsc, wallclock)
        for stored in c.stored_sms:
            self.sms.deliver(stored["from"], stored["text"])
        self.provisioned_contexts: list[Values] = [_context(1, _default_apn(c))]
        self.lte_attach_configurations: list[Values] = _default_lte_attach()
        self.reboots = 0

    # ------------------------------------------------------------------- derived state

    @property
    def ready_state(self) -> ReadyState:
        if not self.sim_present:
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
    def radio_active(self) -> bool:
        """Both radio switches on: the modem can hear a network."""
        return self.radio_on and self.hw_radio_on

    @property
    def registered_provider(self) -> str | None:
        """MCCMNC of the network the modem is registered on, None when not registered."""
        if not (self.radio_active and self.sim_ready):
            return None
        if self.network not in (Network.HOME, Network.ROAMING):
            return None
        if self.register_mode is RegisterMode.AUTOMATIC:
            return self.network_provider.id
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
        if not self.sim_present:
            return Status.SIM_NOT_INSERTED
        if self.sim_blocked:
            return Status.BAD_SIM
        return None

    def radio_refusal(self) -> Status | None:
        """Why the modem cannot talk to a network (SIM, radio), None if it can."""
        return self.sim_refusal() or (Status.RADIO_POWER_OFF if not self.radio_active else None)

    def attach_refusal(self) -> Status | None:
        """Why packet service cannot attach (SIM, radio, registration), None if it can."""
        return self.radio_refusal() or (
            Status.NOT_REGISTERED if self.registered_provider is None else None)

    def connect_refusal(self) -> Status | None:
        """Why a session cannot be activated for the modem's state, None if it can."""
        return self.attach_refusal() or (
            Status.PACKET_SERVICE_DETACHED if not self.attached else None)

    def provider_name(self, provider_id: str) -> str:
        for p in [self.network_provider, self.config.home_provider,
                  *self.config.visible_providers]:
            if p.id == provider_id:
                return p.name
        return ""

    # ------------------------------------------------------- reports, in their CIDs' shapes

    def ready_status_values(self) -> Values:
        ready = self.sim_ready
        return {
            "ReadyState": self.ready_state,
            "SubscriberId": self.config.imsi if ready else "",
            "SimIccId": self.config.iccid if self.sim_present else "",
            "ReadyInfo": 0,
            "TelephoneNumbers": list(self.config.own_numbers) if ready else [],
        }

    def radio_values(self) -> Values:
        return {"HwRadioState": RadioState.ON if self.hw_radio_on else RadioState.OFF,
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
        nw_error = 0
        if provider is not None:
            home = self.network is Network.HOME and provider == self.network_provider.id
            state = RegisterState.HOME if home else RegisterState.ROAMING
        elif not (self.radio_active and self.sim_ready):
            state = RegisterState.DEREGISTERED
        elif self.network is Network.SEARCHING:
            state = RegisterState.SEARCHING
        elif self.network is Network.DENIED:
            state, nw_error = RegisterState.DENIED, self.reject_cause
        else:  # the network is off, or manual registration named no network yet
            state = RegisterState.DEREGISTERED
        return {
            "NwError": nw_error, "RegisterState": state, "RegisterMode": self.register_mode,
            # A network being searched or refusing still has its radio technologies: ModemManager
            # applies the state only to the domains these name (docs/control.md §2)
            "AvailableDataClasses": self.config.data_class_mask
            if provider or state in (RegisterState.SEARCHING, RegisterState.DENIED) else 0,
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
        """Switch the radio (software switch); turning it off deregisters and detaches. An
        FCC-locked modem leaves it OFF: the host's RADIO_STATE set ON is answered OFF."""
        if on and self.fcc_locked:
            return []
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

    def deactivate(self, session_id: int, cause: int = NW_REGULAR_DEACTIVATION
                   ) -> list[Indication]:
        """Take a session down (the host's request, or the network's with its 3GPP session
        management `cause`); one that is not up stays so, quietly."""
        if session_id not in self.sessions:
            return []
        del self.sessions[session_id]
        self._announce(session_id, None)
        return [self._connect_indication(session_id, cause)]

    def set_signal(self, rssi: int, error_rate: int | None = None, *, rsrp: int | None = None,
                   rsrq: int | None = None, snr: int | None = None) -> list[Indication]:
        """The radio conditions changed: rssi 0..31 (99 unknown), error_rate 0..7 (99), and
        the LTE rsrp (dBm), rsrq and snr (dB) that ATDS SIGNAL reports; ValueError for a value
        out of range, nothing changed. SIGNAL_STATE is indicated as the host asked with
        SIGNAL_STATE set: when RSSI (or the error rate) moved by its threshold, at most once
        per interval; one held back by the interval comes from handle_timer()."""
        if not (0 <= rssi <= 31 or rssi == NOT_REGISTERED_SIGNAL):
            raise ValueError("rssi must be 0..31 or 99")
        if error_rate is not None and not (0 <= error_rate <= 7
                                           or error_rate == NOT_REGISTERED_SIGNAL):
            raise ValueError("error_rate must be 0..7 or 99")
        lte = {"rsrp": rsrp, "rsrq": rsrq, "snr": snr}
        for name, value in lte.items():
            lo, hi = LTE_SIGNAL_RANGES[name]
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"{name} must be {lo}..{hi}")
        self.rssi = rssi
        if error_rate is not None:
            self.error_rate = error_rate
        for name, value in lte.items():
            if value is not None:
                setattr(self, name, value)
        if not self._signal_moved():
            return []
        now = self.clock()
        if (self.signal_interval and self._signal_sent_at is not None
                and now < self._signal_sent_at + self.signal_interval):
            self._signal_waiting = True
            return []
        return self._signal_indication(now)

    # ------------------------------------------- what the network does (live control)

    def set_network(self, network: Network, provider: Provider | None = None,
                    cause: int | None = None) -> list[Indication]:
        """The network changed: home or roaming on `provider` (default: the home network, or
        the first visible other one), searching, denied (with 3GPP reject `cause`) or gone."""
        if provider is None:
            provider = self.roaming_provider() if network is Network.ROAMING \
                else self.config.home_provider

        def change() -> None:
            self.network, self.network_provider = network, provider
            self.reject_cause = (NW_PLMN_NOT_ALLOWED if cause is None else cause) \
                if network is Network.DENIED else 0
        return self._network_change(change)

    def roaming_provider(self) -> Provider:
        home = self.config.home_provider.id
        others = [p for p in self.config.visible_providers if p.id != home]
        return others[0] if others else DEFAULT_ROAMING_PROVIDER

    def set_sim(self, card: SimCard) -> list[Indication]:
        """The SIM was inserted ready, removed, or (re)inserted asking for its PIN or PUK."""
        before = self.ready_values_snapshot()

        def change() -> None:
            c = self.config
            self.sim_present = card is not SimCard.ABSENT
            self.sim_blocked = False
            self.puk_locked = card is SimCard.PUK
            self.pin_locked = card in (SimCard.PIN, SimCard.PUK)
            if card is SimCard.PIN:
                self.pin_enabled = True
            self.pin_retries = 0 if card is SimCard.PUK else c.pin_retries
            self.puk_retries = c.puk_retries
        out = self._network_change(change)
        if self.ready_values_snapshot() != before:
            out.insert(0, _basic_connect(BasicConnect.SUBSCRIBER_READY_STATUS,
                                         self.ready_status_values()))
        return out

    def ready_values_snapshot(self) -> tuple[object, ...]:
        return (self.ready_state, self.pin_locked, self.puk_locked, self.sim_present)

    def sim_card(self) -> str:
        """The SIM as `modem sim` names it (or "blocked", which it cannot set)."""
        if not self.sim_present:
            return SimCard.ABSENT.value
        if self.sim_blocked:
            return "blocked"
        if self.puk_locked:
            return SimCard.PUK.value
        return SimCard.PIN.value if self.pin_locked else SimCard.READY.value

    def set_hw_radio(self, on: bool) -> list[Indication]:
        """The hardware radio switch; off deregisters and detaches as the software one does."""
        if on == self.hw_radio_on:
            return []
        out = self._network_change(lambda: setattr(self, "hw_radio_on", on))
        out.append(_basic_connect(BasicConnect.RADIO_STATE, self.radio_values()))
        return out

    def set_fcc_lock(self, locked: bool) -> list[Indication]:
        """Lock: the software radio goes OFF and stays so; unlock: a host may turn it on
        again (it does not come on by itself)."""
        self.fcc_locked = locked
        return self.set_radio(False) if locked else []

    def set_signal_reporting(self, interval: int, rssi_threshold: int,
                             error_rate_threshold: int) -> None:
        """SIGNAL_STATE set: seconds between reports (0: no limit), and the RSSI and error
        rate change that makes one (0: any change; 0xFFFFFFFF: never)."""
        self.signal_interval = interval
        self.rssi_threshold = rssi_threshold
        self.error_rate_threshold = error_rate_threshold

    def next_timer(self) -> float | None:
        """Clock time at which handle_timer() has a held-back indication to send."""
        if not self._signal_waiting or self._signal_sent_at is None:
            return None
        return self._signal_sent_at + self.signal_interval

    def handle_timer(self, now: float) -> list[Indication]:
        due = self.next_timer()
        if due is None or now < due:
            return []
        self._signal_waiting = False
        return self._signal_indication(now) if self._signal_moved() else []

    def _signal_moved(self) -> bool:
        def moved(now: int, before: int, threshold: int) -> bool:
            if now == before or threshold == THRESHOLD_OFF:
                return False
            return abs(now - before) >= max(threshold, 1)
        rssi, error_rate = self._signal_reported
        return (moved(self.rssi, rssi, self.rssi_threshold)
                or moved(self.error_rate, error_rate, self.error_rate_threshold))

    def _signal_indication(self, now: float) -> list[Indication]:
        self._signal_reported = (self.rssi, self.error_rate)
        self._signal_sent_at = now
        return [_basic_connect(BasicConnect.SIGNAL_STATE, self.signal_values())]

    def atds_signal_values(self) -> Values:
        """ATDS SIGNAL: RSSI and BER as in SIGNAL_STATE, RSRP as dBm + 140, RSRQ as
        2 x dB + 39, SNR as dB + 5; UMTS values not reported."""
        registered = self.registered_provider is not None

        def code(value: int | None, scale: int, offset: int) -> int:
            return ATDS_UNKNOWN if value is None or not registered else scale * value + offset
        return {"Rssi": self.rssi if registered else NOT_REGISTERED_SIGNAL,
                "ErrorRate": self.error_rate if registered else NOT_REGISTERED_SIGNAL,
                "Rscp": ATDS_UNKNOWN, "Ecno": ATDS_UNKNOWN,
                "Rsrq": code(self.rsrq, 2, 39), "Rsrp": code(self.rsrp, 1, 140),
                "Rssnr": code(self.snr, 1, 5)}

    # ------------------------------------------------------------------------- SMS, USSD

    def deliver_sms(self, sender: str, text: str) -> list[Indication]:
        """An SMS from ``sender`` arrives: stored, then SMS READ (the message) and
        MESSAGE_STORE_STATUS (NEW_MESSAGE, its index) indicated. ValueError for a sender that
        is not a phone number or a text longer than one SMS; a full store indicates
        MESSAGE_STORE_FULL and keeps nothing."""
        try:
            msg = self.sms.deliver(sender, text)
        except SmsError:
            return [Indication(Service.SMS, Sms.MESSAGE_STORE_STATUS,
                               self.sms.store_status_values())]
        return [Indication(Service.SMS, Sms.READ, self.sms.read_values([msg])),
                Indication(Service.SMS, Sms.MESSAGE_STORE_STATUS,
                           self.sms.store_status_values(msg.index))]

    def sms_outbox(self) -> list[dict[str, Any]]:
        """What clients sent, oldest first: index, to, text, time (epoch s), reference, smsc."""
        return [dict(m) for m in self.sms.outbox]

    def sms_read(self, flag: SmsFlag, index: int) -> Change | Values:
        try:
            return self.sms.read_values(self.sms.read(flag, index))
        except SmsError:
            return Change(Status.INVALID_PARAMETERS)

    def ussd_request(self, action: UssdAction, dcs: int, payload: bytes) -> Change | Values:
        """USSD set: the network's deterministic answer to a code (config ussd_replies), the
        session ended with it; CANCEL ends a session."""
        if action is UssdAction.CANCEL:
            return self._ussd_values(UssdResponse.TERMINATED_BY_NETWORK, "")
        refused = self.attach_refusal()
        if refused is not None:
            return Change(refused)
        try:
            code = decode_ussd(dcs, payload)
        except PduError:
            return Change(Status.INVALID_PARAMETERS)
        reply = self.config.ussd_replies.get(code)
        if reply is None:
            reply = self.config.ussd_default_reply.replace("{code}", code)
        try:
            return self._ussd_values(UssdResponse.NO_ACTION_REQUIRED, reply,
                                     existing=action is UssdAction.CONTINUE)
        except ValueError:     # the default reply with a long code in it: more than 160 octets
            return Change(Status.FAILURE)

    def ussd_notify(self, text: str) -> list[Indication]:
        """A network-initiated USSD message (no answer expected); ValueError beyond 160
        octets."""
        return [Indication(Service.USSD, Ussd.USSD,
                           self._ussd_values(UssdResponse.NO_ACTION_REQUIRED, text))]

    @staticmethod
    def _ussd_values(response: UssdResponse, text: str, existing: bool = False) -> Values:
        dcs, payload = encode_ussd(text) if text else (0x0F, b"")
        return {"Response": response,
                "SessionState": (UssdSessionState.EXISTING_SESSION if existing
                                 else UssdSessionState.NEW_SESSION),
                "DataCodingScheme": dcs, "Payload": payload}

    # ---------------------------------------------------------- contexts and LTE attach

    def provision_context(self, request: Values) -> Change:
        """PROVISIONED_CONTEXTS set: add (ContextId 0xFFFFFFFF), replace, or delete (context
        type NONE) a context; the indication carries the whole list."""
        cid = request["ContextId"]
        contexts = [c for c in self.provisioned_contexts if c["ContextId"] != cid]
        if request["ContextType"] != ContextType.NONE.value:
            if cid == CONTEXT_ID_APPEND:
                cid = max([c["ContextId"] for c in self.provisioned_contexts], default=0) + 1
            if len(contexts) >= MAX_PROVISIONED_CONTEXTS:
                return Change(Status.FAILURE)
            contexts.append(_context(cid, request["AccessString"], request["ContextType"],
                                     request["UserName"], request["Password"],
                                     request["Compression"], request["AuthProtocol"]))
        elif len(contexts) == len(self.provisioned_contexts):
            return Change(Status.INVALID_PARAMETERS)        # nothing to delete there
        self.provisioned_contexts = sorted(contexts, key=lambda c: int(c["ContextId"]))
        return Change(indications=(_basic_connect(BasicConnect.PROVISIONED_CONTEXTS,
                                                  self.provisioned_contexts_values()),))

    def provisioned_contexts_values(self) -> Values:
        return {"ProvisionedContexts": [dict(c) for c in self.provisioned_contexts]}

    def lte_attach_info_values(self) -> Values:
        attached = self.attached and bool(self.config.data_class_mask & (1 << 5))
        home = self.lte_attach_configurations[0]
        return {"LteAttachState": LteAttachState.ATTACHED if attached else LteAttachState.DETACHED,
                "IpType": home["IpType"] if attached else IpType.DEFAULT,
                "AccessString": home["AccessString"] if attached else "",
                "UserName": "", "Password": "", "Compression": Compression.NONE,
                "AuthProtocol": AuthProtocol.NONE}

    def reboot(self) -> None:
        """MODEM_REBOOT: back to how the modem powers on (sessions down, detached, radio and
        PIN lock as configured, no signal reporting asked); the SMS store and outbox stay,
        as a SIM's and the instrument's would."""
        self.reboots += 1
        for sid in sorted(self.sessions):
            self.deactivate(sid)
        c = self.config
        self.attached = False
        self.radio_on = c.radio_on
        self.pin_locked = self.pin_enabled
        self.register_mode = RegisterMode.AUTOMATIC if c.register_automatic else RegisterMode.MANUAL
        self.manual_provider = None
        self.set_signal_reporting(0, 0, 0)
        self._signal_waiting = False
        self._signal_sent_at = None

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
        before = (self.register_values(), self.attached)
        was_registered = self.registered_provider is not None
        change()
        out: list[Indication] = []
        if self.registered_provider is None:
            self.attached = False
        elif not was_registered and self.config.auto_attach:
            self.attached = True             # registered just now: attach as a real modem does
        if not self.attached:
            for sid in sorted(self.sessions):
                out += self.deactivate(sid)
        if self.register_values() != before[0]:
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


def _default_apn(c: ModemConfig) -> str:
    return c.apns[0] if c.apns else "internet"


def _context(cid: int, apn: str, context_type: Any = None, user: str = "", password: str = "",
             compression: Compression = Compression.NONE,
             auth: AuthProtocol = AuthProtocol.NONE) -> Values:
    return {"ContextId": cid,
            "ContextType": context_type if context_type is not None else ContextType.INTERNET.value,
            "AccessString": apn, "UserName": user, "Password": password,
            "Compression": compression, "AuthProtocol": auth}


def _default_lte_attach() -> list[Values]:
    """The initial EPS bearer settings a modem ships with: one per roaming case, any APN."""
    return [{"IpType": IpType.IPV4V6, "Roaming": roaming, "Source": ContextSource.MODEM,
             "AccessString": "", "UserName": "", "Password": "",
             "Compression": Compression.NONE, "AuthProtocol": AuthProtocol.NONE}
            for roaming in (LteAttachRoaming.HOME, LteAttachRoaming.PARTNER,
                            LteAttachRoaming.NON_PARTNER)]
