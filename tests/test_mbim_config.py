"""ModemConfig: defaults, TOML/JSON loading, validation."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface, ip_network
from pathlib import Path

import pytest

from iosm_cuse.mbim.cids import DataClass
from iosm_cuse.sim.config import ConfigError, ModemConfig, Provider


def test_defaults_describe_a_ready_modem_in_test_ranges() -> None:
    c = ModemConfig()
    assert (c.manufacturer, c.model) == ("Intel", "XMM7560 (simulated)")
    assert c.sim_present and not c.pin_required and c.radio_on and c.apns is None
    assert c.pin == "0000" and c.pin_retries == 3 and c.max_sessions == 8
    assert c.home_provider == Provider("00101", "iosm-sim")
    assert c.data_class_mask & DataClass.LTE
    v4, v6 = ip_network("10.99.0.0/16"), ip_network("fd99::/16")
    for n in range(8):
        ip = c.session_ip(n)
        assert ip.ipv4 == IPv4Interface(f"10.99.{n}.2/24")
        assert ip.ipv4_gateway == IPv4Address(f"10.99.{n}.1")
        assert ip.ipv6 == IPv6Interface(f"fd99:{n}::2/64")
        assert ip.ipv4.ip in v4 and ip.ipv4_gateway in v4 and all(d in v4 for d in ip.ipv4_dns)
        assert ip.ipv6.ip in v6 and ip.ipv6_gateway in v6 and all(d in v6 for d in ip.ipv6_dns)
        assert ip.mtu == 1500
    assert len({c.session_ip(n).ipv4.network for n in range(8)}) == 8


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "modem.toml"
    path.write_text('''
model = "XMM7560 test"
pin_required = true
pin = "4321"
apns = ["internet", "ims"]
mtu = 1400
home_provider = { id = "00102", name = "home2" }
[[visible_providers]]
id = "00102"
name = "home2"
[[sessions]]
ipv4 = "10.99.100.2/24"
ipv4_gateway = "10.99.100.1"
''')
    c = ModemConfig.load(path)
    assert c.model == "XMM7560 test" and c.pin_required and c.pin == "4321"
    assert c.apns == ["internet", "ims"] and c.home_provider.name == "home2"
    assert c.visible_providers == [Provider("00102", "home2")]
    assert c.session_ip(0).ipv4 == IPv4Interface("10.99.100.2/24")
    assert c.session_ip(0).mtu == 1400 and c.session_ip(1).mtu == 1400
    assert c.session_ip(1).ipv4 == IPv4Interface("10.99.1.2/24")


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "modem.json"
    path.write_text(json.dumps({"imsi": "001019876543210", "rssi": 31,
                                "data_classes": ["lte", "5g-nsa"]}))
    c = ModemConfig.load(path)
    assert c.imsi == "001019876543210" and c.rssi == 31
    assert c.data_class_mask == DataClass.LTE | DataClass.NR5G_NSA


@pytest.mark.parametrize("data, message", [
    ({"colour": "blue"}, "unknown configuration keys"),
    ({"pin": "12"}, "pin must be"),
    ({"rssi": 40}, "rssi"),
    ({"rssi": "x"}, "bad configuration"),
    ({"max_sessions": 9}, "max_sessions"),
    ({"data_classes": ["lte", "warp"]}, "unknown data classes"),
    ({"radio_on": "yes"}, "radio_on"),
    ({"own_numbers": [1]}, "own_numbers"),
    ({"apns": [1]}, "apns"),
    ({"network_ip_types": ["ipx"]}, "network_ip_types"),
    ({"mtu": 9000}, "mtu"),
    ({"sessions": [{"ipv4": "not an address"}]}, "bad configuration"),
    ({"max_control_transfer": 8192}, "max_control_transfer"),
])
def test_bad_values_are_rejected(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModemConfig.from_dict(data)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"toml or \.json"):
        ModemConfig.load(tmp_path / "modem.yaml")
    broken = tmp_path / "broken.toml"
    broken.write_text("pin = ")
    with pytest.raises(ConfigError):
        ModemConfig.load(broken)
    with pytest.raises(ConfigError):
        ModemConfig.load(tmp_path / "missing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level"):
        ModemConfig.load(listed)
