"""The asyncio adapter of the virt-pci device end: serves the vhost-user socket on its own
thread and event loop (docs/uml-virtpci.md §6).

Why a thread: UML busy-waits about 40 ms for the answer to a config or MMIO read and then reads
all-ones. The model's loop may be busy for a while (a burst of MUX traffic, a gateway write), so
reads must not queue behind it: this thread's loop does nothing but move vhost-user messages and
kicks, answers reads from the BAR memory at once, and wakes the model through the doorbell
eventfd. The model raises its MSI from its own thread with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from pathlib import Path

from iosm_cuse.bus.virtpci.device import DeviceEnd, VirtPciBus
from iosm_cuse.bus.virtpci.vhost_user import MessageSplitter, fd_count

log = logging.getLogger("iosm_cuse.bus.virtpci")

_MAX_FDS = 8
_RECV = 65536


class VirtPciServer:
    """Listens on `path`; one front end at a time (a reconnect after a UML reboot starts a new
    session on the same bus)."""

    def __init__(self, bus: VirtPciBus, path: Path) -> None:
        self.bus = bus
        self.path = path
        self.end: DeviceEnd | None = None
        self.connections = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._listener: socket.socket | None = None
        self.error: BaseException | None = None

    # ---- thread control (called from the model's thread)

    def start(self) -> None:
        """Bind the socket (so the caller may start the front end at once) and serve it."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self.path))
        listener.listen(1)
        listener.setblocking(False)
        self._listener = listener
        self._thread = threading.Thread(target=self._run, name="virtpci", daemon=True)
        self._thread.start()
        self._ready.wait()
        self.bus.raise_msi = self._raise_msi_threadsafe

    def stop(self) -> None:
        self.bus.raise_msi = None
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _raise_msi_threadsafe(self) -> None:
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._raise_msi)

    def _raise_msi(self) -> None:
        if self.end is not None:
            self.end.request_msi()

    # ---- the server thread

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the owner, who decides
            self.error = exc
            log.exception("virt-pci server failed")
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        assert self._listener is not None
        listener = self._listener
        try:
            while not self._stop.is_set():
                accept = asyncio.ensure_future(self.loop.sock_accept(listener))
                stopping = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not accept.done():
                    accept.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await accept
                    break
                conn, _addr = accept.result()
                self.connections += 1
                await self._session(conn)
        finally:
            self.loop = None

    async def _session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert self._stop is not None
        end = DeviceEnd(self.bus)
        watched: dict[int, int] = {}  # kick fd -> queue

        def watch(queue: int, fd: int) -> None:
            os.set_blocking(fd, False)
            watched[fd] = queue
            loop.add_reader(fd, on_kick, fd)

        def unwatch(fd: int) -> None:
            if watched.pop(fd, None) is not None:
                loop.remove_reader(fd)

        def on_kick(fd: int) -> None:
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)
            end.kicked(watched[fd])

        end.on_kick_fd = watch
        end.on_kick_fd_gone = unwatch
        self.end = end
        splitter = MessageSplitter(end.rejects)
        fds: deque[int] = deque()
        closed = asyncio.Event()

        def finish() -> None:
            loop.remove_reader(conn.fileno())  # EOF stays readable: stop looking at once
            closed.set()

        def on_readable() -> None:
            try:
                data, new_fds, _flags, _addr = socket.recv_fds(conn, _RECV, _MAX_FDS)
            except BlockingIOError:
                return
            except OSError as exc:
                log.info("virt-pci front end: %s", exc)
                finish()
                return
            fds.extend(new_fds)
            if not data:
                if splitter.pending:
                    end.rejects("vhost_truncated", "connection closed %d bytes into a message",
                                splitter.pending)
                finish()
                return
            for msg in splitter.feed(data):
                mine = tuple(fds.popleft() for _ in range(min(fd_count(msg), len(fds))))
                reply = end.handle(msg, mine)
                if reply is not None:
                    try:
                        conn.sendall(reply)
                    except OSError as exc:
                        log.info("virt-pci front end: %s", exc)
                        finish()
                        return
            if splitter.broken:
                finish()

        conn.setblocking(False)
        loop.add_reader(conn.fileno(), on_readable)
        stopping = asyncio.ensure_future(self._stop.wait())
        ending = asyncio.ensure_future(closed.wait())
        try:
            await asyncio.wait({stopping, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            ending.cancel()
            loop.remove_reader(conn.fileno())
            for fd in list(watched):
                unwatch(fd)
            self.end = None
            end.close()
            for fd in fds:
                os.close(fd)
            conn.close()
            log.info("virt-pci front end disconnected (rejects: %s)", end.rejects.as_dict())
