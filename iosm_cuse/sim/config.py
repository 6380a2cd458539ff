"""ModemConfig: what the simulated modem says about itself and which addresses it hands out.

Defaults describe a ready modem (SIM present, no PIN required, radio on, registered at home,
packet service attached by itself once registered, as real modems do) so that mbimcli and
mbim-network flows work out of the box. Load overrides from TOML or JSON::

    model = "XMM7560 (simulated)"
    pin_required = true            # start PIN-locked
    auto_attach = false            # attach only on the host's PACKET_SERVICE ATTACH
    apns = ["internet"]            # default: any APN is accepted
    rsrp = -87                     # LTE signal for ATDS SIGNAL (dBm; rsrq, snr in dB)
    [ussd_replies]                 # the network's answer per USSD code
    "*100#" = "Your balance is 42.00 EUR"
    [[stored_sms]]                 # in the SMS store at power-on
    from = "+4915550001"
    text = "Welcome"
    [[visible_providers]]
    id = "00102"
    name = "other"
    [[sessions]]                   # per-SessionId overrides, in order 0, 1, ...
    ipv4 = "10.99.0.2/24"

Addresses default to 10.99.N.2/24 (gateway and DNS 10.99.N.1) and fd99:N::2/64 (gateway and
DNS fd99:N::1) for session N.

Several modems on one machine (`iosm-cuse up` twice): instance K (wwanK) hands out the default
addresses of sessions 8K..8K+7 instead (10.99.8K+N.2/24 for its session N), so two modems'
links never claim the same subnet, and reports an IMEI of its own (`for_instance`). Addresses a
configuration file sets are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path
from typing import Any

from iosm_cuse.mbim.cids import DataClass

DATA_CLASS_NAMES = {
    "gprs": DataClass.GPRS, "edge": DataClass.EDGE, "umts": DataClass.UMTS,
    "hsdpa": DataClass.HSDPA, "hsupa": DataClass.HSUPA, "lte": DataClass.LTE,
    "5g-nsa": DataClass.NR5G_NSA, "5g-sa": DataClass.NR5G_SA,
}

# The LTE values ATDS SIGNAL can carry, in dBm/dB (their wire codes: docs/modemmanager.md §7)
LTE_SIGNAL_RANGES = {"rsrp": (-140, -43), "rsrq": (-19, -3), "snr": (-5, 30)}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


@dataclass(frozen=True)
class Provider:
    id: str
    name: str


@dataclass(frozen=True)
class SessionIp:
    """The IP configuration handed out for one SessionId."""

    ipv4: IPv4Interface
    ipv4_gateway: IPv4Address
    ipv4_dns: tuple[IPv4Address, ...]
    ipv6: IPv6Interface
    ipv6_gateway: IPv6Address
    ipv6_dns: tuple[IPv6Address, ...]
    mtu: int = 1500

    @classmethod
    def default(cls, n: int, mtu: int = 1500) -> SessionIp:
        gw4 = IPv4Address(f"10.99.{n}.1")
        gw6 = IPv6Address(f"fd99:{n:x}::1")
        return cls(IPv4Interface(f"10.99.{n}.2/24"), gw4, (gw4,),
                   IPv6Interface(f"fd99:{n:x}::2/64"), gw6, (gw6,), mtu)


def _default_sessions() -> list[SessionIp]:
    return [SessionIp.default(n) for n in range(8)]


@dataclass
class ModemConfig:
    # identity
    manufacturer: str = "Intel"
    model: str = "XMM7560 (simulated)"
    device_id: str = "356938035643809"          # IMEI (Luhn-valid)
    firmware: str = "iosm-sim 0.1.0"
    hardware: str = "XMM7560"
    # capabilities
    cellular_class: str = "gsm"
    data_classes: list[str] = field(
        default_factory=lambda: ["gprs", "edge", "umts", "hsdpa", "hsupa", "lte"])
    max_sessions: int = 8
    max_control_transfer: int = 4096            # the function's own wMaxControlMessage
    # SIM
    sim_present: bool = True
    iccid: str = "89991010000000000010"
    imsi: str = "001010000000001"
    own_numbers: list[str] = field(default_factory=lambda: ["+9990100001"])
    pin: str = "0000"
    pin_required: bool = False                  # True: starts DEVICE_LOCKED until PIN entry
    pin_retries: int = 3
    puk: str = "12345678"
    puk_retries: int = 10
    # radio and network
    radio_on: bool = True
    # An FCC-locked radio (laptops with 8086:7560 before their unlock tool runs): RADIO_STATE
    # set ON is answered with the software radio still OFF until `iosm-cuse modem fcc unlock`
    fcc_locked: bool = False
    home_provider: Provider = field(default_factory=lambda: Provider("00101", "iosm-sim"))
    visible_providers: list[Provider] = field(
        default_factory=lambda: [Provider("00101", "iosm-sim"), Provider("00102", "iosm-other")])
    register_automatic: bool = True
    # packet service attaches by itself once registered, as real modems do (a host's explicit
    # detach holds until it attaches again or the modem registers anew); False: only on request
    auto_attach: bool = True
    apns: list[str] | None = None               # None: any APN accepted
    # PDN types the network offers; a request for another falls back (v4v6 -> v4 -> v6)
    network_ip_types: list[str] = field(default_factory=lambda: ["ipv4", "ipv6", "ipv4v6"])
    uplink_speed: int = 1_000_000_000           # bit/s reported by PACKET_SERVICE
    downlink_speed: int = 1_000_000_000
    rssi: int = 20                              # 0..31, 99 unknown
    error_rate: int = 0                         # 0..7, 99 unknown
    # LTE signal (ATDS SIGNAL, what `mmcli --signal-get` shows); None: not reported
    rsrp: int | None = -95                      # dBm, -140..-43
    rsrq: int | None = -10                      # dB, -19..-3
    snr: int | None = 12                        # dB, -5..30
    # SMS: the store's size, the SMSC, messages stored at power-on ([{from, text}, ...])
    sms_max_messages: int = 30
    smsc: str = "+9990000000"
    stored_sms: list[dict[str, str]] = field(default_factory=list)
    # USSD: the network's answer per code; others get ussd_default_reply ({code}: the code)
    ussd_replies: dict[str, str] = field(
        default_factory=lambda: {"*100#": "Your balance is 42.00 EUR"})
    ussd_default_reply: str = "iosm-sim: no service for {code}"
    # data sessions
    mtu: int = 1500
    sessions: list[SessionIp] = field(default_factory=_default_sessions)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def data_class_mask(self) -> int:
        mask = 0
        for name in self.data_classes:
            mask |= DATA_CLASS_NAMES[name].value   # plain ints: IntFlag arithmetic is slow
        return mask

    def session_ip(self, session_id: int) -> SessionIp:
        ip = self.sessions[session_id]
        return dataclasses.replace(ip, mtu=self.mtu) if ip.mtu != self.mtu else ip

    def for_instance(self, instance: int) -> ModemConfig:
        """This configuration as modem `instance` (wwanK) of several on one machine: default
        session addresses moved to 10.99.(8K+N), the default IMEI's serial part moved by K.
        Instance 0 is the configuration unchanged; 32 subnets of 8 fill 10.99.0-255, so
        instance 32 (only by --port-name) shares instance 0's addresses."""
        if instance <= 0:
            return self
        block = instance % 32
        sessions = [SessionIp.default(8 * block + n, ip.mtu)
                    if ip == SessionIp.default(n, ip.mtu) else ip
                    for n, ip in enumerate(self.sessions)]
        device_id = self.device_id
        if device_id == ModemConfig.device_id and device_id.isdigit():
            body = f"{int(device_id[:14]) + instance:014d}"
            device_id = body + str(luhn_digit(body))
        return dataclasses.replace(self, sessions=sessions, device_id=device_id)

    def validate(self) -> None:
        unknown = set(self.data_classes) - DATA_CLASS_NAMES.keys()
        if unknown:
            raise ConfigError(f"unknown data classes {sorted(unknown)}; "
                              f"known: {sorted(DATA_CLASS_NAMES)}")
        if self.cellular_class != "gsm":
            raise ConfigError("cellular_class: only 'gsm' is modelled")
        if not 1 <= self.max_sessions <= 8:
            raise ConfigError("max_sessions must be 1..8 (IOSM IP MUX sessions)")
        if len(self.sessions) < self.max_sessions:
            raise ConfigError(f"{len(self.sessions)} session IP configurations for "
                              f"{self.max_sessions} sessions")
        if not 64 <= self.max_control_transfer <= 4096:
            raise ConfigError("max_control_transfer must be 64..4096")
        if not (self.pin.isdigit() and 4 <= len(self.pin) <= 8):
            raise ConfigError("pin must be 4..8 digits")
        if not (self.puk.isdigit() and len(self.puk) == 8):
            raise ConfigError("puk must be 8 digits")
        if self.pin_retries < 1 or self.puk_retries < 1:
            raise ConfigError("pin_retries and puk_retries must be at least 1")
        if not (0 <= self.rssi <= 31 or self.rssi == 99):
            raise ConfigError("rssi must be 0..31 or 99")
        if not (0 <= self.error_rate <= 7 or self.error_rate == 99):
            raise ConfigError("error_rate must be 0..7 or 99")
        for name, (lo, hi) in LTE_SIGNAL_RANGES.items():
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and lo <= v <= hi):
                raise ConfigError(f"{name} must be {lo}..{hi}")
        if not 1 <= self.sms_max_messages <= 255:
            raise ConfigError("sms_max_messages must be 1..255")
        if len(self.stored_sms) > self.sms_max_messages or not all(
                isinstance(m, dict) and set(m) == {"from", "text"}
                and all(isinstance(v, str) for v in m.values()) for m in self.stored_sms):
            raise ConfigError("stored_sms: at most sms_max_messages tables of from and text")
        if not all(isinstance(k, str) and isinstance(v, str)
                   for k, v in self.ussd_replies.items()):
            raise ConfigError("ussd_replies: a table of strings")
        # (imported here: the sim.mbim package imports this module)
        from iosm_cuse.sim.mbim.sms_pdu import encode_deliver, encode_ussd
        for reply in [*self.ussd_replies.values(), self.ussd_default_reply]:
            try:
                encode_ussd(reply)
            except ValueError as e:
                raise ConfigError(f"ussd_replies: {e}") from None
        for m in self.stored_sms:
            try:
                encode_deliver(m["from"], m["text"], datetime.now(UTC))
            except ValueError as e:
                raise ConfigError(f"stored_sms: {e}") from None
        if not self.network_ip_types or set(self.network_ip_types) - {"ipv4", "ipv6", "ipv4v6"}:
            raise ConfigError("network_ip_types: a non-empty list of ipv4, ipv6, ipv4v6")
        if self.apns is not None and not all(isinstance(a, str) for a in self.apns):
            raise ConfigError("apns must be a list of strings")
        if not 576 <= self.mtu <= 2032:
            raise ConfigError("mtu must be 576..2032 (MUX Lite carries at most 2032)")

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path) -> ModemConfig:
        """Read a ``.toml`` or ``.json`` file."""
        p = Path(path)
        try:
            if p.suffix == ".toml":
                data = tomllib.loads(p.read_text())
            elif p.suffix == ".json":
                data = json.loads(p.read_text())
            else:
                raise ConfigError(f"{p}: use a .toml or .json file")
        except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a table/object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModemConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown configuration keys {sorted(unknown)}")
        kwargs = dict(data)
        try:
            if "home_provider" in kwargs:
                kwargs["home_provider"] = Provider(**kwargs["home_provider"])
            if "visible_providers" in kwargs:
                kwargs["visible_providers"] = [Provider(**p) for p in kwargs["visible_providers"]]
            if "sessions" in kwargs:
                kwargs["sessions"] = _sessions(kwargs["sessions"], kwargs.get("mtu", 1500))
            config = cls(**kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"bad configuration: {e}") from e
        _check_types(config)
        return config


