"""The virt-pci device end against a fake front end: a memfd as UML's memory, rings built by
hand, the vhost-user sequence UML 6.1 sends (docs/uml-virtpci.md §4-§7). No UML needed.

The fake front end does what virtio_uml and virt-pci do: it connects, negotiates, hands over
its memory, sets up queue 0 (commands) and queue 1 (interrupt buffers), then issues config and
BAR accesses as chains and waits for the used ring. The model (`DeviceModel`) runs unmodified on
the `VirtPciBus`.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import model_running, run, until, until_async

from iosm_cuse.bus.base import BAR0, BAR2, doorbell_offset
from iosm_cuse.bus.pci import PciId
from iosm_cuse.bus.virtpci.device import VirtPciBus
from iosm_cuse.bus.virtpci.pcidev import (
    MSI_ADDR_HI,
    MSI_ADDR_LO,
    MSI_CTRL,
    MSI_DATA,
    Op,
    encode_msg,
)
from iosm_cuse.bus.virtpci.server import VirtPciServer
from iosm_cuse.bus.virtpci.vhost_user import (
    DEVICE_FEATURES,
    DEVICE_PROTOCOL_FEATURES,
    HEADER,
    PROTOCOL_F_SLAVE_REQ,
    U64,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    Request,
    encode,
    encode_mem_table,
)
from iosm_cuse.bus.virtpci.virtqueue import DESC, USED_ELEM, DescFlag
from iosm_cuse.sim.device import DeviceModel
from iosm_cuse.wire.ipc import SCRATCHPAD, Doorbell, ExecStage, IpcState

BASE = 0x0F900000  # where UML's shared memory starts (about 249 MiB with mem=256M)
SIZE = 1 << 20
NUM = 256
RINGS = {0: (0x0000, 0x1000, 0x2000), 1: (0x4000, 0x5000, 0x6000)}  # desc, avail, used
BUFFERS = 0x10000
WAIT = 5.0


class FakeFrontEnd:
    """What UML's virtio_uml + virt-pci do on their side of the socket, by hand."""

    def __init__(self, path: Path) -> None:
        self.memfd = os.memfd_create("fake-uml", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, BASE + SIZE)
        self.mem = mmap.mmap(self.memfd, SIZE, offset=BASE)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.kick = {q: os.eventfd(0, os.EFD_CLOEXEC) for q in RINGS}
        self.call = {q: os.pipe() for q in RINGS}
        self.slave = socket.socketpair()
        self.next_desc = {q: 0 for q in RINGS}
        self.avail_idx = {q: 0 for q in RINGS}
        self.used_seen = {q: 0 for q in RINGS}
        self.next_buf = BUFFERS

    def close(self) -> None:
        self.sock.close()
        for fd in (self.memfd, *self.kick.values(), *(fd for p in self.call.values() for fd in p)):
            os.close(fd)
        for s in self.slave:
            s.close()
        self.mem.close()

    # -- vhost-user

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        socket.send_fds(self.sock, [encode(request, payload)], list(fds))

    def reply(self) -> tuple[int, int, bytes]:
        head = self._recv(HEADER.size)
        h = HEADER.unpack(head)
        return int(h["request"]), int(h["flags"]), self._recv(int(h["size"]))

    def _recv(self, n: int) -> bytes:
        out = b""
        self.sock.settimeout(WAIT)
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "device end closed the connection"
            out += chunk
        return out

    def handshake(self) -> dict[str, int]:
        """The sequence of docs/uml-virtpci.md §4, in UML's order; returns what was offered."""
        self.send(Request.SET_OWNER)
        self.send(Request.GET_FEATURES)
        _r, flags, payload = self.reply()
        features = U64.get(payload, 0, "value")
        self.send(Request.GET_PROTOCOL_FEATURES)
        _r, _f, payload = self.reply()
        protocol = U64.get(payload, 0, "value")
        self.send(Request.SET_PROTOCOL_FEATURES, U64.pack(value=protocol & PROTOCOL_F_SLAVE_REQ))
        self.send(Request.SET_SLAVE_REQ_FD, fds=(self.slave[1].fileno(),))
        self.send(Request.SET_FEATURES, U64.pack(value=features))
        self.send(Request.SET_MEM_TABLE, encode_mem_table([dict(
            guest_addr=BASE, size=SIZE, user_addr=BASE, mmap_offset=BASE)]), (self.memfd,))
        for q, (desc, avail, used) in RINGS.items():
            self.send(Request.SET_VRING_CALL, U64.pack(value=q), (self.call[q][1],))
            self.send(Request.SET_VRING_NUM, VRING_STATE.pack(index=q, num=NUM))
            self.send(Request.SET_VRING_BASE, VRING_STATE.pack(index=q, num=0))
            self.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(
                index=q, desc=BASE + desc, used=BASE + used, avail=BASE + avail, log=2**64 - 1))
        for q in RINGS:
            self.send(Request.SET_VRING_KICK, U64.pack(value=q), (self.kick[q],))
            self.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(index=q, num=1))
        return {"flags": flags, "features": features, "protocol": protocol}

    # -- rings

    def buffer(self, data: bytes | int) -> int:
        """A buffer in shared memory holding `data` (or `data` zero bytes); its address."""
        raw = bytes(data) if isinstance(data, int) else data
        addr = self.next_buf
        self.mem[addr - 0:addr + len(raw)] = raw
        self.next_buf += (len(raw) + 63) & ~63
        return BASE + addr

    def offer(self, q: int, parts: list[tuple[int, int, bool]], *, kick: bool = True) -> int:
        """One chain of (address, length, device-writable) descriptors; returns its head."""
        desc, avail, _used = RINGS[q]
        ids = [(self.next_desc[q] + i) % NUM for i in range(len(parts))]
        self.next_desc[q] = (self.next_desc[q] + len(parts)) % NUM
        for i, (addr, length, writable) in enumerate(parts):
            flags = (DescFlag.WRITE if writable else 0) | (DescFlag.NEXT if i + 1 < len(parts)
                                                            else 0)
            DESC.pack_into(self.mem, desc + ids[i] * DESC.size, addr=addr, len=length,
                           flags=flags, next=ids[i + 1] if i + 1 < len(parts) else 0)
        slot = self.avail_idx[q] % NUM
        struct.pack_into("<H", self.mem, avail + 4 + 2 * slot, ids[0])
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, avail + 2, self.avail_idx[q])
        if kick:
            os.eventfd_write(self.kick[q], 1)
        return ids[0]

    def used_idx(self, q: int) -> int:
        return int(struct.unpack_from("<H", self.mem, RINGS[q][2] + 2)[0])

    def take_used(self, q: int) -> tuple[int, int]:
        """The next used entry (id, len), waiting for it."""
        until(lambda: self.used_idx(q) != self.used_seen[q], WAIT, f"a used entry on queue {q}")
        slot = self.used_seen[q] % NUM
        entry = USED_ELEM.unpack(self.mem, RINGS[q][2] + 4 + USED_ELEM.size * slot)
        self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        return int(entry["id"]), int(entry["len"])

    def command(self, op: int, bar: int, size: int, addr: int, data: bytes = b"",
                reply: int = 0) -> bytes:
        """One virt-pci message on queue 0; for reads, the answer."""
        msg = self.buffer(encode_msg(op, bar, size, addr, data))
        parts = [(msg, 16 + len(data), False)]
        out = self.buffer(reply) if reply else 0
        if reply:
            parts.append((out, reply, True))
        head = self.offer(0, parts)
        got, length = self.take_used(0)
        assert got == head
        return bytes(self.mem[out - BASE:out - BASE + length]) if reply else b""

    def cfg_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.command(Op.CFG_READ, 0, size, off, reply=8)[:size], "little")

    def cfg_write(self, off: int, size: int, value: int) -> None:
        self.command(Op.CFG_WRITE, 0, size, off, value.to_bytes(size, "little"))

    def mmio_read(self, bar: int, off: int, size: int) -> bytes:
        return self.command(Op.MMIO_READ, bar, size, off, reply=size)

    def mmio_write(self, bar: int, off: int, data: bytes) -> None:
        self.command(Op.MMIO_WRITE, bar, len(data), off, data)

    def post_irq_buffers(self, n: int) -> list[int]:
        return [self.offer(1, [(self.buffer(20), 20, True)]) for _ in range(n)]

    def calls(self, q: int) -> int:
        """Wake-ups the device sent on queue q's call pipe (8 bytes each)."""
        os.set_blocking(self.call[q][0], False)
        try:
            return len(os.read(self.call[q][0], 4096)) // 8
        except BlockingIOError:
            return 0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VirtPciBus, VirtPciServer, Path]]:
    bus = VirtPciBus()
    server = VirtPciServer(bus, tmp_path / "virtpci.sock")
    server.start()
    try:
        yield bus, server, tmp_path / "virtpci.sock"
    finally:
        server.stop()
        bus.close()


