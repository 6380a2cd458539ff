"""Issue 13 point 3 in the Debian-kernel guest: stock ModemManager (1.20) uses the services
the model offers beyond Basic Connect (docs/modemmanager.md §7): messaging (stored, delivered
and sent SMS), USSD, extended signal from ATDS SIGNAL, and reset through Intel MODEM_REBOOT.

One daemon for the module (a TCG guest is slow), with a modem config that stores an SMS at
power-on and sets LTE signal values; the tests run in file order, the reset last.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import guest_up
import mm_guest
import pytest
from helpers import until
from mm_guest import Services, keyvalues, modems, run, wait_listed

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("ModemManager") is None and
                                 not Path("/usr/sbin/ModemManager").exists(),
                                 reason="modemmanager is not installed (./dev TEST_PACKAGES)")]

CONFIG = {
    "stored_sms": [{"from": "+4915550001", "text": "Stored at power-on"}],
    "rsrp": -87, "rsrq": -9, "snr": 17,
    "ussd_replies": {"*100#": "Your balance is 42.00 EUR"},
}


@dataclass
class Modem:
    proc: subprocess.Popen[str]
    path: str
    services: Services

    @property
    def index(self) -> str:
        return self.path.rsplit("/", 1)[1]

    def mmcli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("mmcli", "-m", self.index, *args, check=check)


@pytest.fixture(scope="module")
def modem(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modem]:
    """`iosm-cuse up` with CONFIG, listed and enabled by ModemManager (the `services` fixture
    of tests/kernel/conftest.py)."""
    config = tmp_path_factory.mktemp("modem-config") / "modem.json"
    config.write_text(json.dumps(CONFIG))
    daemon = mm_guest.start_daemon(services, None, "--config", str(config))
    proc = daemon.proc
    try:
        m = Modem(proc, daemon.modem, services)
        m.mmcli("--enable", check=True)
        until(lambda: keyvalues("-m", m.index).get("modem.generic.state") in (
            "registered", "connected"), 120,
            lambda: f"modem not registered: {keyvalues('-m', m.index)}", poll=1)
        yield m
    finally:
        guest_up.stop(proc)


def sms_texts(m: Modem) -> dict[str, str]:
    """SMS object path -> its text, for every SMS ModemManager lists."""
    out = m.mmcli("--messaging-list-sms").stdout
    paths = re.findall(r"/org/freedesktop/ModemManager1/SMS/\d+", out)
    return {p: keyvalues("-s", p.rsplit("/", 1)[1]).get("sms.content.text", "") for p in paths}


def control_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`iosm-cuse modem ...`: the live control of the running stack."""
    return run(guest_up.IOSM_CUSE, "modem", *args)


def test_stored_sms_is_listed_with_its_text(modem: Modem) -> None:
    texts: dict[str, str] = {}

    def listed() -> bool:
        texts.update(sms_texts(modem))
        return "Stored at power-on" in texts.values()

    until(listed, 60, lambda: f"SMS listed: {texts}; {modem.services.log('ModemManager')}",
          poll=1)
    sms = next(p for p, t in texts.items() if t == "Stored at power-on")
    assert keyvalues("-s", sms.rsplit("/", 1)[1])["sms.content.number"] == "+4915550001"


def test_ussd_initiate_gets_the_networks_answer(modem: Modem) -> None:
    res = modem.mmcli("--3gpp-ussd-initiate=*100#")
    assert "Your balance is 42.00 EUR" in res.stdout, res.stdout + res.stderr


def test_signal_setup_then_get_shows_the_lte_values(modem: Modem) -> None:
    modem.mmcli("--signal-setup=5")
    got: dict[str, str] = {}

    def values() -> bool:
        got.update(keyvalues("-m", modem.index, "--signal-get"))
        return got.get("modem.signal.lte.rsrp", "--").startswith("-87")

    until(values, 60, lambda: f"signal: {got}", poll=1)
    assert got["modem.signal.lte.rsrq"].startswith("-9") and got[
        "modem.signal.lte.snr"].startswith("17"), got


def send_sms(modem: Modem, number: str, text: str) -> str:
    """`--messaging-create-sms` then `mmcli -s N --send`; the SMS's index."""
    res = modem.mmcli(f"--messaging-create-sms=number={number},text='{text}'")
    found = re.search(r"/org/freedesktop/ModemManager1/SMS/(\d+)", res.stdout)
    assert found, res.stdout + res.stderr
    run("mmcli", "-s", found.group(1), "--send", check=True)
    return found.group(1)


def test_created_sms_is_sent(modem: Modem) -> None:
    sms = send_sms(modem, "+4930123456", "hello from mm")
    # MM marks it sent only on the model's SEND answer, given to a readable SMS-SUBMIT
    assert keyvalues("-s", sms)["sms.properties.state"] == "sent"


def test_sent_sms_reaches_the_outbox(modem: Modem) -> None:
    send_sms(modem, "+4930654321", "for the outbox")
    outbox = control_cli("sms", "outbox", "--json")
    assert outbox.returncode == 0, outbox
    sent = json.loads(outbox.stdout)["messages"]
    assert {"to": "+4930654321", "text": "for the outbox"}.items() <= sent[-1].items(), sent


def test_delivered_sms_appears_with_its_text(modem: Modem) -> None:
    res = control_cli("sms", "deliver", "--from", "+4915550002", "Delivered just now")
    assert res.returncode == 0, res.stderr
    texts: dict[str, str] = {}

    def listed() -> bool:
        texts.update(sms_texts(modem))
        return "Delivered just now" in texts.values()

    until(listed, 60, lambda: f"SMS listed: {texts}", poll=1)


def test_reset_drops_the_modem_and_it_comes_back(modem: Modem) -> None:
    modem.mmcli("-r")
    until(lambda: modem.path not in modems(), 60,
          lambda: f"modem still listed after reset: {modems()}", poll=0.5)
    again, _took = wait_listed(60, modem.services, old=modem.path)
    assert again != modem.path
    assert Path(mm_guest.PORT).exists()
