"""Throughput of the IPC engine on channel 0 (UL, host -> modem model in another process, where
a sink function counts the transfers), next to a baseline measured in the same run: the same
messages through a plain Unix socketpair (SOCK_SEQPACKET, one message per send) between two
processes. The DL direction (a source function in the model) is measured too.

    .venv/bin/python bench/ipc.py [--count N] [--size BYTES] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model process imports us by name

from iosm_cuse.hw.engine import IpcEngine
from iosm_cuse.sim.device import DeviceModel, Send
from iosm_cuse.sim.process import ModelProcess


class Sink:
    """Counts UL transfers; after `n` of them sends one DL transfer with the byte count."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.send: Send | None = None

    def opened(self, send: Send) -> None:
        self.send, self.count, self.bytes = send, 0, 0

    def receive(self, data: bytes) -> None:
        self.count += 1
        self.bytes += len(data)
        if self.count == self.n and self.send is not None:
            self.send(b"%d %d" % (self.count, self.bytes))

    def closed(self) -> None:
        self.send = None


class Source:
    """Sends `n` DL transfers of `size` bytes as fast as the model's backlog takes them."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.msg = n, bytes(range(256)) * (size // 256) + bytes(size % 256)

    def opened(self, send: Send) -> None:
        self.send, self.sent = send, 0
        self.loop = asyncio.get_running_loop()
        self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        while self.sent < self.n:
            if not self.send(self.msg):
                self.loop.call_later(0.0005, self._pump)
                return
            self.sent += 1

    def receive(self, data: bytes) -> None:
        pass

    def closed(self) -> None:
        self.sent = self.n


def attach_sink(model: DeviceModel, options: dict[str, Any]) -> None:
    model.attach(0, Sink(int(options["n"])))


def attach_source(model: DeviceModel, options: dict[str, Any]) -> None:
    model.attach(0, Source(int(options["n"]), int(options["size"])))


async def bench_engine_dl(count: int, size: int) -> tuple[float, int]:
    mp = await ModelProcess.spawn(functions=f"{Path(__file__).stem}:attach_source",
                                  options={"n": count, "size": size})
    try:
        eng = IpcEngine(mp.bus)
        await eng.start()
        done = asyncio.get_running_loop().create_future()
        got = [0, 0]

        def receive(data: bytes) -> None:
            got[0] += 1
            got[1] += len(data)
            if got[0] == count:
                done.set_result(None)

        t0 = time.perf_counter()
        ch = await eng.open_channel(0, receive)
        await asyncio.wait_for(done, 120)
        elapsed = time.perf_counter() - t0
        await ch.close()
        await eng.stop()
        return elapsed, got[1]
    finally:
        await mp.close()


async def bench_engine(count: int, size: int) -> tuple[float, int]:
    mp = await ModelProcess.spawn(functions=f"{Path(__file__).stem}:attach_sink",
                                  options={"n": count})
    try:
        eng = IpcEngine(mp.bus)
        await eng.start()
        done = asyncio.get_running_loop().create_future()
        ch = await eng.open_channel(0, lambda b: done.done() or done.set_result(b))
        msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
        t0 = time.perf_counter()
        for _ in range(count):
            ch.send(msg)
            if ch.pending > 4000:
                await ch.drain()
        reply = await asyncio.wait_for(done, 120)
        elapsed = time.perf_counter() - t0
        n, nbytes = map(int, reply.split())
        if n != count or nbytes != count * size:
            raise SystemExit(f"sink saw {n} transfers / {nbytes} bytes, sent {count}")
        await ch.close()
        await eng.stop()
        return elapsed, nbytes
    finally:
        await mp.close()


def _socket_sink(sock: socket.socket, count: int) -> None:
    total = 0
    for _ in range(count):
        total += len(sock.recv(65536))
    sock.send(str(total).encode())


def bench_socketpair(count: int, size: int) -> tuple[float, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_socket_sink, args=(b, count))
    proc.start()
    b.close()
    msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
    t0 = time.perf_counter()
    for _ in range(count):
        a.send(msg)
    total = int(a.recv(64))
    elapsed = time.perf_counter() - t0
    proc.join()
    a.close()
    return elapsed, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1500, help="bytes per transfer (<= 2048)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.size <= 2048:
        ap.error("--size must be 1..2048 (channel 0 Lite buffers)")
    e_time, e_bytes = asyncio.run(bench_engine(args.count, args.size))
    d_time, d_bytes = asyncio.run(bench_engine_dl(args.count, args.size))
    s_time, s_bytes = bench_socketpair(args.count, args.size)
    res = {
        "count": args.count, "size": args.size,
        "msgs_per_s": args.count / e_time, "bytes_per_s": e_bytes / e_time,
        "socketpair_msgs_per_s": args.count / s_time, "socketpair_bytes_per_s": s_bytes / s_time,
        "dl_msgs_per_s": args.count / d_time, "dl_bytes_per_s": d_bytes / d_time,
    }
    res["ratio"] = res["bytes_per_s"] / res["socketpair_bytes_per_s"]
    if args.json:
        print(json.dumps(res))
    else:
        print(f"IPC engine, channel 0 UL, {args.count} x {args.size} B: "
              f"{res['msgs_per_s']:,.0f} msg/s, {res['bytes_per_s'] / 1e6:,.1f} MB/s")
        print(f"IPC engine, channel 0 DL, same load: "
              f"{res['dl_msgs_per_s']:,.0f} msg/s, {res['dl_bytes_per_s'] / 1e6:,.1f} MB/s")
        print(f"Unix socketpair baseline:            "
              f"{res['socketpair_msgs_per_s']:,.0f} msg/s, "
              f"{res['socketpair_bytes_per_s'] / 1e6:,.1f} MB/s")
        print(f"ratio engine UL / socketpair: {res['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
