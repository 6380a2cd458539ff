"""`iosm-cuse up` in the guest, for the kernel-tier tests: started, its ready line awaited,
stopped. Everything is slow under TCG, so every wait is generous but bounded."""

from __future__ import annotations

import mmap
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

IOSM_CUSE = str(Path(sys.executable).parent / "iosm-cuse")
STEP_TIMEOUT = 120


def start(*args: str, ready: str | tuple[str, ...],
          prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """`[*prefix, iosm-cuse, up, *args]`, once its ready line (which must contain `ready`, or
    each of them) is out; the test fails with the daemon's stderr if it does not come."""
    proc = subprocess.Popen([*prefix, IOSM_CUSE, "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(STEP_TIMEOUT):
            pytest.fail(f"no ready line from iosm-cuse up {' '.join(args)}")
        line = proc.stdout.readline()
        for part in (ready,) if isinstance(ready, str) else ready:
            assert part in line, line + proc.stderr.read()
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it does not end in time; nothing is left running."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def restore_runner_token(ivshmem: Any) -> None:
    """tests/vm checks after the run that the guest's token is in the host file; the model and
    the engine own that memory while they run, so put the token back if a test had written it."""
    info = ivshmem.info
    if not Path(info["guest_wrote_marker"]).exists():
        return
    fd = os.open(ivshmem.resource2, os.O_RDWR | os.O_SYNC)
    try:
        with mmap.mmap(fd, ivshmem.size) as mm:
            off = info["guest_token_offset"]
            mm[off:off + 16] = bytes.fromhex(info["guest_token"])
    finally:
        os.close(fd)
