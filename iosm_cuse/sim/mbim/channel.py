"""The asyncio adapter: ``MbimFunction`` as a ChannelFunction (docs/architecture.md, Contract 3).

It sends what ``receive()`` answers, flushes indications (also when the rest of the model wakes
it), and arms a loop timer for the function's fragment deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from iosm_cuse.sim.mbim.function import MbimFunction


class MbimChannelFunction:
    """ChannelFunction adapter (Contract 3): attach to channel 6 of the device model."""

    def __init__(self, function: MbimFunction) -> None:
        self.function = function
        self._send: Callable[[bytes], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self.function.wakeup = self.wake

    def receive(self, ul_transfer: bytes) -> None:
        self._emit(self.function.receive(ul_transfer))
        self.flush()
        self._arm_timer()

    def closed(self) -> None:
        self._send = None
        self.function.wakeup = None
        self.function.host_detached()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def wake(self) -> None:
        """The rest of the model changed something: send what waits, re-arm the timer."""
        self.flush()
        self._arm_timer()

    def flush(self) -> None:
        """Send the indications that are waiting."""
        self._emit(self.function.pending_indications())

    def _emit(self, transfers: list[bytes]) -> None:
        if self._send is None:
            return
        for t in transfers:
            self._send(t)

    def _arm_timer(self) -> None:
        # The fragment timeout only needs a timer when a loop runs us; without one, the next
        # receive() reports the timeout.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.function.next_timer()
        if due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, due - self.function.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._emit(self.function.handle_timer())
        self.flush()
        self._arm_timer()
