"""Tier 2: several modems on one machine. Each `iosm-cuse up --device sim --transport pty`
started in one namespace with one run directory is a modem of its own (wwanN, its port, links,
control socket and model process): each answers mbimcli on its own port and carries pings on
its own wwanN, controlling one leaves the others alone, and `up`s started at once never share
an instance."""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from daemon_up import StartUp, Up, ip
from helpers import until

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for TUN and netns")]


def device_id(up: Up) -> str:
    caps = up.mbimcli("--query-device-caps")
    assert caps.returncode == 0, caps.stderr
    m = re.search(r"Device ID: '(\d+)'", caps.stdout)
    assert m, caps.stdout
    return m.group(1)


def ping(up: Up, session: int, gw: str, count: int = 3) -> int:
    """Replies to `count` pings through this modem's link of `session`."""
    res = up.run("ping", "-4", "-n", "-q", "-c", str(count), "-i", "0.1", "-W", "2",
                 "-I", up.link(session), gw)
    m = re.search(r"(\d+) received", res.stdout)
    assert m, res.stdout + res.stderr
    return int(m.group(1))


def link_counters(up: Up, name: str) -> dict[str, int]:
    counters: dict[str, int] = next(ln for ln in up.status()["links"]
                                    if ln["name"] == name)["counters"]
    return counters


def check_modem(up: Up, instance: str) -> tuple[str, str]:
    """It is modem `instance`, answers mbimcli on its own port and pings over its own link;
    returns (its IMEI, its session 0 gateway)."""
    assert up.instance == instance
    assert up.port == str(up.run_dir / f"{instance}mbim0")
    imei = device_id(up)
    gw = up.connect(0)
    before = link_counters(up, instance)
    assert ping(up, 0, gw) == 3
    after = link_counters(up, instance)
    assert after["rx_packets"] >= before["rx_packets"] + 3
    return imei, gw


def test_two_modems_each_on_their_own_port_link_and_model(start_up: StartUp) -> None:
    a, b = start_up(), start_up()
    imei_a, gw_a = check_modem(a, "wwan0")
    imei_b, gw_b = check_modem(b, "wwan1")
    assert imei_a != imei_b  # two modems, not one seen twice
    assert (gw_a, gw_b) == ("10.99.0.1", "10.99.8.1")  # subnets of their own
    st_a, st_b = a.status(), b.status()
    assert (st_a["instance"], st_b["instance"]) == ("wwan0", "wwan1")
    assert st_a["modem"]["pid"] != st_b["modem"]["pid"] and st_a["pid"] != st_b["pid"]
    assert (st_a["port"]["path"], st_b["port"]["path"]) == (a.port, b.port)
    sockets = sorted(p.name for p in a.run_dir.glob("*.sock"))
    assert sockets == ["wwan0.sock", "wwan1.sock"]

    # Not named, the modem is ambiguous: a clear error listing both, nothing done.
    res = a.cli("status")
    assert res.returncode == 1
    assert res.stderr == ("iosm-cuse: 2 modems are running (wwan0, wwan1); say which with "
                          "--instance N\n")

    # Links by name find their modem: wwan1-2 goes to the second, only.
    b.add_link(2)
    assert [ln["name"] for ln in b.status()["links"]] == ["wwan1", "wwan1-2"]
    assert [ln["name"] for ln in a.status()["links"]] == ["wwan0"]
    assert "wwan1-2" in a.links() and "wwan0-2" not in a.links()
    b_rx = link_counters(b, "wwan1")["rx_packets"]

    # Live control of one modem changes that one only.
    res = a.cli("modem", "register", "denied", "--instance", "1", "--json")
    assert res.returncode == 0, res.stderr
    res = a.cli("modem", "signal", "--rssi", "4", "--instance", "1", "--json")
    assert res.returncode == 0, res.stderr
    states = [json.loads(a.cli("modem", "state", "--instance", str(k), "--json").stdout)
              ["state"] for k in (0, 1)]
    assert (states[0]["network"], states[1]["network"]) == ("home", "denied"), states
    assert (states[0]["signal"]["rssi"], states[1]["signal"]["rssi"]) != (4, 4), states
    assert states[1]["signal"]["rssi"] == 4
    assert a.cli("modem", "register", "home", "--instance", "1").returncode == 0
    assert b.connect(0) == gw_b  # the network's refusal took its session down

    # Crash the first modem's model: it restarts, the second never notices.
    model_a, model_b = st_a["modem"]["pid"], st_b["modem"]["pid"]
    os.kill(model_a, signal.SIGKILL)
    seen: list[dict[str, Any]] = []

    def restarted() -> bool:
        seen.append(a.status())
        return bool(seen[-1]["modem"]["restarts"] >= 1
                    and seen[-1]["modem"]["ipc_state"] == "RUNNING")

    until(restarted, 20, lambda: seen[-1], poll=0.2)
    assert device_id(b) == imei_b  # answered while (and after) the first one restarted
    st_b = b.status()
    assert st_b["modem"]["restarts"] == 0 and st_b["modem"]["pid"] == model_b
    assert link_counters(b, "wwan1")["rx_packets"] == b_rx  # nothing crossed over
    assert ping(b, 0, gw_b) == 3
    assert seen[-1]["modem"]["pid"] != model_a
    assert ping(a, 0, a.connect(0)) == 3

    # Stopping the first leaves the second, which is then the only one and the default.
    code, err = a.terminate()
    assert code == 0, err
    assert "wwan0" not in b.links() and "wwan1" in b.links()
    only = b.cli("status", "--json")
    assert only.returncode == 0 and f'"path": "{b.port}"' in only.stdout
    # ...and the next `up` takes the free wwan0 again.
    c = start_up()
    assert c.instance == "wwan0" and device_id(c) == imei_a


