"""Issue 4, tier 2: the real mbimcli and mbim-network through `iosm-cuse up --transport pty`
running the whole stack (engine, model process, MBIM function) with a configuration file."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mbimcli_scenario
import pytest
from test_daemon_host import Up

from iosm_cuse.sim.config import ModemConfig

pytestmark = pytest.mark.host


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"iosmacc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_mbimcli_sequence_prints_the_configured_values(netns: str, tmp_path: Path) -> None:
    config = tmp_path / "modem.json"
    config.write_text(json.dumps(mbimcli_scenario.ACCEPTANCE_CONFIG))
    up = Up(netns, tmp_path / "run", "--config", str(config))
    try:
        mbimcli_scenario.run(ModemConfig.load(config), up.mbimcli)
        profile = tmp_path / "mbim-network.conf"
        profile.write_text("APN=internet\n")
        for verb in ("start", "stop"):
            res = up.run("mbim-network", f"--profile={profile}", up.port, verb, timeout=60)
            assert res.returncode == 0, (verb, res.stdout, res.stderr)
        code, err = up.terminate()
        assert code == 0, err
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait(10)
