"""Issue 14, tier 2: a short soak (bench/soak.py --minutes 2) inside the test suite, and the
figures it relies on in `iosm-cuse status --json`.

The soak runs a real `iosm-cuse up` (PTY port, gateway in a namespace) with traffic on 8
sessions, MBIM queries, link flaps and model crashes. Asserted loosely enough not to flake on a
shared 2-core machine, tightly enough to catch a leak: descriptors and tasks of both processes
exactly as they were after the warm-up, RSS within 15 %, every recovery completed, no
unexpected error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daemon_up import Up

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for TUN and netns")]

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
RSS_SLACK_PCT = 15.0
# UDP on a loaded shared machine loses the odd datagram with no disturbance to blame (measured:
# 0-0.3 % at load average 5-6 on 2 cores); a stall or refused send is an error of its own.
LOSS_SLACK_PCT = 2.0


def test_status_reports_both_processes_figures(up: Up) -> None:
    st = up.status()
    for who, usage in (("daemon", st["process"]), ("model", st["modem"]["process"])):
        assert set(usage) == {"rss_kb", "fds", "tasks"}, who
        assert usage["rss_kb"] > 1024 and usage["fds"] >= 3 and usage["tasks"] >= 1, who
    text = up.cli("status")
    assert text.returncode == 0 and "memory: daemon RSS " in text.stdout, text.stdout


def test_two_minute_soak_stays_flat_and_recovers_every_crash() -> None:
    res = subprocess.run([sys.executable, str(SOAK), "--minutes", "2", "--json"],
                         capture_output=True, text=True, timeout=15 * 60)
    assert res.returncode == 0, res.stderr[-4000:]
    r: dict[str, Any] = json.loads(res.stdout)
    assert r["errors_unexpected"] == [], r["errors_unexpected"]
    assert len(r["recoveries"]) >= 3  # the warm-up's crash and at least two measured ones
    assert r["recoveries_completed"], r["recoveries"]
    assert all(rec["traffic_back_s"] is not None for rec in r["recoveries"]), r["recoveries"]
    assert r["flaps"]["del_add"] >= 2 and r["flaps"]["down_up"] >= 2, r["flaps"]
    assert r["mbim_queries_ok"] > 0 and r["traffic"]["echoed"] > 0
    assert r["traffic"]["lost_outside_pct"] <= LOSS_SLACK_PCT, r["traffic"]
    for proc in ("daemon", "model"):
        start, end = r["start"][proc], r["end"][proc]
        assert end["fds"] == start["fds"], (proc, start, end)
        assert end["tasks"] == start["tasks"], (proc, start, end)
        assert abs(r["change_pct"][proc]["rss_kb"]) <= RSS_SLACK_PCT, (proc, start, end)
    assert r["daemon_exit"] == 0
