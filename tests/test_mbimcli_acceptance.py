"""Issue 4, tier 2: the real mbimcli and mbim-network through `iosm-cuse up --transport pty`
running the whole stack (engine, model process, MBIM function) with a configuration file."""

from __future__ import annotations

import json
from pathlib import Path

import mbimcli_scenario
import pytest
from daemon_up import StartUp

from iosm_cuse.sim.config import ModemConfig

pytestmark = pytest.mark.host


def test_mbimcli_sequence_prints_the_configured_values(start_up: StartUp, tmp_path: Path) -> None:
    config = tmp_path / "modem.json"
    config.write_text(json.dumps(mbimcli_scenario.ACCEPTANCE_CONFIG))
    up = start_up("--config", str(config))
    mbimcli_scenario.run(ModemConfig.load(config), up.mbimcli)
    profile = tmp_path / "mbim-network.conf"
    profile.write_text("APN=internet\n")
    for verb in ("start", "stop"):
        res = up.run("mbim-network", f"--profile={profile}", up.port, verb, timeout=60)
        assert res.returncode == 0, (verb, res.stdout, res.stderr)
    code, err = up.terminate()
    assert code == 0, err
