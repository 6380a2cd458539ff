"""MBIM control transactions through the MBIM port, next to a bare PTY echo in the same run.

Port: `python -m iosm_cuse.port_alone --transport pty` in its own process (MbimFunction ->
MbimPort -> PtyTransport), and this process as the client: sequential BASIC_CONNECT
DEVICE_CAPS queries (write one COMMAND, read the whole COMMAND_DONE), as mbimcli does them.
Baseline: the same client against a minimal process that echoes a raw PTY's bytes back, so the
ratio shows what the port, the framing and the MBIM function cost over the PTY itself.
Also: the CUSE server in its own process behind a fake kernel on a seqpacket socketpair (WRITE +
parked READ per transaction; the host has no /dev/cuse, and the guest is too slow to measure).
startup_s: `iosm-cuse up --device sim --transport pty` until its ready line (null if it fails).

    .venv/bin/python bench/control.py [--seconds S] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from iosm_cuse.chardev import cuse
from iosm_cuse.mbim.cids import BasicConnect
from iosm_cuse.mbim.message import HEADER, Command, Open, decode_message, encode_message
from iosm_cuse.mbim.uuids import Service

READY_TIMEOUT = 30.0

# A raw PTY whose master echoes every byte back: the floor under any PTY transport.
ECHO_SERVER = r"""
import os, sys, tty
master, slave = os.openpty()
tty.setraw(slave)
link = sys.argv[1]
os.symlink(os.ttyname(slave), link)
print("ready", link, flush=True)
while True:
    data = os.read(master, 65536)
    os.write(master, data)
