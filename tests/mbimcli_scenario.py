"""The mbimcli sequence issue 4 asks of every transport, with what each step must print.

The expected text is derived from the ModemConfig the daemon runs with, so a value the model
made up instead of taking from its configuration fails the step. Tier 2 runs it over the PTY
transport (`tests/test_mbimcli_acceptance.py`), tier 3 over the real CUSE device
(`tests/kernel/test_stack.py`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from iosm_cuse.sim.config import ModemConfig

# A configuration whose values differ from the defaults, for the tier that can pass --config.
ACCEPTANCE_CONFIG = {
    "imsi": "001019876543210",
    "firmware": "acceptance-fw 7",
    "own_numbers": ["+9990199999"],
    "home_provider": {"id": "00199", "name": "acceptance-net"},
    "sessions": [{"ipv4": "10.99.40.2/24", "ipv4_gateway": "10.99.40.1",
                  "ipv6": "fd99:40::2/64", "ipv6_gateway": "fd99:40::1"}],
}


@dataclass(frozen=True)
class Step:
    args: tuple[str, ...]
    expect: tuple[str, ...]


def steps(cfg: ModemConfig) -> list[Step]:
    ip = cfg.session_ip(0)
    v4 = f"IP [0]: '{ip.ipv4}'"
    return [
        Step(("--query-device-caps",), (f"Device ID: '{cfg.device_id}'",
                                        f"Firmware info: '{cfg.firmware}'",
                                        f"Max sessions: '{cfg.max_sessions}'")),
        Step(("--query-subscriber-ready-status",), ("Ready state: 'initialized'",
                                                    f"Subscriber ID: '{cfg.imsi}'",
                                                    f"SIM ICCID: '{cfg.iccid}'",
                                                    f"'{cfg.own_numbers[0]}'")),
        Step(("--query-radio-state",), ("Software radio state: 'on'",)),
        Step(("--query-registration-state",), ("Register state: 'home'",
                                               f"Provider ID: '{cfg.home_provider.id}'",
                                               f"Provider name: '{cfg.home_provider.name}'")),
        Step(("--attach-packet-service",), ("Packet service state: 'attached'",)),
        Step(("--connect=apn=internet",), ("Activation state: 'activated'", v4)),
        Step(("--query-ip-configuration",), (v4, f"Gateway: '{ip.ipv4_gateway}'",
                                             f"IP [0]: '{ip.ipv6}'")),
        Step(("--query-connection-state",), ("Activation state: 'activated'",)),
        Step(("--disconnect",), ("Activation state: 'deactivated'",)),
        Step(("--query-connection-state",), ("Activation state: 'deactivated'",)),
    ]


def run(cfg: ModemConfig,
        mbimcli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Run every step through `mbimcli(*args)`; fail on the first that exits non-zero or does
    not print what the configuration says."""
    for step in steps(cfg):
        res = mbimcli(*step.args)
        assert res.returncode == 0, (step.args, res.stdout, res.stderr)
        missing = [e for e in step.expect if e not in res.stdout]
        assert not missing, (step.args, missing, res.stdout)


DIFFERENTIAL_PINGS = 5


def differential_mbimcli_runs(cfg: ModemConfig) -> int:
    """How many mbimcli processes `run_differential` starts: the steps, CONNECT, DISCONNECT."""
    return len(steps(cfg)) + 2


def run_differential(cfg: ModemConfig,
                     mbimcli: Callable[..., subprocess.CompletedProcess[str]],
                     sh: Callable[..., subprocess.CompletedProcess[str]],
                     link: str = "wwan0") -> None:
    """The scenario both drivers run for the protocol differential (tests/test_differential.py):
    the mbimcli steps above, then a CONNECT without ATTACH (the modem attached by itself), the
    session's address on `link`, DIFFERENTIAL_PINGS pings to the echo gateway, DISCONNECT.
    `sh(*argv)` runs a command where `link` lives."""
    run(cfg, mbimcli)
    ip = cfg.session_ip(0)
    res = mbimcli("--connect=apn=internet")
    assert res.returncode == 0 and "'activated'" in res.stdout, res.stdout + res.stderr
    try:
        for argv in (("ip", "addr", "add", str(ip.ipv4), "dev", link),
                     ("ip", "link", "set", link, "up")):
            res = sh(*argv)
            assert res.returncode == 0, (argv, res.stderr)
        ping = sh("ping", "-c", str(DIFFERENTIAL_PINGS), "-i", "0.2", "-W", "2",
                  str(ip.ipv4_gateway))
        assert f"{DIFFERENTIAL_PINGS} received" in ping.stdout, ping.stdout + ping.stderr
    finally:
        sh("ip", "link", "set", link, "down")
        sh("ip", "addr", "flush", "dev", link)
        mbimcli("--disconnect")