def luhn_digit(body: str) -> int:
    """The Luhn check digit that completes `body` (an IMEI's first 14 digits)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10


def _sessions(items: list[dict[str, Any]], mtu: int) -> list[SessionIp]:
    """Per-session overrides on top of the defaults; missing sessions keep theirs."""
    out = _default_sessions()
    for n, item in enumerate(items):
        if n >= len(out):
            raise ConfigError(f"sessions: more than {len(out)} entries")
        base = SessionIp.default(n, mtu)
        out[n] = dataclasses.replace(
            base,
            ipv4=IPv4Interface(item.get("ipv4", base.ipv4)),
            ipv4_gateway=IPv4Address(item.get("ipv4_gateway", base.ipv4_gateway)),
            ipv4_dns=tuple(IPv4Address(a) for a in item.get("ipv4_dns", base.ipv4_dns)),
            ipv6=IPv6Interface(item.get("ipv6", base.ipv6)),
            ipv6_gateway=IPv6Address(item.get("ipv6_gateway", base.ipv6_gateway)),
            ipv6_dns=tuple(IPv6Address(a) for a in item.get("ipv6_dns", base.ipv6_dns)),
            mtu=int(item.get("mtu", mtu)),
        )
    return out


def _check_types(config: ModemConfig) -> None:
    """Reject values of the wrong type that a file could carry (a string for a number...)."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        default = ModemConfig.__dataclass_fields__[f.name]
        sample: Any = (default.default_factory()
                       if default.default_factory is not dataclasses.MISSING else default.default)
        if sample is None or v is None:
            continue
        if isinstance(sample, bool) != isinstance(v, bool) or not isinstance(v, type(sample)):
            raise ConfigError(f"{f.name}: expected {type(sample).__name__}, got {v!r}")
        if isinstance(v, list) and sample and not all(isinstance(x, type(sample[0])) for x in v):
            raise ConfigError(f"{f.name}: expected a list of {type(sample[0]).__name__}")