"""


def start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"{argv}: no ready line ({line!r})")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_message(fd: int, buf: bytearray) -> bytes:
    """One whole MBIM message from the stream (a PTY may split or join them)."""
    while True:
        if len(buf) >= HEADER.size:
            length = HEADER.unpack_from(buf)[1]
            if len(buf) >= length:
                msg = bytes(buf[:length])
                del buf[:length]
                return msg
        buf += os.read(fd, 65536)


def read_exact(fd: int, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        buf += os.read(fd, 65536)
    out = bytes(buf[:n])
    del buf[:n]
    return out


def transactions(link: Path, seconds: float, echo: bool) -> list[float]:
    """Sequential round trips for `seconds`; the latency of each, in seconds."""
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    buf = bytearray()
    lat: list[float] = []
    try:
        if not echo:
            os.write(fd, encode_message(Open(1, 4096)))
            decode_message(read_message(fd, buf))
        tid = 2
        end = time.perf_counter() + seconds
        while True:
            req = encode_message(Command(tid, Service.BASIC_CONNECT.value,
                                         BasicConnect.DEVICE_CAPS, 0))
            t0 = time.perf_counter()
            os.write(fd, req)
            reply = read_exact(fd, len(req), buf) if echo else read_message(fd, buf)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if not echo and decode_message(reply).tid != tid:
                raise RuntimeError(f"reply for another transaction: {reply[:12].hex()}")
            tid += 1
            if t1 > end:
                return lat
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process: CPU cost, much less disturbed by other load than latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(lat: list[float], server_cpu: float) -> dict[str, float]:
    q = statistics.quantiles(lat, n=100)
    return {"tps": len(lat) / sum(lat), "p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6,
            "n": len(lat), "server_cpu_us": server_cpu / len(lat) * 1e6}


def measure(argv: list[str], link: Path, seconds: float, echo: bool) -> dict[str, float]:
    proc = start(argv)
    try:
        transactions(link, min(0.3, seconds), echo)  # warm-up
        cpu0 = cpu_seconds(proc.pid)
        lat = transactions(link, seconds, echo)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
        link.unlink(missing_ok=True)
    return summary(lat, cpu)


def cuse_round_trips(seconds: float) -> dict[str, float]:
    """The CUSE server in its own process behind a fake kernel (this process) on a seqpacket
    socketpair: per transaction one WRITE (the COMMAND) and one READ (the COMMAND_DONE, parked
    until it arrives) - what the kernel sends for a blocking client of /dev/wwan0mbim0."""
    kernel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "iosm_cuse.port_alone", "--cuse-fd",
                             str(theirs.fileno())], pass_fds=[theirs.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    theirs.close()
    unique = 0

    def call(opcode: int, body: dict[str, int], data: bytes = b"") -> cuse.Reply:
        nonlocal unique
        unique += 2
        kernel.send(cuse.encode_request(opcode, unique, body, data))
        reply = cuse.decode_reply(kernel.recv(1 << 18))
        if reply.unique != unique or reply.error < 0:
            raise RuntimeError(f"CUSE reply {reply}")
        return reply

    try:
        call(cuse.Op.CUSE_INIT, {"major": 7, "minor": 38, "flags": 1})
        fh = cuse.LAYOUTS["open_out"].unpack(call(cuse.Op.OPEN, {"flags": os.O_RDWR}).body)["fh"]
        lat: list[float] = []

        def one(tid: int) -> bytes:
            req = encode_message(Command(tid, Service.BASIC_CONNECT.value,
                                         BasicConnect.DEVICE_CAPS, 0))
            call(cuse.Op.WRITE, {"fh": fh, "size": len(req)}, req)
            return call(cuse.Op.READ, {"fh": fh, "size": 4096}).body

        op = encode_message(Open(1, 4096))
        call(cuse.Op.WRITE, {"fh": fh, "size": len(op)}, op)
        call(cuse.Op.READ, {"fh": fh, "size": 4096})
        tid = 2
        end = time.perf_counter() + seconds
        cpu0 = cpu_seconds(proc.pid)
        while True:
            t0 = time.perf_counter()
            if decode_message(one(tid)).tid != tid:
                raise RuntimeError("reply for another transaction")
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            tid += 1
            if t1 > end:
                break
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        kernel.close()
        stop(proc)
    return summary(lat, cpu)


def startup() -> tuple[float | None, str | None]:
    """Seconds from starting `iosm-cuse up` to its ready line, or (None, why)."""
    exe = shutil.which("iosm-cuse") or str(Path(sys.executable).parent / "iosm-cuse")
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "up", "--device", "sim", "--transport", "pty"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        took = time.perf_counter() - t0
        if "ready" in line:
            return took, None
        proc.wait(5)
        return None, (proc.stderr.read().strip().splitlines() or ["no ready line"])[-1]
    except subprocess.TimeoutExpired:
        return None, "no ready line"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate port and echo this many times; medians are reported")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ports: list[dict[str, float]] = []
    minimal: list[dict[str, float]] = []
    echoes: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="iosm-bench-") as tmp:
        port_link, echo_link = Path(tmp, "wwan9mbim0"), Path(tmp, "echo")
        for _ in range(args.rounds):
            ports.append(measure([sys.executable, "-m", "iosm_cuse.port_alone", "--transport",
                                  "pty", "--link", str(port_link)], port_link, args.seconds,
                                 echo=False))
            # The same port with a trivial responder: what the port + PTY cost without the model.
            minimal.append(measure([sys.executable, "-m", "iosm_cuse.port_alone", "--transport",
                                    "pty", "--minimal", "--link", str(port_link)], port_link,
                                   args.seconds, echo=False))
            echoes.append(measure([sys.executable, "-c", ECHO_SERVER, str(echo_link)],
                                  echo_link, args.seconds, echo=True))
    port, echo, bare = median_of(ports), median_of(echoes), median_of(minimal)
    fake = median_of([cuse_round_trips(args.seconds) for _ in range(args.rounds)])
    startup_s, startup_error = startup()
    result: dict[str, Any] = {
        "tps": round(port["tps"]), "p50_us": round(port["p50_us"], 1),
        "p99_us": round(port["p99_us"], 1), "transactions": round(port["n"]),
        "server_cpu_us": round(port["server_cpu_us"], 1),
        "pty_echo_tps": round(echo["tps"]), "pty_echo_p50_us": round(echo["p50_us"], 1),
        "pty_echo_p99_us": round(echo["p99_us"], 1),
        "ratio_to_pty_echo": round(port["tps"] / echo["tps"], 3),
        "startup_s": None if startup_s is None else round(startup_s, 3),
        "startup_error": startup_error, "transport": "pty", "command": "DEVICE_CAPS query",
        "no_model_tps": round(bare["tps"]), "no_model_p50_us": round(bare["p50_us"], 1),
        "no_model_p99_us": round(bare["p99_us"], 1),
        "no_model_server_cpu_us": round(bare["server_cpu_us"], 1),
        "pty_echo_server_cpu_us": round(echo["server_cpu_us"], 1),
        "cuse_fake_kernel_tps": round(fake["tps"]), "cuse_fake_kernel_p50_us":
        round(fake["p50_us"], 1), "cuse_fake_kernel_p99_us": round(fake["p99_us"], 1),
        "cuse_fake_kernel_server_cpu_us": round(fake["server_cpu_us"], 1),
        "rounds": args.rounds, "load_avg_1m": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"MBIM port (pty): {result['tps']} transactions/s, p50 {result['p50_us']} us, "
              f"p99 {result['p99_us']} us, server CPU {result['server_cpu_us']} us/transaction "
              f"(median of {args.rounds} rounds)")
        print(f"same, no model:  {result['no_model_tps']} transactions/s, "
              f"p50 {result['no_model_p50_us']} us, p99 {result['no_model_p99_us']} us, "
              f"server CPU {result['no_model_server_cpu_us']} us")
        print(f"bare PTY echo:   {result['pty_echo_tps']} round trips/s, "
              f"p50 {result['pty_echo_p50_us']} us, p99 {result['pty_echo_p99_us']} us, "
              f"server CPU {result['pty_echo_server_cpu_us']} us")
        print(f"CUSE server behind a fake kernel: {result['cuse_fake_kernel_tps']} "
              f"transactions/s, p50 {result['cuse_fake_kernel_p50_us']} us, "
              f"p99 {result['cuse_fake_kernel_p99_us']} us, "
              f"server CPU {result['cuse_fake_kernel_server_cpu_us']} us")
        print(f"ratio port/echo: {result['ratio_to_pty_echo']}  "
              f"(load average {result['load_avg_1m']:.1f} on {os.cpu_count()} CPUs)")
        print(f"iosm-cuse up -> ready: "
              f"{result['startup_s'] if startup_s is not None else 'n/a: ' + str(startup_error)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
