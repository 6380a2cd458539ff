"""In-memory channels for an `MbimPort` without the IPC engine (tests, benchmarks).

`loopback_opener(responder)` gives an `open_channel(on_receive)` that fits Contract 4: each
UL transfer goes to `responder(bytes) -> list[bytes]`, and each answer comes back as its own
DL transfer on a later loop iteration, the way the engine delivers a DL TD.
`MbimFunction.receive` is such a responder; `answer_open` is the smallest one.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from iosm_cuse.mbim.constants import MessageType, Status
from iosm_cuse.mbim.message import (
    CloseDone,
    CommandDone,
    MessageError,
    OpenDone,
    command_target,
    encode_message,
    peek_header,
)

Responder = Callable[[bytes], list[bytes]]


class LoopbackChannel:
    def __init__(self, responder: Responder, on_receive: Callable[[bytes], None]) -> None:
        self.responder = responder
        self.on_receive = on_receive
        self.sent: list[bytes] = []
        self.closed = False
        self.error: OSError | None = None
        self._loop = asyncio.get_running_loop()

    def send(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise OSError(errno.ENOTCONN, "loopback channel closed")
        self.sent.append(bytes(data))
        for answer in self.responder(bytes(data)):
            self._loop.call_soon(self._deliver, answer)

    def deliver(self, data: bytes) -> None:
        """A device-initiated DL transfer (an indication)."""
        self._loop.call_soon(self._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        if not self.closed:
            self.on_receive(data)

    async def close(self) -> None:
        self.closed = True


class LoopbackOpener:
    """`open_channel` for an MbimPort; remembers the channels it opened."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.channels: list[LoopbackChannel] = []
        self.fail: OSError | None = None  # raise this from the next opens

    async def __call__(self, on_receive: Callable[[bytes], None]) -> LoopbackChannel:
        await asyncio.sleep(0)  # opening a real channel takes a round trip
        if self.fail is not None:
            raise self.fail
        ch = LoopbackChannel(self.responder, on_receive)
        self.channels.append(ch)
        return ch

    @property
    def current(self) -> LoopbackChannel:
        return self.channels[-1]


def answer_open(data: bytes) -> list[bytes]:
    """The least an MBIM device does: OPEN -> OPEN_DONE, CLOSE -> CLOSE_DONE (status 0, same
    TID), COMMAND -> COMMAND_DONE echoing service and CID with status 0 and no payload.
    Anything else, or a message too short for what it claims, gets no answer."""
    try:
        mtype, _, tid = peek_header(data)
        if mtype == MessageType.OPEN:
            return [encode_message(OpenDone(tid, Status.NONE))]
        if mtype == MessageType.CLOSE:
            return [encode_message(CloseDone(tid, Status.NONE))]
        if mtype == MessageType.COMMAND:
            service, cid = command_target(data)
            return [encode_message(CommandDone(tid, service, cid, Status.NONE))]
    except MessageError:
        pass
    return []