def test_ups_started_at_once_are_distinct_modems(start_up: StartUp) -> None:
    with ThreadPoolExecutor(4) as pool:
        ups = list(pool.map(lambda _: start_up(), range(4)))
    assert sorted(u.instance for u in ups) == ["wwan0", "wwan1", "wwan2", "wwan3"]
    assert len({u.port for u in ups}) == 4
    assert len({device_id(u) for u in ups}) == 4


EIGHT = 8


def test_eight_modems_each_answer_and_ping(start_up: StartUp) -> None:
    """Eight at once on the host tier (PTY); the guest tier shows ModemManager listing them
    (tests/kernel/test_multi_modem.py)."""
    ups = [start_up() for _ in range(EIGHT)]
    imeis = set()
    for k, up in enumerate(ups):
        imei, gw = check_modem(up, f"wwan{k}")
        assert gw == f"10.99.{8 * k}.1"
        imeis.add(imei)
    assert len(imeis) == EIGHT
    # Every modem counted only its own pings.
    for k, up in enumerate(ups):
        c = link_counters(up, f"wwan{k}")
        assert 3 <= c["rx_packets"] <= 6, (k, c)


def test_two_modems_share_a_gateway_namespace_with_tuns_of_their_own(
        netns_name: str, start_up: StartUp) -> None:
    """--gateway netns:NAME for both: each model's gateway TUN is named after its instance
    (iosmgw0, iosmgw1) and holds its own subnets, so both live in one gateway namespace, where
    the kernel answers each modem's pings."""
    ip("netns", "add", netns_name)
    a = start_up("--gateway", f"netns:{netns_name}")
    b = start_up("--gateway", f"netns:{netns_name}")

    def gateway_tuns() -> set[str]:
        out = ip("-n", netns_name, "-j", "link", "show").stdout
        return {ln["ifname"] for ln in json.loads(out) if "UP" in ln.get("flags", [])}

    until(lambda: {"iosmgw0", "iosmgw1"} <= gateway_tuns(), 10, gateway_tuns)
    check_modem(a, "wwan0")
    check_modem(b, "wwan1")
    addrs = ip("-n", netns_name, "-4", "-o", "addr", "show", "dev", "iosmgw1").stdout
    assert "10.99.8.1/24" in addrs and "10.99.0.1/" not in addrs, addrs
