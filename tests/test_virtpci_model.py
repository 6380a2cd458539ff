"""Model fixes the kernel's iosm driver showed (docs/uml-virtpci.md §9), tested without UML:
the userspace engine against the model over the shared-memory bus."""

from __future__ import annotations

from helpers import ShmPair, engine_running, run

from iosm_cuse.sim.device import DeviceModel
from iosm_cuse.wire.channels import CHANNELS


def test_ul_on_channels_without_a_function_is_consumed(shm_pair: ShmPair) -> None:
    """AT, trace, RPC and loopback have nothing behind them in the assembled model; their UL
    TDs must still complete, or a writer blocks once the ring is full and the kernel driver
    times out closing the pipe ("Pend data Timeout UL-Pipe")."""
    model = DeviceModel(shm_pair.dev)

    async def body() -> None:
        async with engine_running(model, shm_pair.host) as engine:
            for ch_id in (1, 2, 3, 4, 5):
                ch = await engine.open_channel(ch_id, lambda _b: None)
                n = CHANNELS[ch_id].ul_tds * 3  # three rings' worth: needs completions
                for i in range(n):
                    ch.send(b"AT+CGMI%d\r" % i)
                await ch.drain(timeout=10)
                await ch.close()

    run(body())
    expected = sum(CHANNELS[c].ul_tds * 3 for c in (1, 2, 3, 4, 5))
    assert model.ul_unclaimed == expected
    assert model.rejects.total == 0
