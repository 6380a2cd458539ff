"""The model completes UL TDs (tail + interrupt) before its channel function sees them: the
buffers are free once copied, as after a real device's DMA read, so the host can refill the ring
while the function works."""

from __future__ import annotations

from helpers import ShmPair, engine_running, run, shared_addr, until_async

from iosm_cuse.bus.shm import ShmBus
from iosm_cuse.sim.device import DeviceModel, Send
from iosm_cuse.wire.channels import channel_config


class TailWatch:
    """Records, for every UL transfer, the UL tail the host can already see."""

    def __init__(self, dev: ShmBus, pipe: int) -> None:
        self.dev = dev
        self.pipe = pipe
        self.seen: list[tuple[bytes, int]] = []

    def opened(self, send: Send) -> None:
        pass

    def receive(self, data: bytes) -> None:
        tails = shared_addr(self.dev, "tail_array_address")
        tail = int.from_bytes(self.dev.dma.view_at(tails + 4 * self.pipe, 4), "little")
        self.seen.append((data, tail))

    def closed(self) -> None:
        pass


def test_ul_tds_are_completed_before_the_function_runs(shm_pair: ShmPair) -> None:
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = DeviceModel(dev)
        ul_pipe = channel_config(0).ul_pipe  # 800 TDs: no wrap
        fn = TailWatch(dev, ul_pipe)
        model.attach(0, fn)
        async with engine_running(model, host) as eng:
            ch = await eng.open_channel(0, lambda _b: None)
            for i in range(20):  # one batch: one doorbell for all
                ch.send(b"%d" % i)
            await until_async(lambda: len(fn.seen) == 20, 2.0, "20 UL transfers")
            assert [d for d, _ in fn.seen] == [b"%d" % i for i in range(20)]
            # the whole batch was already completed when the function got its first transfer
            assert {t for _, t in fn.seen} == {20}
            await ch.drain(timeout=2)
            assert ch.pending == 0

    run(body())


def test_what_on_ul_done_sends_leaves_with_the_interrupts_doorbell(shm_pair: ShmPair) -> None:
    """The engine calls on_ul_done before it publishes and rings: transfers the sender queues
    from the callback are shown to the device by the same interrupt, not a loop pass later."""
    async def body() -> None:
        host, dev = shm_pair.host, shm_pair.dev
        model = DeviceModel(dev)
        fn = TailWatch(dev, channel_config(0).ul_pipe)
        model.attach(0, fn)
        async with engine_running(model, host) as eng:
            left = [40]
            late: list[int] = []

            def more() -> None:
                if left[0]:
                    left[0] -= 1
                    ch.send(b"more")

            ch = await eng.open_channel(0, lambda _b: None, on_ul_done=more)
            service = eng._service

            def checked() -> None:
                service()
                if ch.ul.unpublished:
                    late.append(ch.ul.head)

            eng._service = checked  # type: ignore[method-assign]
            ch.send(b"first")
            await until_async(lambda: len(fn.seen) == 41, 2.0, "41 UL transfers")
            assert not late and left == [0]

    run(body())
