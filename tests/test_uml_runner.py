"""The UML runner's verdict on the model (tests/uml/run.py check_model), without UML: a run
whose model rejected host input fails, whatever the guest said; with a fault it reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/uml is run as `python3 -m tests.uml` from the root
    sys.path.insert(0, str(ROOT))

from tests.uml.run import check_model  # noqa: E402


def stats(tmp_path: Path, **rejects: dict[str, int]) -> Path:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"ipc_state": "RUNNING", "ul_transfers": 3, "dl_transfers": 2,
                                "rejects": rejects, "fault": None}))
    return path


def test_zero_rejects_keep_the_guests_status(tmp_path: Path) -> None:
    path = stats(tmp_path, device={"ul_td": 0}, mux={})
    assert check_model(path, None, 0) == 0
    assert check_model(path, None, 1) == 1


def test_any_reject_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = stats(tmp_path, device={}, mux={"ul_dropped_no_session": 2})
    assert check_model(path, None, 0) == 3
    assert "mux.ul_dropped_no_session" in capsys.readouterr().err
    assert check_model(path, "mux-length", 0) == 0      # a fault run reports, never fails


def test_missing_stats_fail(tmp_path: Path) -> None:
    assert check_model(tmp_path / "none.json", None, 0) == 3
