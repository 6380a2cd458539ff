"""Issue 13 point 3, tier 2: the services beyond Basic Connect through `iosm-cuse up
--transport pty` (engine, model process, MBIM function), with the real mbimcli where libmbim
1.28 has an action for the CID, and the project's MbimClient for SMS and USSD (mbimcli 1.28
has no SMS or USSD actions)."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from daemon_up import StartUp, Up
from helpers import MbimClient, until

from iosm_cuse.mbim import cids, infobuf
from iosm_cuse.mbim.cids import Sms, SmsFlag, SmsFormat, Ussd, UssdAction
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.message import Command, CommandDone
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim.sms_pdu import decode_ussd, encode_submit, encode_ussd

pytestmark = pytest.mark.host


def ok(res: Any) -> str:
    assert res.returncode == 0, res.stdout + res.stderr
    out: str = res.stdout
    return out


def test_mbimcli_sees_the_services_and_their_answers(start_up: StartUp) -> None:
    up = start_up()
    services = ok(up.mbimcli("--query-device-services"))
    for name in ("sms", "ussd", "atds", "ms-basic-connect-extensions",
                 "intel-firmware-update"):
        assert f"Service: '{name}'" in services, services
    assert "modem-reboot" in services and "lte-attach-info" in services, services
    caps = ok(up.mbimcli("--ms-query-sys-caps"))
    assert re.search(r"Number of slots:\s*'1'", caps, re.I), caps
    lte = ok(up.mbimcli("--ms-query-lte-attach-configuration"))
    assert lte.count("IP type") == 3, lte
    ok(up.mbimcli("--attach-packet-service"))
    info = ok(up.mbimcli("--ms-query-lte-attach-info"))
    assert re.search(r"Attach state:\s*attached", info), info
    ctx = ok(up.mbimcli("--query-provisioned-contexts"))
    assert "'internet'" in ctx, ctx
    ok(up.mbimcli("--set-provisioned-contexts=context-id=4294967295,context-type=internet,"
                  "auth=none,compression=none,username=,password=,access-string=work,"
                  "provider-id=00101"))
    ctx = ok(up.mbimcli("--query-provisioned-contexts"))
    assert "'work'" in ctx and "'internet'" in ctx, ctx
    ok(up.mbimcli("--set-signal-state=signal-strength-interval=5,rssi-threshold=2,"
                  "error-rate-threshold=1"))
    sig = ok(up.mbimcli("--query-signal-state"))
    assert re.search(r"Signal strength interval:\s*'5'", sig, re.I), sig
    atds = ok(up.mbimcli("--atds-query-signal"))
    # the configured defaults, as mbimcli decodes them (RSSI 20 is -73 dBm)
    for line in ("RSSI: -73 dBm", "RSRQ: -10.00", "RSRP: -95 dBm", "RSSNR: 12 dB",
                 "RSCP: unknown"):
        assert re.search(line.replace(": ", r":\s*"), atds), atds
    code, err = up.terminate()
    assert code == 0, err


def test_intel_modem_reboot_drops_the_modem_and_it_comes_back(start_up: StartUp) -> None:
    up = start_up()
    before = up.status()["modem"]
    ok(up.mbimcli("--intel-modem-reboot"))
    seen: list[dict[str, Any]] = []

    def back() -> bool:
        seen.append(up.status()["modem"])
        return bool(seen[-1]["restarts"] >= 1 and seen[-1]["ipc_state"] == "RUNNING")

    until(back, 20, lambda: seen[-1] if seen else "no status", poll=0.1)
    assert seen[-1]["restarts"] == before["restarts"] + 1
    # the port answers again, with the modem as at power-on (detached)
    until(lambda: up.mbimcli("--query-packet-service-state").returncode == 0, 10,
          "mbimcli after the reboot", poll=0.2)
    assert "'detached'" in ok(up.mbimcli("--query-packet-service-state"))
    code, err = up.terminate()
    assert code == 0, err


class Client(MbimClient):
    def any_command(self, service: Service, cid: int, ct: CommandType,
                    values: dict[str, Any] | None = None, info: bytes | None = None
                    ) -> tuple[int, dict[str, Any] | None]:
        spec = cids.lookup(service, cid)
        assert spec is not None and spec.response is not None
        if info is None:
            layout = spec.request(ct)
            assert layout is not None
            info = infobuf.encode(layout, values or {})
        done = self.transact(Command(self.next_tid(), service.value, cid, ct, info))
        assert isinstance(done, CommandDone), done
        if not done.info:
            return done.status, None
        return done.status, infobuf.decode(spec.response, done.info)


def test_sms_send_read_and_ussd_over_the_port(up: Up) -> None:
    fd = os.open(up.port, os.O_RDWR | os.O_NOCTTY)
    try:
        c = Client(fd)
        assert c.open() == Status.NONE
        record = infobuf.encode(cids.SMS_PDU_SEND_RECORD,
                                {"PduData": encode_submit("+4930123456", "ping über MBIM")})
        info = infobuf.encode(cids.SMS_SEND_SET, {"Format": SmsFormat.PDU, "Record": record})
        status, sent = c.any_command(Service.SMS, Sms.SEND, CommandType.SET, info=info)
        assert status == Status.NONE and sent is not None and sent["MessageReference"] == 1
        status, got = c.any_command(Service.SMS, Sms.READ, CommandType.QUERY, {
            "Format": SmsFormat.PDU, "Flag": SmsFlag.ALL, "MessageIndex": 0})
        assert status == Status.NONE and got == {"Format": SmsFormat.PDU, "PduMessages": []}
        dcs, payload = encode_ussd("*100#")
        status, ans = c.any_command(Service.USSD, Ussd.USSD, CommandType.SET, {
            "Action": UssdAction.INITIATE, "DataCodingScheme": dcs, "Payload": payload})
        assert status == Status.NONE and ans is not None
        assert decode_ussd(ans["DataCodingScheme"], ans["Payload"]) == "Your balance is 42.00 EUR"
    finally:
        os.close(fd)
    code, err = up.terminate()
    assert code == 0, err
