"""Memory and idle CPU per simulated modem, with 1, 4 and 8 modems running at once.

Each modem is one `iosm-cuse up --device sim --transport pty --modemmanager off` (the daemon)
and its model process, all in one network namespace made for the run (their links wwan0 ..
wwan7 live there) and one run directory (so each `up` takes the next instance). Once every
ready line is out and the modems have settled, for --seconds:
- memory: RSS of the daemon plus its model process, per modem (mean over the modems), and
  PSS (shared pages split between the processes that map them: what a modem really adds);
- idle CPU: utime+stime of all the daemons and models over the window, per modem, in percent
  of one core.
Baseline, in the same run: two bare Python processes idling in an asyncio loop (what a daemon
and its model cost before any iosm-cuse code): the memory ratio is a modem's RSS over that
pair's. The CPU scaling ratio is the per-modem idle CPU at N over that at 1.

    sudo .venv/bin/python bench/multi.py [--counts 1,4,8] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT = 60.0
SETTLE_S = 3.0
IOSM_CUSE = str(Path(sys.executable).parent / "iosm-cuse")
IDLE = "import asyncio, sys; print('ready', flush=True); asyncio.run(asyncio.sleep(1e9))"


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def wait_ready(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"{what}: no ready line")
    return line


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(pids: list[int], seconds: float) -> dict[str, float]:
    """Summed RSS, PSS and CPU share (of one core) of `pids` over `seconds`."""
    before = {pid: ticks(pid) for pid in pids}
    time.sleep(seconds)
    used = sum(ticks(pid) - before[pid] for pid in pids)
    rss = pss = 0
    for pid in pids:
        r, p = memory_kb(pid)
        rss, pss = rss + r, pss + p
    return {"rss_kb": rss, "pss_kb": pss,
            "cpu_pct": 100.0 * used / os.sysconf("SC_CLK_TCK") / seconds}


def baseline(seconds: float) -> dict[str, float]:
    procs = [subprocess.Popen([sys.executable, "-c", IDLE], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for proc in procs:
            wait_ready(proc, "idle python")
        time.sleep(SETTLE_S)
        return measure([p.pid for p in procs], seconds)
    finally:
        stop(procs)


def modems(n: int, seconds: float, ns: str, run_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "IOSM_CUSE_RUN_DIR": str(run_dir)}
    procs: list[subprocess.Popen[str]] = []
    try:
        t0 = time.monotonic()
        for k in range(n):
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, IOSM_CUSE, "up", "--device", "sim", "--transport",
                 "pty", "--modemmanager", "off"], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, env=env)
            procs.append(proc)
            line = wait_ready(proc, f"modem {k}")
            if f"data link wwan{k} " not in line:
                raise RuntimeError(f"modem {k}: {line}")
        started = time.monotonic() - t0
        time.sleep(SETTLE_S)
        # `ip netns exec` execs the daemon in place: the Popen pid is the daemon's.
        pids = []
        for proc in procs:
            pids.append(proc.pid)
            pids.extend(children(proc.pid))
        if len(pids) != 2 * n:
            raise RuntimeError(f"expected {n} daemons and {n} models, found {len(pids)} pids")
        m = measure(pids, seconds)
        return {"modems": n, "start_all_s": round(started, 2),
                "rss_kb_per_modem": round(m["rss_kb"] / n),
                "pss_kb_per_modem": round(m["pss_kb"] / n),
                "idle_cpu_pct_per_modem": round(m["cpu_pct"] / n, 3),
                "idle_cpu_pct_total": round(m["cpu_pct"], 3)}
    finally:
        stop(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/multi.py: run as root (network namespace, TUN)", file=sys.stderr)
        return 1
    counts = [int(c) for c in args.counts.split(",")]
    ns = f"iosmb-multi{os.getpid()}"
    run_dir = Path(tempfile.mkdtemp(prefix="iosm-bench-multi-"))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        base = baseline(args.seconds)
        rows = [modems(n, args.seconds, ns, run_dir) for n in counts]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
    base_rss = base["rss_kb"]
    first_cpu = rows[0]["idle_cpu_pct_per_modem"] or None
    for row in rows:
        row["rss_ratio_to_baseline"] = round(row["rss_kb_per_modem"] / base_rss, 2)
        row["cpu_ratio_to_first"] = (round(row["idle_cpu_pct_per_modem"] / first_cpu, 2)
                                     if first_cpu else None)
    result = {"baseline_two_idle_pythons": {"rss_kb": base["rss_kb"], "pss_kb": base["pss_kb"],
                                            "idle_cpu_pct": round(base["cpu_pct"], 3)},
              "seconds": args.seconds, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"baseline (2 idle Python asyncio processes): RSS {base['rss_kb']} kB, PSS "
          f"{base['pss_kb']} kB, CPU {base['cpu_pct']:.3f} %")
    print("modems  RSS/modem kB  ratio  PSS/modem kB  idle CPU/modem %  vs 1  start all s")
    for r in rows:
        print(f"{r['modems']:>6}  {r['rss_kb_per_modem']:>12}  {r['rss_ratio_to_baseline']:>5}  "
              f"{r['pss_kb_per_modem']:>12}  {r['idle_cpu_pct_per_modem']:>16}  "
              f"{r['cpu_ratio_to_first']!s:>4}  {r['start_all_s']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
