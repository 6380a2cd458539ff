"""Live control seen by stock ModemManager in the Debian-kernel guest (docs/control.md): the
network refusing and taking back the modem moves its state, a network deactivation disconnects
its bearer, and an FCC-locked radio fails its enable until unlocked. Services as in
test_modemmanager.py (the `services` fixture, conftest.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import guest_up
import pytest
from helpers import until
from mm_guest import Daemon, Services, keyvalues, run, start_daemon

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("ModemManager") is None and
                                 not Path("/usr/sbin/ModemManager").exists(),
                                 reason="modemmanager is not installed (./dev TEST_PACKAGES)")]

STATE_WITHIN = 60.0  # TCG: an indication through mbim-proxy into ModemManager's state


def modem_cli(*args: str) -> dict[str, object]:
    """`iosm-cuse modem ARGS --json`, which must succeed."""
    res = run(guest_up.IOSM_CUSE, "modem", *args, "--json", check=True)
    answer: dict[str, object] = json.loads(res.stdout)
    return answer


def mm_index(daemon: Daemon) -> str:
    return daemon.modem.rsplit("/", 1)[1]


def wait_for(m: str, key: str, wanted: str, record: Callable[[str, object], None]
             ) -> float:
    seen: dict[str, str] = {}

    def reached() -> bool:
        seen.update(keyvalues("-m", m))
        return seen.get(key) == wanted

    took = until(reached, STATE_WITHIN, lambda: f"{key} never {wanted!r}: {seen.get(key)!r} "
                 f"(state {seen.get('modem.generic.state')!r})", poll=0.5)
    record(f"{key}={wanted}_s", round(took, 2))
    return took


@pytest.fixture
def daemon(services: Services) -> Iterator[Daemon]:
    d = start_daemon(services)
    try:
        yield d
    finally:
        guest_up.stop(d.proc)


def enable(m: str) -> None:
    run("mmcli", "-m", m, "-e", check=True)
    until(lambda: keyvalues("-m", m).get("modem.generic.state") == "registered", STATE_WITHIN,
          lambda: f"not registered after enabling: {keyvalues('-m', m)}", poll=0.5)


def test_register_denied_and_home_move_the_modem_state(
        daemon: Daemon, record_property: Callable[[str, object], None]) -> None:
    m = mm_index(daemon)
    enable(m)
    modem_cli("register", "denied")
    wait_for(m, "modem.3gpp.registration-state", "denied", record_property)
    assert keyvalues("-m", m)["modem.generic.state"] != "registered"
    modem_cli("register", "roaming", "--operator", "26201", "--name", "Visited")
    wait_for(m, "modem.3gpp.registration-state", "roaming", record_property)
    assert keyvalues("-m", m)["modem.3gpp.operator-code"] == "26201"
    modem_cli("register", "home")
    wait_for(m, "modem.3gpp.registration-state", "home", record_property)
    wait_for(m, "modem.generic.state", "registered", record_property)


def test_deactivate_0_disconnects_the_bearer(
        daemon: Daemon, record_property: Callable[[str, object], None]) -> None:
    m = mm_index(daemon)
    run("mmcli", "-m", m, "--simple-connect=apn=internet", check=True)
    info = keyvalues("-m", m)
    (bearer,) = [v for k, v in info.items() if k.startswith("modem.generic.bearers.value")]
    b = bearer.rsplit("/", 1)[1]
    assert keyvalues("-b", b)["bearer.status.connected"] == "yes"
    answer = modem_cli("deactivate", "0", "--cause", "36")
    assert answer["indications"] == ["CONNECT"]
    took = until(lambda: keyvalues("-b", b)["bearer.status.connected"] == "no", STATE_WITHIN,
                 lambda: f"bearer still connected: {keyvalues('-b', b)}", poll=0.5)
    record_property("bearer_disconnected_s", round(took, 2))
    assert keyvalues("-m", m)["modem.generic.state"] == "registered"


def test_fcc_locked_radio_fails_enable_until_unlocked(
        services: Services, tmp_path: Path, record_property: Callable[[str, object], None]
        ) -> None:
    scenario = tmp_path / "fcc.toml"
    scenario.write_text('name = "locked"\n[[step]]\nat = 0\naction = "fcc"\n'
                        'args = { state = "lock" }\n')
    daemon = start_daemon(services, None, "--scenario", str(scenario))
    try:
        m = mm_index(daemon)

        def fcc_locked() -> bool:
            state = modem_cli("state")["state"]
            return isinstance(state, dict) and state["radio"]["fcc_locked"] is True

        until(fcc_locked, STATE_WITHIN, "the scenario did not lock the radio", poll=0.5)
        locked = run("mmcli", "-m", m, "-e")
        record_property("mm_error", (locked.stdout + locked.stderr).strip())
        print(f"mmcli -e on the locked radio: {locked.stdout}{locked.stderr}")
        assert locked.returncode != 0, locked.stdout
        assert "Invalid transition" in locked.stderr, locked.stderr
        assert keyvalues("-m", m)["modem.generic.state"] != "registered"
        mm_log = services.log("ModemManager")
        record_property("mm_log_tail", mm_log[-600:])
        print("ModemManager:", "\n".join(ln for ln in mm_log.splitlines()
                                         if "radio" in ln.lower() or "transition" in ln))

        modem_cli("fcc", "unlock")
        enable(m)
    finally:
        guest_up.stop(daemon.proc)
