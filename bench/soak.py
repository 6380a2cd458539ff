"""Soak: minutes of mixed load against a real `iosm-cuse up`, and whether it stays flat.

    sudo .venv/bin/python bench/soak.py [--minutes 30] [--json]

What runs, all at once, after a warm-up that goes through each disturbance once:
- `iosm-cuse up --device sim --transport pty --gateway netns:GW` in a network namespace of its
  own (the PTY port: this host has no CUSE), with links wwan0, wwan0-1 ... wwan0-7, each
  MBIM-connected (mbimcli) and addressed as --query-ip-configuration says;
- traffic on all 8 sessions: a bounded UDP load (--rate datagrams/s per session, --size bytes)
  from the daemon's namespace to an echo server in the gateway namespace, each datagram stamped
  with its send time, so every loss is placed in time;
- MBIM transactions: one mbimcli query every --mbim-every seconds through the port;
- link flaps every --flap-every seconds, one link at a time (wwan0-1 ... wwan0-7 in turn),
  alternately `iosm-cuse link del` + `link add` and `ip link set down` + `up`;
- a model crash every --crash-every seconds: SIGKILL of the model process; the daemon restarts
  it, the bench reconnects the 8 sessions (attach, connect) as a connection manager would.

Reported, for the daemon and the model process: RSS, open descriptors and asyncio tasks (from
`iosm-cuse status --json`) at start (after the warm-up) and at the end, each taken at a quiet
moment (no flap, crash or mbimcli under way; traffic running); per crash the recovery times
(model running again, sessions reconnected, traffic on every session again); the errors seen.
An error is expected when it falls inside a disturbance it belongs to (traffic of a session
while its link flaps, anything while the model is down and reconnecting): those are counted
by kind. Everything else is unexpected and listed: a failed query, CLI call or flap step,
a datagram lost outside a disturbance, a daemon log line that no disturbance explains, a
recovery that did not complete, an unclean daemon exit.

Every namespace is created here and removed at the end; traffic stays inside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iosm_cuse import control
from iosm_cuse.sim.config import ModemConfig

TAG = f"{os.getpid() % 100000}"
DAEMON_NS = f"iosmsoak{TAG}"
GW_NS = f"iosmsoak-gw{TAG}"
SESSIONS = range(8)
UDP_PORT = 7709
IOSM_CUSE = str(Path(sys.executable).parent / "iosm-cuse")
READY = re.compile(r"MBIM port (\S+) \(")

# A datagram: session, send time (CLOCK_MONOTONIC, shared by every namespace), then padding.
STAMP = struct.Struct("!Bd")
BUCKET_S = 0.1  # traffic is accounted in buckets of send time
ECHO_DEADLINE_S = 3.0  # a datagram not echoed within this is lost
STALL_S = 1.0  # a session with nothing echoed this long, undisturbed, has stalled
LEAD_S = 0.5  # datagrams sent this long before a disturbance may be in flight when it starts
QUERIES = ("--query-device-caps", "--query-subscriber-ready-status", "--query-radio-state",
           "--query-registration-state", "--query-signal-state", "--query-packet-service-state",
           "--query-packet-statistics", "--query-connection-state=0")
TIMEOUT_S = 30.0  # any one step (mbimcli, a CLI call, a recovery)

# Daemon log lines (stderr, no level) that a disturbance explains: pattern -> the kinds of
# window in which the line is expected. "start" is the bring-up, "stop" the SIGTERM at the end.
# Anything else, or one of these at another time, is an unexpected error.
EXPECTED_LOG: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = tuple(
    (re.compile(pattern), frozenset(kinds.split())) for pattern, kinds in (
        (r"^(MBIM|AT) port on a PTY: ", "start"),  # the AT ports too (docs/at-ports.md §1)
        (r"^CP version \S+, capabilities \S+: MUX ", "start crash"),
        (r"^link \S+: link id \d+, mtu \d+$", "start flap_del_add"),
        (r"^link \S+ \(link id \d+\) deleted$", "flap_del_add stop"),
        (r"^modem down: .*; restarting$", "crash"),
        (r"^modem running again \(restart \d+\)$", "crash"),
        # after a restart, until the bench has reconnected the sessions
        (r"gateway: dropped packets of session \d+: not connected", "start crash"),
        (r"gateway: TUN write failed: ", "start crash"),  # the new gateway TUN not up yet
        (r"^wwan0(-\d)?: TUN write failed: \[Errno 5\]", "flap_down_up"),  # EIO: link down
        (r"^MBIM over PTY: host message of \d+ bytes dropped: ", "crash"),  # a hung-up port
        (r"gateway: the MUX refused a downlink packet for session \d+",
         "crash flap_del_add flap_down_up"),  # an echo for a session whose link just went
        (r"^links: dropped a downlink packet for if_id \d+: no link", "crash flap_del_add"),
        # Packets the gateway namespace's own kernel sends out of the gateway TUN to no
        # session's address (IPv6 solicitations and multicast reports, presumably: they come
        # a handful per model restart, then now and then): not traffic of a session.
        (r"gateway: dropped downlink packets for an address of no connected session", "any"),
        (r"^SIGTERM: shutting down$", "stop"),
    ))
LOG_GRACE_S = 2.0  # a line may trail the end of the window that explains it


def link_name(n: int) -> str:
    return "wwan0" if n == 0 else f"wwan0-{n}"


def nsx(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


# ---- helper processes: the echo server (gateway namespace) and the load (daemon namespace) ----


HELPER_RCVBUF = 8 * 1024 * 1024
SO_RCVBUFFORCE = 33  # Linux's socket option (root may exceed rmem_max); not in the stubs


def udp_socket() -> socket.socket:
    """A UDP socket whose receive buffer outlasts a helper that waits for a CPU: the default
    (~90 datagrams of 1000 bytes, a tenth of a second of the whole load) overflowed on this
    shared 2-core machine and lost datagrams the data path had delivered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, HELPER_RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HELPER_RCVBUF)
    return sock


