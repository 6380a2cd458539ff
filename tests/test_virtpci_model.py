"""Model fixes the kernel's iosm driver showed (docs/uml-virtpci.md §9), tested without UML:
the userspace engine against the model over the shared-memory bus."""

from __future__ import annotations

from helpers import ShmPair, engine_running, run, until_async

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


def test_first_credit_grant_follows_the_open_session_response_later() -> None:
    """In credit mode the first FCTH must not travel with the OPEN_SESSION response: the
    kernel drops a grant for a session whose net device is not registered yet, and credits are
    never resent."""
    import asyncio

    from iosm_cuse.sim.mux import FIRST_GRANT_DELAY, MuxDevice
    from iosm_cuse.wire.channels import MuxMode
    from iosm_cuse.wire.mux import COMMANDS, Command, Sig, decode_table, encode_lite_cmd

    sent: list[tuple[float, bytes]] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        mux = MuxDevice(mode=MuxMode.LITE, credit_window=4096)

        def send(data: bytes) -> bool:
            sent.append((loop.time(), data))
            return True

        mux.opened(send)
        c = COMMANDS[MuxMode.LITE]
        t0 = loop.time()
        mux.receive(encode_lite_cmd(Command(c.open_session, 0, 1, {"dl_head_pad_len": 0})))
        assert len(sent) == 1  # the response alone
        await until_async(lambda: len(sent) == 2, 5, "the first grant")
        when, fcth = sent[1]
        assert when - t0 >= FIRST_GRANT_DELAY
        assert decode_table(fcth, Sig.FCTH) == (0, 4096)
        # a session closed before its grant was due gets none
        mux.receive(encode_lite_cmd(Command(c.open_session, 1, 2, {"dl_head_pad_len": 0})))
        mux.receive(encode_lite_cmd(Command(c.close_session, 1, 3, {})))
        await asyncio.sleep(FIRST_GRANT_DELAY * 2)
        assert [d[:4] for _t, d in sent[2:]] == [sent[0][1][:4]] * 2  # two responses only
        assert mux.counters["credit_grants"] == 1

    run(body())
