"""Issue 5, tier 2: with the daemon up, eight MBIM sessions each carried by its own link.

Links wwan0 and wwan0-1 … wwan0-7, an MBIM connect on every SessionId, the addresses that
`--query-ip-configuration` reports applied to the link of that session, a ping over every link
to the model's gateway, and traffic of session N seen on link N and MUX session N only.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from daemon_up import StartUp, Up, disable_ipv6, ip

pytestmark = pytest.mark.host

SESSIONS = range(8)


def _link(n: int) -> str:
    return "wwan0" if n == 0 else f"wwan0-{n}"


def _traffic(up: Up) -> dict[int, tuple[int, int, int, int]]:
    """Per session: (link tx, link rx, MUX tx, MUX rx) packets."""
    st: dict[str, Any] = up.status()
    links = {ln["linkid"]: ln["counters"] for ln in st["links"]}
    mux = st["mux"]["sessions"]
    out = {}
    for n in SESSIONS:
        s = mux.get(str(n), {})
        out[n] = (links[n]["tx_packets"], links[n]["rx_packets"],
                  s.get("tx_packets", 0), s.get("rx_packets", 0))
    return out


def test_eight_mbim_sessions_each_on_its_own_link(netns: str, start_up: StartUp) -> None:
    disable_ipv6(netns)
    up = start_up()
    assert up.mbimcli("--attach-packet-service").returncode == 0
    for n in SESSIONS[1:]:
        add = up.cli("link", "add", "dev", _link(n), "parentdev-name", "wwan0", "type",
                     "wwan", "linkid", str(n))
        assert add.returncode == 0, add.stderr
    gateways = {}
    for n in SESSIONS:
        con = up.mbimcli(f"--connect=session-id={n},access-string=internet,ip-type=ipv4")
        assert con.returncode == 0 and "'activated'" in con.stdout, con.stdout + con.stderr
        cfg = up.mbimcli(f"--query-ip-configuration={n}")
        addr = re.search(r"IP \[0\]: '([0-9.]+/[0-9]+)'", cfg.stdout)
        gw = re.search(r"Gateway: '([0-9.]+)'", cfg.stdout)
        assert cfg.returncode == 0 and addr and gw, cfg.stdout + cfg.stderr
        ip("-n", netns, "addr", "add", addr.group(1), "dev", _link(n))
        ip("-n", netns, "link", "set", _link(n), "up")
        gateways[n] = gw.group(1)

    for n, gw in gateways.items():
        before = _traffic(up)
        ping = up.run("ping", "-c", "3", "-W", "2", "-I", _link(n), gw)
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        after = _traffic(up)
        for m in SESSIONS:
            moved = [a - b for a, b in zip(after[m], before[m], strict=True)]
            if m == n:
                assert all(d >= 3 for d in moved), (n, moved)
            else:
                assert moved == [0, 0, 0, 0], f"ping over {_link(n)} moved session {m}"
    code, err = up.terminate()
    assert code == 0, err
