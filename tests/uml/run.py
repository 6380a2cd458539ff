"""`python3 -m tests.uml [--mux lite|aggregation] [--caps HEX] [--pci-id ID] [--cmd 'SHELL']`

Starts the modem model as a virt-pci function (`iosm-cuse modem --virtpci`), boots the UML
kernel of tests/uml/build-kernel.sh (built first if missing) over the host's root (hostfs,
read-only, plus a writable results directory), waits inside for the kernel's MBIM port, runs
`pytest -m uml tests/uml` there (or the command) and exits with its status. A kernel that does
not boot, or a port that never appears, fails the run with the reason and the console tail.
With --pci-id 8086:7360 the 6.1 driver creates AT ports only: use --cmd (the tier-4 tests
expect the XMM7560's MBIM port).

The model writes its counters on exit (`iosm-cuse modem --stats`); a run whose model rejected
any host input fails (exit 3) with the counters, whatever the guest said. --record FILE keeps the
model's protocol recording (IOSM_MODEL_RECORD, iosm_cuse/sim/recorder.py) in FILE. --fault KIND
makes the device misbehave (iosm_cuse/sim/faults.py): the run then reports what the kernel did
(its log's WARN/BUG/oops lines, whether the ports survived) instead of asserting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
VIRTIO_ID = 1234  # CONFIG_UML_PCI_OVER_VIRTIO_DEVICE_ID in tests/uml/kernel.config
PORT_WAIT_S = 30
# The port whose appearance says the driver is up: 6.1 gives the XMM7360 its AT ports only.
READY_PORT = {"8086:7560": "/dev/wwan0mbim0", "8086:7360": "/dev/wwan0at0"}
BOOT_TIMEOUT_S = 600
SOCKET_WAIT_S = 20

INIT = """#!/bin/sh
# PID 1 of the UML guest (tests/uml/run.py): mounts, wait for the driver's port, run, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# GLib tools (mbimcli) refuse to run in the POSIX locale ("Embedded NUL byte in conversion")
export PYTHONDONTWRITEBYTECODE=1 IOSM_IN_UML=1 HOME=/tmp LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t hostfs hostfs {results} -o {results}
# A work tree under /tmp or /run (a CI clone, say) is hidden by the tmpfs mounts above: the
# host's copy is mounted back over it.
case {root} in /tmp/*|/run/*) mkdir -p {root} && mount -t hostfs hostfs {root} -o {root} ;; esac
ip link set lo up
status=97
i=0
while [ ! -e {port} ] && [ $i -lt {port_wait} ]; do sleep 0.2; i=$((i+1)); done
if [ -e {port} ]; then
    cd {root}
    ( {command} ) > {results}/out 2>&1 </dev/null
    status=$?
else
    echo "no {port} after {port_wait_s} s" > {results}/out
fi
dmesg > {results}/dmesg
echo $status > {results}/status
sync
echo o > /proc/sysrq-trigger
sleep 10
"""


def kernel_path() -> Path:
    out = subprocess.run([str(HERE / "build-kernel.sh")], check=True, stdout=subprocess.PIPE,
                         text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def model_command(sock: Path, args: argparse.Namespace, stats: Path) -> list[str]:
    venv = ROOT / ".venv" / "bin" / "iosm-cuse"
    cmd = [str(venv)] if venv.exists() else [sys.executable, "-c",
                                             "from iosm_cuse.cli import main; main()"]
    cmd += ["modem", "--virtpci", str(sock), "--pci-id", args.pci_id]
    if args.mux:
        cmd += ["--mux", args.mux]
    if args.caps:
        cmd += ["--caps", args.caps]
    if args.fault:
        cmd += ["--fault", args.fault]
    return [*cmd, "--stats", str(stats)]


def default_command() -> str:
    python = ROOT / ".venv" / "bin" / "python"
    py = str(python) if python.exists() else "python3"
    return f"{shlex.quote(py)} -m pytest -q -p no:cacheprovider -m uml tests/uml"


def boot_failure(console: str) -> str:
    for marker in ("Kernel panic", "BUG:", "Oops", "Segfault", "virt-pci delay"):
        for line in console.splitlines():
            if marker in line:
                return line.strip()
    return "the kernel stopped before the test command finished"


def stop_model(model: subprocess.Popen[bytes]) -> None:
    if model.poll() is None:
        model.terminate()
        try:
            model.wait(10)
        except subprocess.TimeoutExpired:
            model.kill()
            model.wait()


def check_model(stats: Path, fault: str | None, status: int) -> int:
    """The model's reject counters after the run: any non-zero fails a run without a fault
    (exit 3). With a fault the counters are printed: what the kernel sent after it is part of
    the finding."""
    try:
        data = json.loads(stats.read_text())
    except (OSError, ValueError) as exc:
        print(f"uml: no model stats ({exc})", file=sys.stderr)
        return status or 3
    rejects = {f"{part}.{name}": n for part, counters in data.get("rejects", {}).items()
               for name, n in counters.items() if n}
    print(f"uml: model: ipc {data.get('ipc_state')}, ul {data.get('ul_transfers')}, "
          f"dl {data.get('dl_transfers')}, rejects {rejects or 'none'}", file=sys.stderr)
    if fault:
        print(f"uml: fault: {data.get('fault')}", file=sys.stderr)
        return status
    if rejects:
        print("uml: FAILED: the model rejected host input", file=sys.stderr)
        return status or 3
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.uml", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mux", choices=["lite", "aggregation"])
    ap.add_argument("--caps", metavar="HEX", help="CP capabilities the model announces")
    ap.add_argument("--pci-id", default="8086:7560", choices=["8086:7560", "8086:7360"])
    ap.add_argument("--cmd", help="shell command to run inside instead of pytest -m uml")
    ap.add_argument("--dyndbg", action="store_true", help="iosm.dyndbg=+p (driver debug log)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--record", type=Path, metavar="FILE",
                    help="write the model's protocol recording (JSON lines) to FILE")
    ap.add_argument("--fault", choices=["mux-offset", "mux-length", "td-size", "crash"],
                    help="a device fault for the kernel driver to meet (sim/faults.py)")
    ap.add_argument("--timeout", type=float, default=BOOT_TIMEOUT_S,
                    help="seconds before the guest is killed (default %(default)s)")
    args = ap.parse_args(argv)

    linux = kernel_path()
    # not under /tmp: the guest mounts a tmpfs there, which would hide the results directory
    work = Path(tempfile.mkdtemp(prefix="iosm-uml-", dir="/var/tmp"))
    results = work / "results"
    results.mkdir()
    sock = work / "virtpci.sock"
    init = work / "init"
    init.write_text(INIT.format(results=shlex.quote(str(results)), root=shlex.quote(str(ROOT)),
                                command=args.cmd or default_command(),
                                port_wait=PORT_WAIT_S * 5, port_wait_s=PORT_WAIT_S,
                                port=READY_PORT[args.pci_id]))
    init.chmod(0o755)
    model_log = open(work / "model.log", "wb")  # noqa: SIM115 (closed in finally)
    stats = work / "stats.json"
    env = dict(os.environ)
    env.pop("IOSM_MODEL_RECORD", None)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.unlink(missing_ok=True)
        env["IOSM_MODEL_RECORD"] = str(args.record.resolve())
    model = subprocess.Popen(model_command(sock, args, stats), stdout=model_log,
                             stderr=model_log, env=env)
    t0 = time.monotonic()
    try:
        while not sock.exists():
            if model.poll() is not None or time.monotonic() - t0 > SOCKET_WAIT_S:
                print(f"uml: the model did not start:\n{(work / 'model.log').read_text()}",
                      file=sys.stderr)
                return 2
            time.sleep(0.05)
        # UML busy-polls while it waits for a read's answer: at a lower priority it yields the
        # CPU to the model's thread that is to answer it (the machine may be busy)
        cmdline = ["nice", "-n", "5", str(linux), "mem=256M", "rootfstype=hostfs", "rootflags=/",
                   "ro",
                   f"init={init}", f"virtio_uml.device={sock}:{VIRTIO_ID}", "con=null",
                   "ssl=null", "con0=fd:0,fd:1", "pcie_aspm=off"]
        if args.dyndbg:
            cmdline.append("iosm.dyndbg=+p")
        # UML forks helper processes: its own session, so a timeout can end all of them
        uml = subprocess.Popen(cmdline, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
        try:
            out_bytes, _ = uml.communicate(timeout=args.timeout)
            console = out_bytes.decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(uml.pid, signal.SIGKILL)
            out_bytes, _ = uml.communicate()
            console = out_bytes.decode(errors="replace")
            console += f"\n[uml: no power-off within {args.timeout} s]"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(uml.pid, signal.SIGKILL)  # helpers left behind by a power-off
        (work / "console.log").write_text(console)
        elapsed = time.monotonic() - t0
        out = (results / "out").read_text(errors="replace") if (results / "out").exists() else ""
        sys.stdout.write(out)
        status_file = results / "status"
        if not status_file.exists():
            print(f"uml: FAILED: {boot_failure(console)}", file=sys.stderr)
            print("uml: console tail:\n" + "\n".join(console.splitlines()[-30:]),
                  file=sys.stderr)
            return 2
        status = int(status_file.read_text().strip() or "98")
        dmesg = (results / "dmesg").read_text(errors="replace")
        bad = [ln for ln in dmesg.splitlines()
               if any(m in ln for m in ("WARNING:", "BUG:", "Oops", "virt-pci delay"))]
        for ln in bad:
            print(f"uml: kernel log: {ln}", file=sys.stderr)
        stop_model(model)
        status = check_model(stats, args.fault, status)
        print(f"uml: exit {status} after {elapsed:.1f} s (run directory {work})", file=sys.stderr)
        return status
    finally:
        stop_model(model)
        model_log.close()
        if not args.keep and "status" in os.listdir(results):
            shutil.rmtree(work, ignore_errors=True)