@pytest.fixture
def front(served: tuple[VirtPciBus, VirtPciServer, Path]) -> Iterator[FakeFrontEnd]:
    fe = FakeFrontEnd(served[2])
    try:
        yield fe
    finally:
        fe.close()


def ready(fe: FakeFrontEnd, server: VirtPciServer) -> None:
    fe.handshake()
    until(lambda: server.end is not None and set(server.end.queues) == {0, 1}, WAIT,
          "both queues started")


def test_handshake_sequence_offers_what_uml_needs(served: tuple[VirtPciBus, VirtPciServer,
                                                                Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    offered = front.handshake()
    assert offered["flags"] == 0x5  # version 1 | reply
    assert offered["features"] == DEVICE_FEATURES
    assert offered["features"] & (1 << 32) and offered["features"] & (1 << 30)
    assert offered["protocol"] == DEVICE_PROTOCOL_FEATURES
    assert offered["protocol"] & PROTOCOL_F_SLAVE_REQ  # virtio_uml needs it for its irq
    until(lambda: server.end is not None and set(server.end.queues) == {0, 1}, WAIT,
          "both queues started")
    end = server.end
    assert end is not None
    assert end.session.owner and end.slave_fd is not None
    assert end.session.seen[:6] == [Request.SET_OWNER, Request.GET_FEATURES,
                                    Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
                                    Request.SET_SLAVE_REQ_FD, Request.SET_FEATURES]
    assert bus.dma.base_addr == BASE and bus.dma.size == SIZE
    assert bus.rejects.total == 0
    # teardown as UML does it: both rings disabled
    for q in RINGS:
        front.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(index=q, num=0))
    until(lambda: not end.queues, WAIT, "queues stopped")
    front.send(Request.GET_VRING_BASE, VRING_STATE.pack(index=0, num=0))
    req, _flags, payload = front.reply()
    assert req == Request.GET_VRING_BASE and VRING_STATE.unpack(payload) == {"index": 0, "num": 0}


def test_config_space_identity_and_bar_sizing(served: tuple[VirtPciBus, VirtPciServer, Path],
                                              front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    assert front.cfg_read(0x00, 4) == 0x7560_8086
    assert front.cfg_read(0x08, 4) == 0x0D40_0001  # class 0d4000, revision 1
    assert front.cfg_read(0x2C, 4) == 0x7560_8086  # subsystem
    assert front.cfg_read(0x06, 2) & 0x10  # capability list
    assert front.cfg_read(0x34, 1) == 0x40 and front.cfg_read(0x40, 1) == 0x05  # MSI
    assert front.cfg_read(0x100, 4) == 0xFFFFFFFF  # no extended config space
    # BAR sizing, as pci_read_bases does it: all-ones in, the size mask out
    for bar, size in ((0, 4096), (2, 256)):
        off = 0x10 + 4 * bar
        assert front.cfg_read(off, 4) == 0x4  # 64-bit memory, not prefetchable
        front.cfg_write(off, 4, 0xFFFFFFFF)
        front.cfg_write(off + 4, 4, 0xFFFFFFFF)
        assert front.cfg_read(off, 4) == (~(size - 1) & 0xFFFFFFF0) | 0x4
        assert front.cfg_read(off + 4, 4) == 0xFFFFFFFF
        front.cfg_write(off, 4, 0xF0000000 + bar * 0x800)
        front.cfg_write(off + 4, 4, 0)
        assert bus.config.bar_address(bar) == 0xF0000000 + bar * 0x800
    for unused in (0x20, 0x24, 0x30):  # BAR4, BAR5, expansion ROM
        front.cfg_write(unused, 4, 0xFFFFFFFF)
        assert front.cfg_read(unused, 4) == 0
    front.cfg_write(0x00, 4, 0)  # read-only identity
    assert front.cfg_read(0x00, 4) == 0x7560_8086
    front.cfg_write(0x04, 2, 0x0006)  # memory + bus master
    assert bus.config.memory_enabled
    assert bus.rejects.total == 0


def test_device_id_7360(tmp_path: Path) -> None:
    bus = VirtPciBus(PciId(0x8086, 0x7360))
    server = VirtPciServer(bus, tmp_path / "s")
    server.start()
    fe = FakeFrontEnd(tmp_path / "s")
    try:
        ready(fe, server)
        assert fe.cfg_read(0, 4) == 0x7360_8086
    finally:
        fe.close()
        server.stop()
        bus.close()


def test_mmio_read_answers_from_the_model_registers(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    model = DeviceModel(bus)  # power_on() writes the scratchpad
    stage = front.mmio_read(BAR2, SCRATCHPAD["exec_stage"].offset, 4)
    assert int.from_bytes(stage, "little") == ExecStage.RUN
    # the 58-byte chip info in one read, as iosm copies it
    chip = front.mmio_read(BAR2, SCRATCHPAD["chip_info"].offset, 58)
    assert chip[1] == 58 and chip[2:9] == b"XMM7560"
    assert model.ipc_state is IpcState.UNINIT
    assert bus.rejects.total == 0


def test_doorbell_write_reaches_the_model_and_msi_goes_out(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    end = server.end
    assert end is not None
    # the kernel programs MSI: address, data, then enable (what 6.1 wrote: 0xa0000/0x41/0x81)
    front.cfg_write(MSI_ADDR_LO, 4, 0x000A0000)
    front.cfg_write(MSI_ADDR_HI, 4, 0)
    front.cfg_write(MSI_DATA, 2, 0x0041)
    front.cfg_write(MSI_CTRL, 2, 0x0001)
    assert front.cfg_read(MSI_CTRL, 2) == 0x0081
    assert bus.config.msi_address == 0xA0000 and bus.config.msi_data == 0x41
    heads = front.post_irq_buffers(4)

    async def body() -> None:
        model = DeviceModel(bus)
        async with model_running(model):
            # the host asks for IPC INIT through the doorbell register (a posted BAR0 write)
            front.mmio_write(BAR0, doorbell_offset(Doorbell.IPC), IpcState.INIT.to_bytes(4,
                                                                                        "little"))
            await until_async(lambda: model.ipc_state is IpcState.INIT, WAIT, "model in INIT")
            status = await asyncio.to_thread(front.mmio_read, BAR2,
                                             SCRATCHPAD["ipc_status"].offset, 4)
            assert int.from_bytes(status, "little") == IpcState.INIT
            model.crash()  # writes CRASH and raises the interrupt
            head, length = await asyncio.to_thread(front.take_used, 1)
            assert head == heads[0] and length == 20
    run(body())
    raw = None
    for h in heads[:1]:
        addr = DESC.get(front.mem, RINGS[1][0] + h * DESC.size, "addr")
        raw = bytes(front.mem[addr - BASE:addr - BASE + 20])
    assert raw is not None
    assert raw[0] == Op.MSI and struct.unpack_from("<I", raw, 4)[0] == 4
    assert struct.unpack_from("<I", raw, 16)[0] == 0x41  # the data the kernel programmed
    assert end.msi_sent == 1 and front.calls(1) >= 1
    assert bus.rejects.total == 0


def test_msi_waits_for_enable_and_for_a_buffer(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    end = server.end
    assert end is not None
    bus.notify()  # MSI disabled: nothing goes out
    until(lambda: end.msi_masked == 1, WAIT, "the masked MSI counted")
    front.cfg_write(MSI_DATA, 2, 0x0042)
    front.cfg_write(MSI_CTRL, 2, 0x0001)
    bus.notify()  # enabled, but no buffer posted yet: pending
    until(lambda: end.msi_pending, WAIT, "MSI pending")
    (head,) = front.post_irq_buffers(1)
    got, length = front.take_used(1)
    assert (got, length) == (head, 20) and end.msi_sent == 1


def test_descriptor_outside_memory_table_is_rejected_and_completed(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    head = front.offer(0, [(BASE + SIZE - 8, 16, False)])  # runs past the region
    assert front.take_used(0) == (head, 0)
    assert bus.rejects["vring_desc_addr"] == 1
    # other traffic is unaffected
    assert front.cfg_read(0, 2) == 0x8086


def test_bad_descriptor_index_and_loops_are_rejected(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    desc, avail, _used = RINGS[0]
    msg = front.buffer(encode_msg(Op.CFG_READ, 0, 4, 0))
    # a descriptor that links to itself
    DESC.pack_into(front.mem, desc + 10 * DESC.size, addr=msg, len=16, flags=DescFlag.NEXT,
                   next=10)
    # a head beyond the ring
    for head in (10, NUM + 3):
        slot = front.avail_idx[0] % NUM
        struct.pack_into("<H", front.mem, avail + 4 + 2 * slot, head)
        front.avail_idx[0] += 1
    struct.pack_into("<H", front.mem, avail + 2, front.avail_idx[0])
    os.eventfd_write(front.kick[0], 1)
    assert front.take_used(0) == (10, 0)  # the loop is completed empty
    until(lambda: bus.rejects["vring_desc"] == 2, WAIT, lambda: bus.rejects.as_dict())
    front.next_desc[0] = 11
    assert front.cfg_read(0, 2) == 0x8086


def test_avail_index_running_past_the_ring_breaks_only_that_queue(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    struct.pack_into("<H", front.mem, RINGS[0][1] + 2, NUM + 5)
    os.eventfd_write(front.kick[0], 1)
    until(lambda: bus.rejects["vring_avail_idx"] == 1, WAIT, lambda: bus.rejects.as_dict())
    end = server.end
    assert end is not None and end.queues[0].broken and not end.queues[1].broken


def test_bad_pcidev_messages_are_rejected(served: tuple[VirtPciBus, VirtPciServer, Path],
                                          front: FakeFrontEnd) -> None:
    bus, server, _ = served
    ready(front, server)
    short = front.buffer(b"\x01\x00\x00")
    head = front.offer(0, [(short, 3, False), (front.buffer(8), 8, True)])
    assert front.take_used(0) == (head, 0)
    assert bus.rejects["pcidev_short"] == 1
    assert front.mmio_read(BAR2, 0xFC, 8) == b"\xff" * 8  # crosses the end of BAR2
    assert bus.rejects["pcidev_mmio"] == 1
    assert front.mmio_read(4, 0, 4) == b"\xff" * 4  # no BAR4
    assert bus.rejects["pcidev_bar"] == 1
    front.command(9, 0, 4, 0)
    assert bus.rejects["pcidev_op"] == 1
    front.command(Op.CFG_READ, 0, 3, 0, reply=8)
    assert bus.rejects["pcidev_cfg"] == 1
    assert front.cfg_read(0, 2) == 0x8086


def test_truncated_vhost_message_is_rejected(served: tuple[VirtPciBus, VirtPciServer, Path],
                                             front: FakeFrontEnd) -> None:
    bus, server, _ = served
    front.sock.sendall(HEADER.pack(request=Request.SET_FEATURES, flags=1, size=8) + b"\x01\x02")
    until(lambda: server.end is not None, WAIT, "connection accepted")
    front.sock.shutdown(socket.SHUT_WR)
    until(lambda: bus.rejects["vhost_truncated"] == 1, WAIT, lambda: bus.rejects.as_dict())
    # the next front end is served from scratch
    again = FakeFrontEnd(served[2])
    try:
        ready(again, server)
        assert again.cfg_read(0, 2) == 0x8086
    finally:
        again.close()


def test_vhost_messages_that_cannot_be_used_are_rejected(
        served: tuple[VirtPciBus, VirtPciServer, Path], front: FakeFrontEnd) -> None:
    bus, server, _ = served
    front.send(Request.SET_VRING_NUM, VRING_STATE.pack(index=5, num=256))
    front.send(Request.SET_VRING_NUM, VRING_STATE.pack(index=0, num=100))  # not a power of 2
    front.send(Request.SET_FEATURES, b"\x00")  # short payload
    front.send(99)
    front.send(Request.SET_VRING_KICK, U64.pack(value=0))  # says an fd comes; none does
    front.send(Request.SET_VRING_CALL, U64.pack(value=0 | VRING_NOFD))  # fine: no fd
    front.send(Request.SET_MEM_TABLE, encode_mem_table([]))
    until(lambda: bus.rejects.total >= 6, WAIT, lambda: bus.rejects.as_dict())
    assert bus.rejects["vhost_queue"] == 1
    assert bus.rejects["vhost_vring"] == 1
    assert bus.rejects["vhost_short"] == 1
    assert bus.rejects["vhost_request"] == 1
    assert bus.rejects["vhost_fds"] == 1
    assert bus.rejects["vhost_mem_table"] == 1
    # an oversized header breaks the stream: the connection is dropped, the server goes on
    front.sock.sendall(HEADER.pack(request=1, flags=1, size=1 << 20))
    until(lambda: bus.rejects["vhost_size"] == 1, WAIT, lambda: bus.rejects.as_dict())
    until(lambda: server.end is None, WAIT, "connection dropped")


def test_modem_command_serves_the_model_as_virtpci_function(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    sock = tmp_path / "modem.sock"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "iosm-cuse"), "modem", "--virtpci",
                             str(sock), "--mux", "aggregation", "--caps", "200300",
                             "--pci-id", "8086:7360"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    fe = None
    try:
        until(lambda: sock.exists() or proc.poll() is not None, 20, "the socket bound")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        fe = FakeFrontEnd(sock)
        fe.handshake()
        assert fe.cfg_read(0, 4) == 0x7360_8086
        caps = fe.mmio_read(BAR2, SCRATCHPAD["cp_capabilities"].offset, 4)
        assert int.from_bytes(caps, "little") == 0x200300
    finally:
        if fe is not None:
            fe.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert b"serving" in out
