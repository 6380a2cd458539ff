"""Run the kernel test tier (or any command) in ONE boot of a QEMU guest of Debian's kernel.

    python3 -m tests.vm [--timeout S] [--host-helper CMD]... [--junitxml PATH] [-- PYTEST ARGS]
    python3 -m tests.vm --cmd 'SHELL COMMAND'
    python3 -m tests.vm --systemd [-- PYTEST ARGS]   systemd as PID 1 (overlay root), the
                                                    `systemd_pid1` tests

Run it from the repository root, as root. Stdlib only. Environment:
    IOSM_VM_KERNEL   kernel to boot (bzImage or ELF vmlinux); default: newest /boot/vmlinuz-*
    IOSM_VM_KVER     its /lib/modules directory name, if it cannot be read from the image
    IOSM_VM_ACCEL    auto (default) | tcg | kvm
    IOSM_VM_TIMEOUT  seconds before the guest is declared dead (default 1200)
    IOSM_VM_IVSHMEM_SIZE  bytes of the ivshmem device's BAR2 / host file (default 8 MiB)

The exit status is the command's (pytest's), or VM_FAILED when the guest could not be prepared,
died, or timed out; the last line then starts with "iosm-vm: FAIL:" and names the cause.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from . import image
from .agent import HostAgent, stop_process
from .image import VmError

VM_FAILED = 100
WORK = Path(__file__).resolve().parents[2]
CACHE = WORK / ".vmcache"
RUNS = WORK / ".vmrun"
VENV = WORK / ".venv"
# The engine's DMA pool for MBIM + Lite channel 0 needs ~4.2 MiB of the file
# (iosm_cuse.sim.process's DEFAULT_SHM_SIZE); QEMU wants a power of two.
IVSHMEM_SIZE = int(os.environ.get("IOSM_VM_IVSHMEM_SIZE", 8 * 1024 * 1024))
HOST_TOKEN_OFFSET = 0
GUEST_TOKEN_OFFSET = 4096
STALE_RUN_SECONDS = 6 * 3600
# systemd as PID 1: only failures on the console (the test's output stays readable).
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1"
SYSTEMD_CMDLINE = " systemd.show_status=error"


@dataclass
class Outcome:
    status: int | None  # the command's exit status; None if the guest wrote none
    seconds: float
    timed_out: bool


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except VmError as exc:
        print(f"iosm-vm: FAIL: {exc}", flush=True)
        return VM_FAILED


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m tests.vm", description=__doc__.split("\n")[0])
    timeout = float(os.environ.get("IOSM_VM_TIMEOUT", 1200))
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds")
    parser.add_argument("--host-helper", action="append", default=[], metavar="CMD",
                        help="shell command run on the host beside the guest, for the whole boot")
    parser.add_argument("--junitxml", type=Path, help="where pytest in the guest writes its report")
    parser.add_argument("--cmd", help="run this shell command in the guest instead of pytest")
    parser.add_argument("--systemd", action="store_true",
                        help="boot with systemd as PID 1 over a writable overlay of the host's "
                             "root, with udevd, D-Bus, polkit, ModemManager and NetworkManager "
                             "as units; runs the tests marked systemd_pid1")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    kernel = image.find_kernel()
    if IVSHMEM_SIZE < 4096 or IVSHMEM_SIZE & (IVSHMEM_SIZE - 1):
        raise VmError(f"IOSM_VM_IVSHMEM_SIZE={IVSHMEM_SIZE}: ivshmem needs a power of two")
    if os.geteuid() != 0:
        raise VmError("must run as root (9p export of / and /dev/shm)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 not found (install qemu-system-x86)")
    vmlinux = image.vmlinux(kernel, CACHE)
    run_dir = _new_run_dir()
    junit = (args.junitxml or run_dir / "junit.xml").resolve()
    junit.unlink(missing_ok=True)
    if args.cmd is None:
        _compile_python()
        command = _pytest_command(junit, args.pytest_args, args.systemd)
    else:
        command = args.cmd
    accel = _choose_accel(qemu, kernel, vmlinux)
    shm = Path("/dev/shm") / f"iosm-vm-{os.getpid()}-{secrets.token_hex(4)}.shm"
    try:
        tokens = _prepare_ivshmem(shm, run_dir)
        _write_run_files(run_dir, command, len(args.host_helper))
        (run_dir / "initrd.cpio").write_bytes(
            image.initramfs(kernel, WORK, run_dir, systemd=args.systemd))
        init = "systemd" if args.systemd else "guest.sh"
        print(f"iosm-vm: kernel {kernel.version} ({kernel.path}), accel {accel}, init {init}, "
              f"prepared in {time.monotonic() - started:.1f} s; run dir {run_dir}", flush=True)
        outcome = _boot_with_partners(qemu, accel, vmlinux, run_dir, shm, args)
        ivshmem_ok = _check_guest_write(shm, run_dir, tokens)
    finally:
        shm.unlink(missing_ok=True)
    return _report(outcome, args, junit, run_dir, ivshmem_ok, time.monotonic() - started)


def _new_run_dir() -> Path:
    RUNS.mkdir(exist_ok=True)
    now = time.time()
    for old in RUNS.glob("run-*"):
        if now - old.stat().st_mtime > STALE_RUN_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
    run_dir = RUNS / f"run-{os.getpid()}-{int(now)}"
    run_dir.mkdir()
    return run_dir


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _compile_python() -> None:
    """Byte-compile on the host: compiling inside the guest costs ~11x more under TCG."""
    python = _venv_python()
    if not python.exists():
        raise VmError(f"no virtual environment: {python} missing (run ./dev test)")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    sources = [site, WORK / "iosm_cuse", WORK / "tests"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([python, "-m", "compileall", "-q", "-j0", *sources],
                   check=False, stdout=subprocess.DEVNULL, env=env)


def _pytest_command(junit: Path, extra: list[str], systemd: bool = False) -> str:
    # The systemd_pid1 tests need the systemd boot; the plain boot runs every other kernel test.
    marks = "kernel and systemd_pid1" if systemd else "kernel and not systemd_pid1"
    argv = [str(_venv_python()), "-m", "pytest", "-m", marks, "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", "--color=no", f"--junitxml={junit}", *extra]
    if not any(not arg.startswith("-") for arg in extra):
        argv.append("tests/kernel")  # collecting every test module in the guest costs ~1 min
    return shlex.join(argv)


def _choose_accel(qemu: str, kernel: image.Kernel, vmlinux: Path) -> str:
    """TCG unless KVM is a real hardware KVM (kvm_intel/kvm_amd, not kvm_pvm) that boots."""
    wanted = os.environ.get("IOSM_VM_ACCEL", "auto")
    if wanted in ("tcg", "kvm"):
        return wanted
    if wanted != "auto":
        raise VmError(f"IOSM_VM_ACCEL={wanted}: expected auto, tcg or kvm")
    modules = Path("/sys/module")
    hardware = (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists()
    if not (hardware and not (modules / "kvm_pvm").exists() and os.access("/dev/kvm", os.W_OK)):
        return "tcg"
    trial = _new_run_dir()
    shm = Path("/dev/shm") / f"iosm-vm-trial-{os.getpid()}.shm"
    try:
        _prepare_ivshmem(shm, trial)
        _write_run_files(trial, "true", 0)
        (trial / "initrd.cpio").write_bytes(image.initramfs(kernel, WORK, trial))
        outcome = _boot(qemu, "kvm", vmlinux, trial, shm, timeout=60, echo=False, systemd=False)
    finally:
        shm.unlink(missing_ok=True)
    shutil.rmtree(trial, ignore_errors=True)
    return "kvm" if outcome.status == 0 else "tcg"


def _prepare_ivshmem(shm: Path, run_dir: Path) -> dict[str, str]:
    """The file behind the guest's ivshmem-plain BAR2, with a token the guest must see."""
    host_token = secrets.token_hex(16)
    guest_token = secrets.token_hex(16)
    with shm.open("wb") as file:
        file.truncate(IVSHMEM_SIZE)
        file.seek(HOST_TOKEN_OFFSET)
        file.write(bytes.fromhex(host_token))
    info = {
        "host_path": str(shm),
        "size": IVSHMEM_SIZE,
        "host_token": host_token,
        "host_token_offset": HOST_TOKEN_OFFSET,
        "guest_token": guest_token,
        "guest_token_offset": GUEST_TOKEN_OFFSET,
        "guest_wrote_marker": str(run_dir / "ivshmem-guest-wrote"),
    }
    (run_dir / "ivshmem.json").write_text(json.dumps(info, indent=1))
    return {"guest_token": guest_token}


