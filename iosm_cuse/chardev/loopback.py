"""In-memory channels for an `MbimPort` without the IPC engine (tests, benchmarks).

`loopback_opener(responder)` gives an `open_channel(on_receive)` that fits Contract 4: each
UL transfer goes to `responder(bytes) -> list[bytes]`, and each answer comes back as its own
DL transfer on a later loop iteration, the way the engine delivers a DL TD.
`MbimFunction.receive` is such a responder; `answer_open` is the smallest one.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Callable

from iosm_cuse.mbim.constants import MessageType
from iosm_cuse.mbim.message import HEADER

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
    TID), COMMAND -> COMMAND_DONE echoing service and CID with status 0 and no payload."""
    if len(data) < HEADER.size:
        return []
    mtype, _, tid = HEADER.unpack_from(data)
    if mtype == MessageType.OPEN:
        return [HEADER.pack(MessageType.OPEN_DONE, 16, tid) + struct.pack("<I", 0)]
    if mtype == MessageType.CLOSE:
        return [HEADER.pack(MessageType.CLOSE_DONE, 16, tid) + struct.pack("<I", 0)]
    if mtype == MessageType.COMMAND and len(data) >= 48:
        service_cid = data[20:40]
        body = struct.pack("<II", 1, 0) + service_cid + struct.pack("<II", 0, 0)
        return [HEADER.pack(MessageType.COMMAND_DONE, HEADER.size + len(body), tid) + body]
    return []