def serve_udp_echo(port: int) -> None:
    """Echo every datagram back to its sender until stdin closes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = udp_socket()
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)

        def on_readable() -> None:
            while True:
                try:
                    data, peer = sock.recvfrom(65536)
                except BlockingIOError:
                    return
                with contextlib.suppress(OSError):  # the gateway TUN is gone while it restarts
                    sock.sendto(data, peer)

        loop.add_reader(sock.fileno(), on_readable)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def serve_udp_load(rate: float, size: int, port: int) -> None:
    """`rate` datagrams/s per session from each session's address to its gateway's echo
    server; one JSON line per quarter second: the newest echoed send time per session ("live")
    and the buckets older than ECHO_DEADLINE_S ([session, bucket, sent, echoed, send errors,
    first echo's arrival]). Until stdin closes; then the remaining buckets."""
    config = ModemConfig()
    pad = b"\0" * max(0, size - STAMP.size)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        socks: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
        buckets: dict[tuple[int, int], list[float]] = {}
        live: dict[int, float] = {}

        def bucket(n: int, t: float) -> list[float]:
            return buckets.setdefault((n, int(t / BUCKET_S)), [0, 0, 0, 0.0])

        def on_readable(sock: socket.socket) -> None:
            now = time.monotonic()
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    return
                except OSError:
                    continue  # an ICMP error queued on the socket: read on
                if len(data) < STAMP.size:
                    continue
                n, sent = STAMP.unpack_from(data)
                b = bucket(n, sent)
                b[1] += 1
                b[3] = b[3] or now
                live[n] = max(live.get(n, 0.0), sent)

        for n in SESSIONS:
            ip = config.session_ip(n)
            sock = udp_socket()
            sock.bind((str(ip.ipv4.ip), 0))
            sock.setblocking(False)
            socks[n] = (sock, (str(ip.ipv4_gateway), port))
            loop.add_reader(sock.fileno(), on_readable, sock)

        stop = loop.run_in_executor(None, sys.stdin.read)
        period, report = 1.0 / rate, time.monotonic()
        tick = time.monotonic()
        while not stop.done():
            now = time.monotonic()
            for n, (sock, dst) in socks.items():
                b = bucket(n, now)
                try:
                    sock.sendto(STAMP.pack(n, now) + pad, dst)
                    b[0] += 1
                except OSError:  # the address or route is gone (link deleted or down)
                    b[2] += 1
            if now - report >= 0.25:
                report = now
                print(json.dumps({"now": now, "live": live, "buckets": _take_buckets(
                    buckets, now - ECHO_DEADLINE_S)}), flush=True)
            tick = max(tick + period, time.monotonic())  # late: skip, never burst
            await asyncio.sleep(tick - time.monotonic())
        await asyncio.sleep(ECHO_DEADLINE_S)
        print(json.dumps({"now": time.monotonic(), "live": live,
                          "buckets": _take_buckets(buckets, float("inf"))}), flush=True)

    asyncio.run(main())


def _take_buckets(buckets: dict[tuple[int, int], list[float]], before: float) -> list[list[float]]:
    done = [k for k in buckets if (k[1] + 1) * BUCKET_S <= before]
    return [[k[0], k[1], *buckets.pop(k)] for k in sorted(done)]


def progress(t0: float, text: str) -> None:
    """One line on stderr as the run goes (the figures go to stdout at the end)."""
    print(f"soak {time.monotonic() - t0:7.1f}s {text}", file=sys.stderr, flush=True)


# ---- the soak itself ---------------------------------------------------------------------------


@dataclass
class Window:
    """A disturbance: the sessions it may cost traffic, from start - LEAD_S to its end."""

    kind: str
    sessions: frozenset[int]
    start: float
    end: float = float("inf")

    def covers(self, n: int, t: float) -> bool:
        return n in self.sessions and self.start - LEAD_S <= t <= self.end


@dataclass
class Errors:
    expected: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str, expected: bool, t0: float) -> None:
        if not expected:
            progress(t0, f"UNEXPECTED {kind}: {detail}")
        if expected:
            self.expected[kind] = self.expected.get(kind, 0) + 1
        else:
            self.unexpected.append(f"{time.monotonic() - t0:.1f}s {kind}: {detail}")


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.env = {**os.environ, control.RUN_DIR_ENV: str(tmp / "run"),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop(control.SOCKET_ENV, None)
        self.socket = tmp / "run" / "wwan0.sock"
        self.daemon: asyncio.subprocess.Process | None = None
        self.port = ""
        self.load: asyncio.subprocess.Process | None = None
        self.echo: asyncio.subprocess.Process | None = None
        self.live: dict[int, float] = {}
        self.buckets: list[list[float]] = []
        self.windows: list[Window] = []
        self.errors = Errors()
        self.t0 = time.monotonic()
        self.port_lock = asyncio.Lock()  # one MBIM client at a time on the PTY's byte stream
        self.disturb_lock = asyncio.Lock()  # one crash or flap at a time
        self.mbim_ok = 0
        self.flaps: dict[str, int] = {"del_add": 0, "down_up": 0}
        self.flap_next = 1
        self.recoveries: list[dict[str, Any]] = []
        self.log: list[tuple[float, str]] = []
        self.rcvbuf_errors: dict[str, int | None] = {}
        self.log_reader: asyncio.Future[None] | None = None

    # -- running commands

    async def run(self, *argv: str, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, env=self.env)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, f"timed out after {timeout} s"
        return proc.returncode or 0, out.decode(errors="replace").strip()

    async def must(self, *argv: str) -> str:
        rc, out = await self.run(*argv)
        if rc != 0:
            raise RuntimeError(f"{' '.join(argv)}: rc {rc}: {out}")
        return out

    async def step(self, kind: str, *argv: str) -> bool:
        """A step that must work whatever else is going on: a failure is unexpected."""
        rc, out = await self.run(*argv)
        if rc != 0:
            self.errors.add(kind, f"{' '.join(argv[-6:])}: rc {rc}: {out[-300:]}", False,
                            self.t0)
        return rc == 0

    async def status(self) -> dict[str, Any]:
        st: dict[str, Any] = await asyncio.to_thread(control.call, self.socket, "status")
        return st

    # -- bring-up

    async def start(self) -> None:
        for ns in (DAEMON_NS, GW_NS):
            await self.must("ip", "netns", "add", ns)
            await self.must("ip", "-n", ns, "link", "set", "lo", "up")
        for key in ("all", "default"):  # no router solicitations: only our traffic moves
            await self.must(*nsx(DAEMON_NS, "sysctl", "-q", "-w",
                                 f"net.ipv6.conf.{key}.disable_ipv6=1"))
        self.windows.append(Window("start", frozenset(SESSIONS), time.monotonic()))
        self.daemon = await asyncio.create_subprocess_exec(
            *nsx(DAEMON_NS, IOSM_CUSE, "up", "--device", "sim", "--transport", "pty",
                 "--gateway", f"netns:{GW_NS}"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env)
        self.log_reader = asyncio.ensure_future(self.read_log())
        assert self.daemon.stdout is not None
        line = (await asyncio.wait_for(self.daemon.stdout.readline(), TIMEOUT_S)).decode()
        m = READY.search(line)
        if not m:
            raise RuntimeError(f"no ready line: {line!r}: {self.daemon_log()[-2000:]}")
        self.port = m.group(1)
        for n in SESSIONS[1:]:
            await self.must(IOSM_CUSE, "link", "add", "dev", link_name(n), "parentdev-name",
                            "wwan0", "type", "wwan", "linkid", str(n))
        await self.connect_sessions(must=True)
        for n in SESSIONS:
            await self.must("ip", "-n", DAEMON_NS, "addr", "add",
                            str(ModemConfig().session_ip(n).ipv4), "dev", link_name(n))
            await self.must("ip", "-n", DAEMON_NS, "link", "set", link_name(n), "up")
        self.echo = await self.helper(GW_NS, "--udp-echo")
        assert self.echo.stdout is not None
        ready = await asyncio.wait_for(self.echo.stdout.readline(), TIMEOUT_S)
        if ready.strip() != b"ready":
            raise RuntimeError(f"echo server: {ready!r}")
        self.load = await self.helper(DAEMON_NS, "--udp-load")

    async def read_log(self) -> None:
        """The daemon's (and its model's) log lines, each with the time it arrived."""
        assert self.daemon is not None and self.daemon.stderr is not None
        while line := await self.daemon.stderr.readline():
            self.log.append((time.monotonic(), line.decode(errors="replace").rstrip("\n")))

    async def helper(self, ns: str, mode: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *nsx(ns, sys.executable, __file__, mode, "--rate", str(self.args.rate), "--size",
                 str(self.args.size)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=self.env)

    async def connect_sessions(self, must: bool = False, rec: dict[str, Any] | None = None
                               ) -> bool:
        """Attach and connect sessions 0-7 (after the start and after every model restart),
        as a connection manager would; True when every step worked (each gets 3 tries: the
        first commands after a restart may meet a port that is still reopening)."""
        steps = [["--attach-packet-service"]] + [
            [f"--connect=session-id={n},access-string=internet,ip-type=ipv4"] for n in SESSIONS]
        ok = True
        waiting = time.monotonic()
        async with self.port_lock:
            if rec is not None:  # an mbimcli query the crash caught may still hold the port
                rec["port_wait_s"] = round(time.monotonic() - waiting, 3)
            for step in steps:
                for attempt in range(3):
                    rc, out = await self.run("mbimcli", "-d", self.port, *step)
                    if rc == 0:
                        break
                    if must and attempt == 2:
                        raise RuntimeError(f"mbimcli {step}: {out}")
                    self.errors.add("reconnect_retry", f"mbimcli {step[0]}: {out[-200:]}",
                                    attempt < 2, self.t0)
                    progress(self.t0, f"reconnect: mbimcli {step[0]} failed: {out[-200:]}")
                    await asyncio.sleep(0.5)
                else:
                    ok = False
        return ok

    # -- the load's reports

    async def read_load(self) -> None:
        assert self.load is not None and self.load.stdout is not None
        while line := await self.load.stdout.readline():
            msg = json.loads(line)
            self.live = {int(k): v for k, v in msg["live"].items()}
            self.buckets.extend(msg["buckets"])

    async def traffic_since(self, sessions: frozenset[int], since: float,
                            timeout: float = TIMEOUT_S) -> float | None:
        """Wait until each session had a datagram sent after `since` echoed; when that was
        seen (None: not within `timeout`)."""
        deadline = time.monotonic() + timeout
        while any(self.live.get(n, 0.0) <= since for n in sessions):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return time.monotonic()

    # -- the actors

    async def mbim_queries(self) -> None:
        i = 0
        while True:
            await asyncio.sleep(self.args.mbim_every)
            query = QUERIES[i % len(QUERIES)]
            i += 1
            async with self.port_lock:
                t = time.monotonic()
                rc, out = await self.run("mbimcli", "-d", self.port, query)
            if rc == 0:
                self.mbim_ok += 1
            else:
                crash = any(w.kind == "crash" and w.start - LEAD_S <= time.monotonic()
                            and t <= w.end for w in self.windows)
                self.errors.add("mbim_query_during_crash" if crash else "mbim_query",
                                f"{query}: rc {rc}: {out[-200:]}", crash, self.t0)

    async def flapper(self) -> None:
        while True:
            await asyncio.sleep(self.args.flap_every)
            async with self.disturb_lock:
                await self.flap()

    async def flap(self, how: str | None = None) -> None:
        n = self.flap_next
        self.flap_next = n % 7 + 1
        how = how or ("del_add" if sum(self.flaps.values()) % 2 == 0 else "down_up")
        name = link_name(n)
        window = Window(f"flap_{how}", frozenset({n}), time.monotonic())
        self.windows.append(window)
        if how == "del_add":
            ok = (await self.step("flap", IOSM_CUSE, "link", "del", "dev", name)
                  and await self.step("flap", IOSM_CUSE, "link", "add", "dev", name,
                                      "parentdev-name", "wwan0", "type", "wwan", "linkid",
                                      str(n))
                  and await self.step("flap", "ip", "-n", DAEMON_NS, "addr", "add",
                                      str(ModemConfig().session_ip(n).ipv4), "dev", name))
        else:
            ok = await self.step("flap", "ip", "-n", DAEMON_NS, "link", "set", name, "down")
            await asyncio.sleep(0.5)
        ok = ok and await self.step("flap", "ip", "-n", DAEMON_NS, "link", "set", name, "up")
        done = time.monotonic()
        back = await self.traffic_since(frozenset({n}), done) if ok else None
        window.end = back if back is not None else time.monotonic()
        if ok and back is None:
            self.errors.add("flap", f"no traffic on {name} {TIMEOUT_S} s after the flap", False,
                            self.t0)
        self.flaps[how] += 1
        progress(self.t0, f"flap {how} {name}: traffic back after "
                          f"{window.end - window.start:.2f} s")

    async def crash(self) -> None:
        async with self.disturb_lock:
            before = await self.status()
            pid, restarts = before["modem"]["pid"], before["modem"]["restarts"]
            kill = time.monotonic()
            window = Window("crash", frozenset(SESSIONS), kill)
            self.windows.append(window)
            os.kill(pid, signal.SIGKILL)
            rec: dict[str, Any] = {"at_s": round(kill - self.t0, 1), "model_back_s": None,
                                   "port_wait_s": None, "reconnected_s": None,
                                   "traffic_back_s": None, "completed": False}
            self.recoveries.append(rec)
            deadline = kill + TIMEOUT_S
            while time.monotonic() < deadline:
                st = await self.status()
                m = st["modem"]
                if m["restarts"] > restarts and m["ipc_state"] == "RUNNING" and m["pid"] != pid:
                    rec["model_back_s"] = round(time.monotonic() - kill, 3)
                    break
                await asyncio.sleep(0.02)
            else:
                window.end = time.monotonic()
                self.errors.add("recovery", f"model not running {TIMEOUT_S} s after SIGKILL",
                                False, self.t0)
                return
            if not await self.connect_sessions(rec=rec):
                window.end = time.monotonic()
                self.errors.add("recovery", "sessions not reconnected", False, self.t0)
                return
            rec["reconnected_s"] = round(time.monotonic() - kill, 3)
            back = await self.traffic_since(frozenset(SESSIONS), kill)
            window.end = back if back is not None else time.monotonic()
            if back is None:
                self.errors.add("recovery", "traffic did not come back on every session",
                                False, self.t0)
                return
            rec["completed"] = True
            progress(self.t0, f"crash: {rec}")

    async def quiet_snapshot(self) -> dict[str, Any]:
        """Both processes' figures while nothing but traffic runs (no flap, crash or mbimcli),
        through the CLI a user would ask."""
        async with self.disturb_lock, self.port_lock:
            await asyncio.sleep(1.0)
            out = await self.must(IOSM_CUSE, "status", "--json")
        st = json.loads(out)
        progress(self.t0, f"snapshot: daemon {st['process']}, model {st['modem']['process']}")
        return {"daemon": st["process"], "model": st["modem"]["process"],
                "daemon_errors": {k: v for k, v in st["errors"].items() if v},
                "model_pid": st["modem"]["pid"], "restarts": st["modem"]["restarts"],
                "t_s": round(time.monotonic() - self.t0, 1)}

    # -- the whole run

    async def soak(self) -> dict[str, Any]:
        await self.start()
        reader = asyncio.ensure_future(self.read_load())
        if await self.traffic_since(frozenset(SESSIONS), time.monotonic()) is None:
            raise RuntimeError("no traffic on every session after the start")
        self.windows[0].end = time.monotonic()
        queries = asyncio.ensure_future(self.mbim_queries())
        actors: list[asyncio.Future[None]] = [queries]
        try:
            # Warm-up: each disturbance once, then a while of the steady mix.
            await self.crash()
            async with self.disturb_lock:
                await self.flap("del_add")
                await self.flap("down_up")
            await asyncio.sleep(self.args.warmup)
            start = await self.quiet_snapshot()
            measured_from = time.monotonic()
            actors.append(asyncio.ensure_future(self.flapper()))
            duration = self.args.minutes * 60
            crash_every = self.args.crash_every or min(180.0, max(30.0, duration / 3))
            next_crash = measured_from + crash_every / 2
            end_at = measured_from + duration
            while time.monotonic() < end_at:
                if self.daemon is not None and self.daemon.returncode is not None:
                    raise RuntimeError(f"the daemon exited: {self.daemon_log()[-2000:]}")
                if time.monotonic() >= next_crash and next_crash + 10 < end_at:
                    await self.crash()
                    next_crash += crash_every
                await asyncio.sleep(0.2)
            end = await self.quiet_snapshot()
        finally:
            for a in actors:
                a.cancel()
            await asyncio.gather(*actors, return_exceptions=True)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await self.stop_load()
        return self.result(start, end, measured_from)

    async def stop_load(self) -> None:
        """Close the load's stdin, read its last report, wait for it to exit."""
        load, self.load = self.load, None
        if load is None or load.stdin is None or load.stdout is None:
            return
        load.stdin.close()
        with contextlib.suppress(TimeoutError):
            while line := await asyncio.wait_for(load.stdout.readline(), ECHO_DEADLINE_S + 5):
                msg = json.loads(line)
                self.buckets.extend(msg["buckets"])
        await self.end_process(load)

    async def end_process(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def stop(self) -> int | None:
        """Everything down: helpers, the daemon (SIGTERM, as a user would), namespaces.
        Returns the daemon's exit status (None if it had to be killed). The namespaces go
        whatever failed before."""
        try:
            return await self.stop_processes()
        finally:
            for ns in (DAEMON_NS, GW_NS):
                with contextlib.suppress(Exception):
                    self.rcvbuf_errors[ns] = await self.udp_rcvbuf_errors(ns)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    async def stop_processes(self) -> int | None:
        with contextlib.suppress(Exception):  # a load that died already has nothing to say
            await self.stop_load()
        if self.echo is not None:
            if self.echo.stdin is not None:
                self.echo.stdin.close()
            await self.end_process(self.echo)
        code: int | None = None
        if self.daemon is not None:
            self.windows.append(Window("stop", frozenset(SESSIONS), time.monotonic()))
            if self.daemon.returncode is None:
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(self.daemon.wait(), 20)
                except TimeoutError:
                    self.daemon.kill()
                    await self.daemon.wait()
            else:
                code = self.daemon.returncode
            if self.log_reader is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.log_reader, 5)
        return code

    async def udp_rcvbuf_errors(self, ns: str) -> int | None:
        """Datagrams the kernel dropped at a full socket buffer in `ns` (the helpers' sockets
        are the only UDP sockets there): a loss of the bench, not of the data path."""
        rc, out = await self.run(*nsx(ns, "cat", "/proc/net/snmp"))
        rows = [line.split() for line in out.splitlines() if line.startswith("Udp:")]
        if rc != 0 or len(rows) < 2 or "RcvbufErrors" not in rows[0]:
            return None
        return int(rows[1][rows[0].index("RcvbufErrors")])

    def daemon_log(self) -> str:
        return "\n".join(line for _, line in self.log)

    # -- the figures

    def traffic(self, measured_from: float) -> dict[str, Any]:
        """Datagrams sent from the warm-up's end on, and where the lost ones were lost.

        UDP may lose a datagram on a loaded machine, so a loss no disturbance explains is a
        figure (with when it happened), not by itself an error; the errors are a session that
        stalls (STALL_S of its datagrams sent and none echoed) and a send refused, outside any
        disturbance of that session."""
        sent = echoed = lost_disturbed = send_errors_disturbed = lost_steady = 0
        episodes: list[str] = []
        per_session: dict[int, list[tuple[float, int, int, int]]] = {}
        for n, b, s, e, err, _ in self.buckets:
            t = (b + 0.5) * BUCKET_S
            if t >= measured_from:
                per_session.setdefault(int(n), []).append((t, int(s), int(e), int(err)))
        for n, rows in sorted(per_session.items()):
            stall: list[float] = []  # undisturbed buckets in a row with nothing echoed
            for t, s, e, err in sorted(rows):
                sent += s
                echoed += e
                if any(w.covers(n, t) for w in self.windows):
                    lost_disturbed += s - e
                    send_errors_disturbed += err
                    self.check_stall(n, stall)
                    continue
                lost_steady += s - e
                if s - e:
                    episodes.append(f"session {n}: {s - e} at {t - self.t0:.1f}s")
                if err:
                    self.errors.add("traffic", f"session {n}: {err} sends refused at "
                                               f"{t - self.t0:.1f}s outside any disturbance",
                                    False, self.t0)
                if s > 0 and e == 0:
                    stall.append(t)
                else:
                    self.check_stall(n, stall)
            self.check_stall(n, stall)
        if lost_disturbed:
            self.errors.expected["datagrams_lost_in_disturbances"] = lost_disturbed
        if send_errors_disturbed:
            self.errors.expected["sends_refused_in_disturbances"] = send_errors_disturbed
        return {"sent": sent, "echoed": echoed, "lost_in_disturbances": lost_disturbed,
                "send_errors_in_disturbances": send_errors_disturbed,
                "lost_outside_disturbances": lost_steady,
                "lost_outside_pct": round(lost_steady / sent * 100, 4) if sent else None,
                "lost_outside_where": episodes[:40],
                "rate_per_session": self.args.rate, "size": self.args.size}

    def check_stall(self, n: int, stall: list[float]) -> None:
        """Count a run of unechoed undisturbed buckets as a stall if it is long enough; the
        run is over either way."""
        if stall and stall[-1] - stall[0] + BUCKET_S >= STALL_S:
            self.errors.add("traffic", f"session {n} stalled: nothing echoed of what was sent "
                                       f"{stall[0] - self.t0:.1f}-{stall[-1] - self.t0:.1f}s, "
                                       "outside any disturbance", False, self.t0)
        stall.clear()

    def traffic_back(self) -> None:
        """Each crash's traffic_back_s, exactly: the first echo of a datagram sent after the
        SIGKILL, on the last session to get one."""
        for rec, w in zip(self.recoveries, [w for w in self.windows if w.kind == "crash"],
                          strict=True):
            if not rec["completed"]:
                continue
            firsts = []
            for n in SESSIONS:
                arrivals = [fr for m, b, _, e, _, fr in self.buckets
                            if int(m) == n and b * BUCKET_S >= w.start and e > 0]
                if arrivals:
                    firsts.append(min(arrivals))
            if len(firsts) == len(SESSIONS):
                rec["traffic_back_s"] = round(max(firsts) - w.start, 3)

    def log_errors(self) -> None:
        """Each daemon log line against the windows open when it arrived."""
        for t, line in self.log:
            text = line.removeprefix("iosm-cuse: ")
            open_kinds = {w.kind for w in self.windows
                          if w.start - LEAD_S <= t <= w.end + LOG_GRACE_S}
            kinds = next((k for pattern, k in EXPECTED_LOG if pattern.search(text)), None)
            if kinds is not None and (kinds & open_kinds or "any" in kinds):
                self.errors.add("daemon_log", text, True, self.t0)
            else:
                self.errors.add("daemon_log", f"at {t - self.t0:.1f}s: {text[:300]}", False,
                                self.t0)

    def result(self, start: dict[str, Any], end: dict[str, Any],
               measured_from: float) -> dict[str, Any]:
        self.traffic_back()
        traffic = self.traffic(measured_from)
        change: dict[str, dict[str, float | None]] = {}
        for proc in ("daemon", "model"):
            change[proc] = {}
            for k in ("rss_kb", "fds", "tasks"):
                a, b = (start[proc] or {}).get(k), (end[proc] or {}).get(k)
                change[proc][k] = round((b - a) / a * 100, 2) if a and b is not None else None
        flat = all(v is not None and abs(v) <= 5.0 for c in change.values() for v in c.values())
        return {
            "minutes": self.args.minutes, "start": start, "end": end, "change_pct": change,
            "flat_within_5pct": flat, "recoveries": self.recoveries,
            "recoveries_completed": all(r["completed"] for r in self.recoveries),
            "flaps": self.flaps, "mbim_queries_ok": self.mbim_ok, "traffic": traffic,
            "errors_expected": self.errors.expected,
            "errors_unexpected": self.errors.unexpected,
            "load_avg_1m": os.getloadavg()[0],
        }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iosm-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        try:
            result = await soak.soak()
        finally:
            code = await soak.stop()
            shutdown_log = soak.daemon_log()
        if code != 0:
            soak.errors.add("daemon_exit", f"exit status {code} after SIGTERM: "
                                           f"{shutdown_log[-500:]}", False, soak.t0)
        soak.log_errors()
        result["errors_unexpected"] = soak.errors.unexpected
        result["errors_expected"] = soak.errors.expected
        result["daemon_exit"] = code
        result["traffic"]["udp_rcvbuf_errors"] = {
            "daemon_ns": soak.rcvbuf_errors.get(DAEMON_NS), "gateway_ns":
            soak.rcvbuf_errors.get(GW_NS)}
        result["started"] = started
        result["wall_s"] = round(time.monotonic() - soak.t0, 1)
        if args.save:
            args.save.write_text(json.dumps({
                "t0": soak.t0, "result": result,
                "log": [[round(t - soak.t0, 3), line] for t, line in soak.log],
                "windows": [[w.kind, sorted(w.sessions), round(w.start - soak.t0, 3),
                             round(w.end - soak.t0, 3)] for w in soak.windows],
                "buckets": soak.buckets}))
        return result


def report(r: dict[str, Any]) -> str:
    lines = [f"soak: {r['minutes']} min measured after warm-up (started {r['started']}, "
             f"{r['wall_s']} s in all, load average {r['load_avg_1m']:.1f})"]
    for proc in ("daemon", "model"):
        s, e, c = r["start"][proc] or {}, r["end"][proc] or {}, r["change_pct"][proc]
        lines.append(f"  {proc:6}: " + ", ".join(
            f"{k} {s.get(k)} -> {e.get(k)} ({c[k]:+.1f} %)" if c[k] is not None
            else f"{k} {s.get(k)} -> {e.get(k)}" for k in ("rss_kb", "fds", "tasks")))
    lines.append(f"  flat within 5 %: {'yes' if r['flat_within_5pct'] else 'NO'}")
    for rec in r["recoveries"]:
        lines.append(f"  crash at {rec['at_s']} s: model back {rec['model_back_s']} s, "
                     f"reconnected {rec['reconnected_s']} s (of which waiting for the port "
                     f"{rec['port_wait_s']} s), traffic back "
                     f"{rec['traffic_back_s']} s{'' if rec['completed'] else ' (INCOMPLETE)'}")
    t = r["traffic"]
    lines.append(f"  traffic: {t['sent']} datagrams sent, {t['echoed']} echoed, "
                 f"{t['lost_in_disturbances']} lost in disturbances, "
                 f"{t['lost_outside_disturbances']} outside ({t['lost_outside_pct']} %)")
    lines.append(f"  flaps {r['flaps']}, MBIM queries answered {r['mbim_queries_ok']}")
    lines.append(f"  expected errors: {r['errors_expected'] or 'none'}")
    lines.append(f"  unexpected errors: {len(r['errors_unexpected'])}")
    lines += [f"    {e}" for e in r["errors_unexpected"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="measured time after the warm-up (fractions accepted)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of steady mix after the warm-up's crash and flaps")
    parser.add_argument("--crash-every", type=float, default=0.0,
                        help="seconds between model crashes (default: a third of the run, "
                             "30 s at least, 180 s at most)")
    parser.add_argument("--flap-every", type=float, default=15.0)
    parser.add_argument("--mbim-every", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="datagrams per second per session")
    parser.add_argument("--size", type=int, default=1000, help="datagram size in bytes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="also write the raw record (log lines, windows, traffic buckets, "
                             "times relative to the start) as JSON")
    parser.add_argument("--udp-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--udp-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.udp_echo:
        serve_udp_echo(UDP_PORT)
        return 0
    if args.udp_load:
        serve_udp_load(args.rate, args.size, UDP_PORT)
        return 0
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    result = asyncio.run(amain(args))
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