def _write_run_files(run_dir: Path, command: str, helpers: int) -> None:
    env = {
        "IOSM_IN_GUEST": "1",
        "IOSM_VM_WORK": str(WORK),
        "IOSM_VM_RUN_DIR": str(run_dir),
        "IOSM_VM_IVSHMEM_INFO": str(run_dir / "ivshmem.json"),
        "IOSM_VM_AGENT_DIR": str(run_dir / "agent"),
        "IOSM_VM_HOST_HELPERS": str(helpers),
    }
    lines = [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    (run_dir / "env").write_text("\n".join(lines) + "\n")
    (run_dir / "cmd").write_text(command + "\n")


def _boot_with_partners(qemu: str, accel: str, vmlinux: Path, run_dir: Path, shm: Path,
                        args: argparse.Namespace) -> Outcome:
    """Boot once, with the host agent and any --host-helper processes running beside it."""
    env = dict(os.environ, IOSM_VM_IVSHMEM=str(shm), IOSM_VM_RUN_DIR=str(run_dir))
    agent = HostAgent(run_dir, WORK, env)
    agent.start()
    helpers = []
    try:
        for number, helper in enumerate(args.host_helper):
            log = (run_dir / f"helper-{number}.log").open("wb")
            helpers.append(subprocess.Popen(helper, shell=True, cwd=WORK, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True))
        return _boot(qemu, accel, vmlinux, run_dir, shm, timeout=args.timeout, echo=True,
                     systemd=args.systemd)
    finally:
        for process in helpers:
            stop_process(process)
        agent.close()


def _qemu_argv(qemu: str, accel: str, vmlinux: Path, run_dir: Path, shm: Path,
               systemd: bool = False) -> list[str]:
    def esc(path: Path | str) -> str:
        return str(path).replace(",", ",,")

    venv = [] if not VENV.is_dir() else [
        "-fsdev", f"local,id=v,path={esc(VENV)},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=v,mount_tag=venv",
    ]
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return [
        qemu, *cpu, "-machine", "q35", "-smp", "2", "-m", "2G",
        "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
        "-kernel", str(vmlinux), "-initrd", str(run_dir / "initrd.cpio"),
        "-append", CMDLINE + (SYSTEMD_CMDLINE if systemd else ""),
        "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
        "-fsdev", f"local,id=w,path={esc(WORK)},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=w,mount_tag=work",
        "-object",
        f"memory-backend-file,id=hostmem,size={IVSHMEM_SIZE},share=on,mem-path={esc(shm)}",
        "-device", "ivshmem-plain,memdev=hostmem",
        *venv,
    ]


def _boot(qemu: str, accel: str, vmlinux: Path, run_dir: Path, shm: Path, *, timeout: float,
          echo: bool, systemd: bool) -> Outcome:
    started = time.monotonic()
    status_file = run_dir / "status"
    status_file.unlink(missing_ok=True)
    with (run_dir / "console.log").open("wb") as log:
        process = subprocess.Popen(_qemu_argv(qemu, accel, vmlinux, run_dir, shm, systemd),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        assert process.stdout is not None
        pump = threading.Thread(target=_tee, args=(process.stdout, log, echo), daemon=True)
        pump.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_process(process)
        pump.join(timeout=5)
    try:
        status: int | None = int(status_file.read_text().strip())
    except (OSError, ValueError):
        status = None
    return Outcome(status, time.monotonic() - started, timed_out)


def _tee(stream: object, log: object, echo: bool) -> None:
    for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
        line = line.replace(b"\r", b"")
        log.write(line)  # type: ignore[attr-defined]
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _check_guest_write(shm: Path, run_dir: Path, tokens: dict[str, str]) -> bool | None:
    """If a guest test says it wrote its token into BAR2, the host file must hold it now."""
    if not (run_dir / "ivshmem-guest-wrote").exists():
        return None
    with shm.open("rb") as file:
        file.seek(GUEST_TOKEN_OFFSET)
        return file.read(16).hex() == tokens["guest_token"]


def _report(outcome: Outcome, args: argparse.Namespace, junit: Path, run_dir: Path,
            ivshmem_ok: bool | None, total: float) -> int:
    print(f"iosm-vm: guest ran {outcome.seconds:.1f} s, whole run {total:.1f} s", flush=True)
    print(_guest_times(run_dir), flush=True)
    if outcome.status is None:
        cause = f"timed out after {args.timeout:.0f} s" if outcome.timed_out else \
            "exited without writing an exit status"
        raise VmError(f"guest died or timed out ({cause}); console log: {run_dir / 'console.log'}")
    if ivshmem_ok is False:
        raise VmError("ivshmem: the bytes the guest wrote into BAR2 are not in the host file")
    if ivshmem_ok:
        print("iosm-vm: ivshmem: the guest's write into BAR2 is in the host file", flush=True)
    if args.cmd is not None:
        return outcome.status
    counts = _junit_counts(junit)
    if counts is None:
        raise VmError(f"pytest in the guest wrote no report {junit} (exit status {outcome.status})")
    ran, passed, failed = counts
    tier = "systemd tier" if args.systemd else "kernel tier"
    print(f"{tier}: {ran} tests ran in the guest ({passed} passed, {failed} failed)",
          flush=True)
    if outcome.status == 5 or ran == 0:
        raise VmError(f"{tier}: no tests ran in the guest")
    return outcome.status


def _guest_times(run_dir: Path) -> str:
    """Boot (power-on to the test command) and test command times, by the guest's clock."""
    try:
        start = float((run_dir / "uptime-start").read_text())
    except (OSError, ValueError):
        return "iosm-vm: the test command never started"
    try:
        test = f"{float((run_dir / 'uptime-end').read_text()) - start:.1f} s"
    except (OSError, ValueError):
        test = "unfinished"
    return f"iosm-vm: boot to the test command {start:.1f} s, test command {test} (guest clock)"


def _junit_counts(junit: Path) -> tuple[int, int, int] | None:
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(suite.get(key, 0)) for suite in suites for key in ("tests",))
    skipped = sum(int(suite.get("skipped", 0)) for suite in suites)
    failed = sum(int(suite.get(key, 0)) for suite in suites for key in ("failures", "errors"))
    ran = total - skipped
    return ran, ran - failed, failed


if __name__ == "__main__":
    sys.exit(main())
