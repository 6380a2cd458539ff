"""Host side of a small request channel the guest uses to run processes on the host.

Kernel tests sometimes need a partner on the host (the modem model mapping the ivshmem file, a
check of bytes in that file). The guest and the host share the work tree over 9p without
caching, so a request is a JSON file the guest renames into `<run dir>/agent/<id>.req`, and the
answer is a JSON file the host renames into `<id>.resp`. The guest-side client is the
`host_run` / `host_process` fixtures in tests/conftest.py.

Requests:
  {"op": "run", "argv": [...], "timeout": s}   -> {"returncode": n, "stdout": str, "stderr": str}
  {"op": "start", "argv": [...]}               -> {"handle": str}
  {"op": "stop", "handle": str}                -> {"returncode": n, "output": str}
Failures answer {"error": "<reason>"}. Commands run with the work tree as cwd and the
environment of the runner plus IOSM_VM_IVSHMEM (host path of the shared-memory file).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

POLL_SECONDS = 0.05
OUTPUT_LIMIT = 64 * 1024


class HostAgent:
    def __init__(self, run_dir: Path, cwd: Path, env: dict[str, str]) -> None:
        self.directory = run_dir / "agent"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cwd = cwd
        self._env = env
        self._processes: dict[str, tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = {}
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="iosm-vm-agent", daemon=True)
        self.requests = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop polling and stop every process the guest left running."""
        self._stop.set()
        self._thread.join(timeout=5)
        for handle in list(self._processes):
            self._stop_process(handle)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            for request in sorted(self.directory.glob("*.req")):
                self._serve(request)

    def _serve(self, request: Path) -> None:
        try:
            message = json.loads(request.read_text())
            answer = self._handle(message)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        self.requests += 1
        request.unlink(missing_ok=True)
        tmp = request.with_suffix(".resp.tmp")
        tmp.write_text(json.dumps(answer))
        tmp.replace(request.with_suffix(".resp"))

    def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op == "run":
            done = subprocess.run(
                [str(arg) for arg in message["argv"]],
                cwd=self._cwd,
                env=self._env,
                capture_output=True,
                timeout=float(message.get("timeout", 60)),
                check=False,
            )
            return {
                "returncode": done.returncode,
                "stdout": done.stdout[-OUTPUT_LIMIT:].decode(errors="replace"),
                "stderr": done.stderr[-OUTPUT_LIMIT:].decode(errors="replace"),
            }
        if op == "start":
            handle = f"p{next(self._ids)}"
            log_path = self.directory / f"{handle}.log"
            log = log_path.open("wb")
            process = subprocess.Popen(
                [str(arg) for arg in message["argv"]],
                cwd=self._cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._processes[handle] = (process, log_path, log)
            return {"handle": handle, "pid": process.pid}
        if op == "stop":
            returncode, output = self._stop_process(str(message["handle"]))
            return {"returncode": returncode, "output": output}
        return {"error": f"unknown op {op!r}"}

    def _stop_process(self, handle: str) -> tuple[int, str]:
        process, log_path, log = self._processes.pop(handle)
        stop_process(process)
        log.close()
        return process.returncode, log_path.read_bytes()[-OUTPUT_LIMIT:].decode(errors="replace")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
