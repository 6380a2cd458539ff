"""Data-path throughput, with its baselines measured in the same run (README.md, "Figures").

    sudo .venv/bin/python bench/data.py [--seconds 3] [--rounds 3] [--json]

Figures (iperf3 TCP, one stream unless said otherwise, client netns -> server netns):
- veth:        a veth pair between two namespaces: the kernel's limit.
- forwarder:   a bare Python TUN<->TUN forwarder (asyncio add_reader, drain until EAGAIN),
               in its own process: what Python can do at all.
- lite / aggregation: wwan-1 -> link manager + bridge -> host MUX -> IPC engine -> shared
               memory -> modem model process (device MUX -> gateway) -> gateway TUN. The
               daemon side runs in a child process (its RSS is the daemon figure).
- loopback:    the same without MUX and engine (LoopbackMux): the link layer and gateway alone.
- eight_sessions: 8 parallel iperf3 clients, one per link wwan-0..7, aggregate and spread,
               in every round (the round with the median aggregate is reported; "one" is
               the median single Lite stream).

Every namespace and device is created here and removed at the end. Traffic stays inside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TAG = f"{os.getpid() % 100000}"
BASE = f"wb{TAG}"
GW_NS = f"iosmb-gw{TAG}"


def sh(*argv: str, check: bool = True, timeout: float = 120) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def nsx(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    try:
        for n in names:
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        yield
    finally:
        for n in names:
            sh("ip", "netns", "del", n, check=False)


CC = "cubic"  # see iperf_many
OMIT = 1  # seconds of ramp-up left out of every figure


def iperf_many(pairs: list[tuple[str, str, str]], seconds: float,
               extra: tuple[str, ...] = (),
               window: Callable[[], Any] | None = None) -> list[float]:
    """Run one iperf3 client per (client_ns, server_ns, server_ip) at once; Gbit/s each.

    Every stream uses cubic (Linux's default; this host's default is BBR, whose flows keep
    unequal pacing rates for many seconds without a loss: with it 8 streams over one bottleneck
    measured a 50-80 % spread whatever the scheduler did) and leaves its first second out
    (slow start, and the clients start one after another). `window()` is called once when every
    stream is past that second and once when the first one ends (our own counters' window)."""
    servers, clients = [], []
    try:
        for i, (_, sns, ip) in enumerate(pairs):
            servers.append(subprocess.Popen(nsx(sns, "iperf3", "-s", "-1", "-B", ip, "-p",
                                                str(5301 + i)),
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for i, (cns, _, ip) in enumerate(pairs):
            clients.append(subprocess.Popen(nsx(cns, "iperf3", "-c", ip, "-p", str(5301 + i),
                                                "-J", "-t", str(seconds), "-O", str(OMIT),
                                                "-C", CC, *extra),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True))
        if window is not None:
            time.sleep(OMIT + 0.2)
            window()
            while all(c.poll() is None for c in clients):
                time.sleep(0.01)
            window()
        out = []
        for c in clients:
            stdout, _ = c.communicate(timeout=seconds + OMIT + 60)
            data = json.loads(stdout)
            if "error" in data:
                raise RuntimeError(f"iperf3: {data['error']}")
            out.append(data["end"]["sum_received"]["bits_per_second"] / 1e9)
        return out
    finally:
        for p in servers + clients:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


# ---- veth: the kernel's limit ---------------------------------------------------------------


def bench_veth(seconds: float) -> float:
    a, b = f"iosmb-va{TAG}", f"iosmb-vb{TAG}"
    with namespaces(a, b):
        sh("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        sh("ip", "-n", a, "addr", "add", "198.51.100.1/30", "dev", "va")
        sh("ip", "-n", b, "addr", "add", "198.51.100.2/30", "dev", "vb")
        sh("ip", "-n", a, "link", "set", "va", "up")
        sh("ip", "-n", b, "link", "set", "vb", "up")
        return iperf_many([(a, b, "198.51.100.2")], seconds)[0]


# ---- the bare Python forwarder --------------------------------------------------------------


def serve_forwarder(name_a: str, name_b: str) -> None:
    """Child process: two TUNs, packets copied both ways, drain until EAGAIN per wake-up."""
    from iosm_cuse.net.tun import Tun

    ta, tb = Tun.create(name_a), Tun.create(name_b)

    def pump(src: int, dst: int) -> None:
        while True:
            try:
                pkt = os.read(src, 65536)
            except BlockingIOError:
                return
            except OSError:            # the device went with its namespace: stop
                asyncio.get_running_loop().remove_reader(src)
                return
            with contextlib.suppress(OSError):
                os.write(dst, pkt)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(ta.fd, pump, ta.fd, tb.fd)
        loop.add_reader(tb.fd, pump, tb.fd, ta.fd)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def bench_forwarder(seconds: float) -> float:
    a, b = f"iosmb-fa{TAG}", f"iosmb-fb{TAG}"
    na, nb = f"fa{TAG}", f"fb{TAG}"
    child = subprocess.Popen([sys.executable, __file__, "--serve-forwarder", na, nb],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with namespaces(a, b):
            for ns, dev, mine, peer in ((a, na, "198.51.100.5", "198.51.100.6"),
                                        (b, nb, "198.51.100.6", "198.51.100.5")):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", mine, "peer", peer, "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
            return iperf_many([(a, b, "198.51.100.6")], seconds)[0]
    finally:
        child.kill()
        child.wait()


# ---- the data path ----------------------------------------------------------------------------


def serve_datapath(base: str, gw_ns: str, stack: str) -> None:
    """Child process = the daemon's data plane: LinkManager (8 links) over the host MUX and the
    IPC engine, the modem model (device MUX + gateway in the gateway netns) in its own process
    ("lite" / "aggregation"); or "loopback": LinkManager -> LoopbackMux -> Gateway all here.
    Commands on stdin, one JSON line per answer: "show" -> the links, "rss" -> VmRSS in kB
    (of this process: the daemon side; "model_rss_kb" is the model process's)."""
    from dataclasses import asdict

    from iosm_cuse.link.loopback import LoopbackMux
    from iosm_cuse.link.manager import LinkManager
    from iosm_cuse.sim.config import ModemConfig
    from iosm_cuse.sim.gateway import Gateway

    async def main() -> None:
        config = ModemConfig()
        model: Any = None
        engine: Any = None
        gateway: Gateway | None = None
        mux: Any
        if stack == "loopback":
            gateway = Gateway(config, f"netns:{gw_ns}", tun_name=f"g{base}")
            mux = LoopbackMux(uplink=gateway.uplink)
            gateway.downlink = mux.downlink
            await gateway.start()
            for n in range(8):
                gateway.session_changed(n, config.session_ip(n))
        else:
            from iosm_cuse.hw.engine import IpcEngine
            from iosm_cuse.hw.mux.host import MuxHost
            from iosm_cuse.sim.device import DeviceConfig
            from iosm_cuse.sim.process import ModelProcess

            model = await ModelProcess.spawn(
                functions="iosm_cuse.sim.assembly:assemble_data_path",
                config=asdict(DeviceConfig.for_mux(stack)),
                options={"gateway": f"netns:{gw_ns}", "tun_name": f"g{base}", "mux": stack,
                         "connect": list(range(8))})
            engine = IpcEngine(model.bus)
            await engine.start()
            mux = MuxHost(engine)
            for _ in range(100):
                if subprocess.run(["ip", "-n", gw_ns, "link", "show", f"g{base}"],
                                  capture_output=True).returncode == 0:
                    break
                await asyncio.sleep(0.1)
        links = LinkManager(mux, base, poll_interval=0.2)
        await links.start()
        for n in range(1, 8):
            await links.add(f"{base}-{n}", n)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"ready": True, "mux": stack}), flush=True)
        try:
            while line := (await reader.readline()).decode().strip():
                if line == "show":
                    print(json.dumps([i.as_dict() for i in links.show()]), flush=True)
                elif line == "mux":  # our own per-session counters (UL = tx, DL = rx)
                    st = mux.status() if hasattr(mux, "status") else {}
                    print(json.dumps({str(k): [v["tx_bytes"], v["rx_bytes"],
                                               v["tx_dropped_queue_full"]]
                                      for k, v in st.get("sessions", {}).items()}), flush=True)
                elif line == "rss":
                    out = {"rss_kb": _rss_kb("self")}
                    if model is not None and model.proc is not None:
                        out["model_rss_kb"] = _rss_kb(str(model.proc.pid))
                    print(json.dumps(out), flush=True)
        finally:
            await links.stop()
            if engine is not None:
                await engine.stop()
            if model is not None:
                await model.close()
            if gateway is not None:
                await gateway.close()

    asyncio.run(main())


def _rss_kb(pid: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))


class DatapathChild:
    def __init__(self, mux_mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-datapath", BASE, GW_NS,
                                      mux_mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        hello = json.loads(self.proc.stdout.readline())
        self.mux = hello["mux"]
        self.clients: dict[int, str] = {}

    def ask(self, what: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def setup_clients(self) -> None:
        from iosm_cuse.sim.config import ModemConfig

        config = ModemConfig()
        for n in range(8):
            ns = self.clients[n] = f"iosmb-c{n}-{TAG}"
            dev = BASE if n == 0 else f"{BASE}-{n}"
            ip = config.session_ip(n)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", str(ip.ipv4), "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        deadline = time.monotonic() + 10
        while any(ln["session"] != "open" for ln in self.ask("show")):
            if time.monotonic() > deadline:
                raise RuntimeError("sessions did not open")
            time.sleep(0.1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for ns in self.clients.values():
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "del", GW_NS, check=False)


def bench_datapath(mux_mode: str, seconds: float, eight: bool) -> dict[str, Any]:
    child = DatapathChild(mux_mode)
    try:
        child.setup_clients()
        gw = "10.99.{}.1"
        one = iperf_many([(child.clients[1], GW_NS, gw.format(1))], seconds)[0]
        out: dict[str, Any] = {"gbps": one, "mux": child.mux}
        if eight:
            snaps: list[tuple[float, Any]] = []
            each = iperf_many([(child.clients[n], GW_NS, gw.format(n)) for n in range(8)],
                              seconds,
                              window=lambda: snaps.append((time.monotonic(), child.ask("mux"))))
            (t0, before), (t1, after) = snaps
            dt = max(t1 - t0, 1e-3)
            out["eight"] = each
            # the same figure from the host MUX's own counters: UL bytes each session sent
            # while every stream was running, past its first second
            out["eight_mux"] = [(after[k][0] - before[k][0]) * 8 / dt / 1e9
                                for k in sorted(after, key=int) if k in before]
            out["eight_mux_drops"] = [after[k][2] - before[k][2]
                                      for k in sorted(after, key=int) if k in before]
            out.update(child.ask("rss"))
        return out
    finally:
        child.close()


def _spread(xs: list[float]) -> float:
    """(max - min) / max: 0 is a perfectly fair share."""
    return round((max(xs) - min(xs)) / max(max(xs), 1e-9), 3) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve-forwarder", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--serve-datapath", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_forwarder:
        serve_forwarder(*args.serve_forwarder)
        return
    if args.serve_datapath:
        serve_datapath(*args.serve_datapath)
        return
    if os.geteuid() != 0:
        sys.exit("bench/data.py: needs root (TUN devices, network namespaces)")
    t = args.seconds
    # Rounds interleave every figure, and each figure is the median of its rounds: on a shared
    # machine the load changes from one minute to the next, and ratios of runs made minutes
    # apart would measure that instead.
    runs: dict[str, list[Any]] = {"veth": [], "fwd": [], "lite": [], "aggr": [], "loop": []}
    for _ in range(args.rounds):
        runs["veth"].append(bench_veth(t))
        runs["fwd"].append(bench_forwarder(t))
        runs["lite"].append(bench_datapath("lite", t, eight=True))
        runs["aggr"].append(bench_datapath("aggregation", t, eight=False))
        runs["loop"].append(bench_datapath("loopback", t, eight=False))
    veth, fwd = statistics.median(runs["veth"]), statistics.median(runs["fwd"])
    # the 8-session figures of the round whose aggregate is the median one (RSS: that round's)
    by_eight = sorted(runs["lite"], key=lambda x: sum(x["eight"]))
    lite = dict(by_eight[len(by_eight) // 2],
                gbps=statistics.median(x["gbps"] for x in runs["lite"]))
    aggr = {"gbps": statistics.median(x["gbps"] for x in runs["aggr"])}
    loop = {"gbps": statistics.median(x["gbps"] for x in runs["loop"])}
    eight = lite["eight"]
    res = {
        "veth_gbps": round(veth, 3),
        "forwarder_gbps": round(fwd, 3),
        "lite_gbps": round(lite["gbps"], 3),
        "aggregation_gbps": round(aggr["gbps"], 3),
        "loopback_gbps": round(loop["gbps"], 3),
        "eight_sessions_gbps": round(sum(eight), 3),
        "eight_sessions_each_gbps": [round(x, 3) for x in eight],
        "eight_sessions_spread": round((max(eight) - min(eight)) / max(max(eight), 1e-9), 3),
        "eight_sessions_mux_each_gbps": [round(x, 3) for x in lite.get("eight_mux", [])],
        "eight_sessions_mux_spread": _spread(lite.get("eight_mux", [])),
        "eight_sessions_mux_drops": lite.get("eight_mux_drops", []),
        "lite_vs_forwarder": round(lite["gbps"] / fwd, 3),
        "aggregation_vs_forwarder": round(aggr["gbps"] / fwd, 3),
        "loopback_vs_forwarder": round(loop["gbps"] / fwd, 3),
        "forwarder_vs_veth": round(fwd / veth, 4),
        "eight_vs_one": round(sum(eight) / lite["gbps"], 3),
        "rss_mb": round(lite["rss_kb"] / 1024, 1),
        "model_rss_mb": round(lite.get("model_rss_kb", 0) / 1024, 1),
        "seconds": t,
        "rounds": args.rounds,
        "forwarder_runs_gbps": [round(x, 3) for x in runs["fwd"]],
        "lite_runs_gbps": [round(x["gbps"], 3) for x in runs["lite"]],
        "eight_sessions_runs_gbps": [round(sum(x["eight"]), 3) for x in runs["lite"]],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    if args.json:
        print(json.dumps(res))
        return
    print(f"veth (kernel limit)          {veth:7.3f} Gbit/s")
    print(f"bare Python forwarder        {fwd:7.3f} Gbit/s   {fwd / veth:6.1%} of veth")
    for name, fig in (("Lite", lite), ("Aggregation", aggr)):
        print(f"wwan-1 {name:12s} (engine) {fig['gbps']:7.3f} Gbit/s   "
              f"{fig['gbps'] / fwd:6.1%} of the forwarder (targets >= 80 %, >= 1 Gbit/s)")
    print(f"wwan-1 loopback MUX          {loop['gbps']:7.3f} Gbit/s   "
          f"{loop['gbps'] / fwd:6.1%} of the forwarder (link layer + gateway only)")
    print(f"8 sessions at once (Lite)    {sum(eight):7.3f} Gbit/s   {res['eight_vs_one']:.2f}x "
          f"one (target >= 1x); spread {res['eight_sessions_spread']:.0%} (target <= 10 %)")
    print(f"  each (iperf)               {' '.join(f'{x:.3f}' for x in eight)}")
    mux_each = res["eight_sessions_mux_each_gbps"]
    print(f"  each (host MUX tx counters) {' '.join(f'{x:.3f}' for x in mux_each)}; spread "
          f"{res['eight_sessions_mux_spread']:.0%}; queue drops {res['eight_sessions_mux_drops']}")
    print(f"daemon-side RSS              {res['rss_mb']:7.1f} MB with 8 sessions up "
          f"(target < 60); model process {res['model_rss_mb']:.1f} MB")
    print(f"load average during run      {' '.join(res['loadavg'])}")


if __name__ == "__main__":
    main()
