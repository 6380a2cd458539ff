"""Inside UML, with the model started with --fault (tests/uml/faults.py): connect, ping across
the spoiled transfer, then look at what the kernel's iosm driver did. A report, not a test:
it always exits 0 when it got to the end; the kernel's behaviour is the finding.

    python3 -m tests.uml --fault mux-length --cmd 'python3 tests/uml/fault_probe.py'
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

PORT = "/dev/wwan0mbim0"
MARKERS = ("WARNING:", "BUG:", "Oops", "Call Trace", "general protection", "Kernel panic",
           "skb_over_panic", "iosm")


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timeout after {timeout} s")


def received(out: str) -> int:
    m = re.search(r"(\d+) received", out)
    return int(m.group(1)) if m else 0


def main() -> None:
    before = len(run("dmesg").stdout.splitlines())
    con = run("mbimcli", "-d", PORT, "--connect=apn=internet")
    print(f"fault-probe: connect exit {con.returncode}")
    run("ip", "addr", "add", "10.99.0.2/24", "dev", "wwan0")
    run("ip", "link", "set", "wwan0", "up")
    first = received(run("ping", "-c", "8", "-i", "0.2", "-W", "1", "-s", "500",
                         "10.99.0.1").stdout)
    caps = run("mbimcli", "-d", PORT, "--query-device-caps", timeout=15)
    second = received(run("ping", "-c", "3", "-i", "0.2", "-W", "1", "10.99.0.1").stdout)
    stats = {n: Path(f"/sys/class/net/wwan0/statistics/{n}").read_text().strip()
             for n in ("rx_packets", "rx_errors", "rx_dropped")
             if Path(f"/sys/class/net/wwan0/statistics/{n}").exists()}
    log = run("dmesg").stdout.splitlines()[before:]
    bad = [ln for ln in log if any(m in ln for m in MARKERS[:-1])]
    print(f"fault-probe: pings {first}/8 across the fault, then {second}/3; "
          f"MBIM port answers: {'yes' if caps.returncode == 0 else 'no'}; "
          f"ports: {', '.join(p.name for p in Path('/dev').glob('wwan0*')) or 'none'}; "
          f"wwan0 {stats}")
    print(f"fault-probe: kernel WARN/BUG/oops lines: {len(bad)}")
    for ln in [ln for ln in log if any(m in ln for m in MARKERS)][:40]:
        print(f"fault-probe: dmesg: {ln}")


if __name__ == "__main__":
    main()
