"""Hostile writes through the real CUSE port in the guest (issue 14, point 4), short enough for
every kernel-tier run: bench/hostile.py with 1,000 writes. Nothing crashes, the port's counters
account for every write (refused with EMSGSIZE, or passed to the model, whose answers the client
reads back by kind), and mbimcli is served after it. The 100,000-write run is the same script:

    python3 -m tests.vm --timeout 3600 --cmd '.venv/bin/python bench/hostile.py --writes 100000'
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hostile.py"


def test_a_thousand_hostile_writes_through_cuse() -> None:
    res = subprocess.run([sys.executable, str(BENCH), "--writes", "1000", "--devname",
                          "wwan7mbim0", "--json"], capture_output=True, text=True, timeout=900)
    assert res.stdout, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    print(json.dumps(out, indent=1))
    assert out["crashes"] == 0, out["crash_causes"]
    assert out["mbimcli"] == "ok", out
    assert out["accounting"] == {"refused_writes_match_port_emsgsize": True,
                                 "accepted_writes_match_port_tx": True,
                                 "answers_read_match_model_answers": True}, out
    assert out["client_refused"] == {"EMSGSIZE": out["by_kind"]["oversized"]}
    assert res.returncode == 0
