"""The model process's network-side commands (sim/process.py MODEM_OPS): what a test
instrument drives until the control socket's `iosm-cuse modem` commands carry them."""

from __future__ import annotations

import asyncio

from iosm_cuse.sim.assembly import MODEL
from iosm_cuse.sim.process import ModelProcess


def test_sms_and_ussd_commands_reach_the_modem_and_refuse_bad_input() -> None:
    async def main() -> None:
        mp = await ModelProcess.spawn(functions=MODEL, options={"gateway": "echo"})
        try:
            done = await mp.command("sms_deliver", **{"from": "+4930123", "text": "hi"})
            assert done["ok"] is True, done
            assert (await mp.command("ussd_notify", text="Bonus!"))["ok"] is True
            out = await mp.command("sms_outbox")
            assert out["ok"] is True and out["outbox"] == []
            bad = await mp.command("sms_deliver", **{"from": "nobody", "text": "x"})
            assert bad["ok"] is False and "phone number" in bad["error"]
            missing = await mp.command("sms_deliver", text="x")
            assert missing["ok"] is False and "from" in missing["error"]
            typed = await mp.command("ussd_notify", text=5)
            assert typed["ok"] is False and "strings" in typed["error"]
            assert (await mp.command("ping"))["ok"] is True     # still serving
        finally:
            await mp.close()

    asyncio.run(main())
