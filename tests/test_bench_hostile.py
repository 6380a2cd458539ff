"""bench/hostile.py, small: its flood through the PTY fallback leaves the server alive, holding
nothing, and serving mbimcli. The 100,000-write run through the real CUSE port is in the guest
(`tests/kernel/test_hostile_port.py` runs a short one; the README gives the long command)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hostile.py"


def test_a_hostile_flood_through_the_pty_leaves_the_port_serving() -> None:
    if shutil.which("mbimcli") is None:
        pytest.skip("mbimcli (libmbim-utils) missing")
    res = subprocess.run([sys.executable, str(BENCH), "--transport", "pty", "--writes", "600",
                          "--json"], capture_output=True, text=True, timeout=120)
    out = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out["crashes"] == 0 and out["mbimcli"] == "ok", out
    assert sum(out["by_kind"].values()) == 600 and len(out["by_kind"]) == 10
    stream = out["server"]["transport"]
    assert stream["held"] == 0 and stream["resyncs"] > 0, stream
    assert out["server"]["internal_errors"] == 0
    # What the client read is what the model sent: the framing on both sides agrees.
    assert out["answers_read"] == out["server"]["answers"]
