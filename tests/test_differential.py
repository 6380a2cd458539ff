"""Issue 12 point 7: the kernel's iosm driver and ours, as the modem model sees them.

The same scenario (tests/mbimcli_scenario.run_differential: the mbimcli steps, a CONNECT
without ATTACH, five pings to the echo gateway, DISCONNECT) runs twice, each time with the
model's protocol recorder on (IOSM_MODEL_RECORD, iosm_cuse/sim/recorder.py):

- through the kernel's driver: `python3 -m tests.uml --record FILE --cmd '<that one tier-4 test>'`
  boots UML (about 15 s once the kernel is built), or IOSM_KERNEL_RECORD=FILE names a recording
  a UML run left before;
- through our userspace driver: `iosm-cuse up --device sim --transport pty` in a namespace.

Both recordings are normalised (`recorder.normalise`: orders and counts, not timing) and must be
equal except for the differences listed in KNOWN, each with its reason (docs/uml-virtpci.md
§11), each checked exactly: a new difference, or a listed one that went away, fails the test.

Marker `differential`: not part of the host tier (it boots UML); `./dev test` runs it after
tier 4 (`pytest -m differential tests/test_differential.py`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mbimcli_scenario
import pytest
from daemon_up import StartUp

from iosm_cuse.sim import recorder
from iosm_cuse.sim.config import ModemConfig

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.differential,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for TUN and netns"),
    pytest.mark.skipif(shutil.which("mbimcli") is None, reason="mbimcli needed"),
]
UML_TIMEOUT = 900
# Copies of both recordings and their normalised forms stay here after a run, to read a
# difference (the runs themselves record into the test's own tmp_path).
RECORD_DIR = Path("/var/tmp/iosm-differential")

MBIM_PIPES = ("12", "13")
MUX_PIPES = ("0", "1")
AT_PIPES = ("4", "5", "8", "9")  # channels 2 and 4, wwan0at0 and wwan0at1
CYCLE = ["OPEN_PIPE", "OPEN_PIPE", "CLOSE_PIPE", "CLOSE_PIPE"]

# The differences that remain, each with its reason (docs/uml-virtpci.md §11). Each is checked
# exactly below; everything else must be equal.
KNOWN = {
    "mbim_pipes": "the kernel opens and closes the MBIM pipes 12/13 with every open() and "
                  "release() of /dev/wwan0mbim0 (one cycle per mbimcli process); our daemon "
                  "opens them once at start and keeps them while it runs: its port serves "
                  "every opener and keeps the MBIM state between them",
    "mux_pipes": "the kernel opens the MUX pipes 0/1 when wwan0 is set up and closes them when "
                 "it is set down; our daemon opens them at start and closes them at stop",
    "at_pipes": "the kernel opens an AT channel's pipes (4/5, 8/9) when /dev/wwan0at0 or at1 "
                "is opened, which the scenario never does; our daemon opens them at start and "
                "closes them at stop, as it does the MBIM pipes",
}


def pipe_events(order: list[str], pipes: tuple[str, ...]) -> list[str]:
    return [m.split(":")[0] for m in order if m.split(":")[1] in pipes]


def other_messages(order: list[str]) -> list[str]:
    return [m for m in order if m.split(":")[1] not in MBIM_PIPES + MUX_PIPES + AT_PIPES]


def each_pipe_once(order: list[str], pipes: tuple[str, ...]) -> bool:
    """Every one of `pipes` opened once and then closed once."""
    return all([m.split(":")[0] for m in order if m.split(":")[1] == p]
               == ["OPEN_PIPE", "CLOSE_PIPE"] for p in pipes)


def without_pipes(msgs: dict[str, list[list[int]]], pipes: tuple[str, ...]
                  ) -> dict[str, list[list[int]]]:
    """The per-message counts with the entries of `pipes` left out."""
    return {kind: [e for e in entries if str(e[0]) not in pipes]
            for kind, entries in msgs.items()}


def kernel_recording(tmp_path: Path) -> list[recorder.Event]:
    given = os.environ.get("IOSM_KERNEL_RECORD")
    if given:
        return recorder.load(given)
    path = tmp_path / "kernel.jsonl"
    # then unbind, as our daemon's stop ends with IPC UNINIT (UML's power-off removes nothing)
    inner = (f"{shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider -m uml "
             "tests/uml/test_kernel_driver.py -k test_differential_scenario && "
             "for d in /sys/bus/pci/drivers/iosm/0000:*; do "
             "echo ${d##*/} > /sys/bus/pci/drivers/iosm/unbind; done")
    res = subprocess.run([sys.executable, "-m", "tests.uml", "--mux", "lite", "--record",
                          str(path), "--cmd", inner], cwd=ROOT, capture_output=True, text=True,
                         timeout=UML_TIMEOUT, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return recorder.load(path)


def userspace_recording(start_up: StartUp, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> list[recorder.Event]:
    path = tmp_path / "userspace.jsonl"
    monkeypatch.setenv(recorder.ENV, str(path))
    up = start_up("--mux", "lite")
    mbimcli_scenario.run_differential(ModemConfig(), up.mbimcli, up.run)
    code, err = up.terminate()
    assert code == 0, err
    return recorder.load(path)


@pytest.mark.timeout(UML_TIMEOUT + 120)
def test_the_kernel_driver_and_ours_agree_on_the_protocol(
        start_up: StartUp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = recorder.normalise(kernel_recording(tmp_path))
    ours = recorder.normalise(userspace_recording(start_up, tmp_path, monkeypatch))
    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("kernel.jsonl", "userspace.jsonl"):
        if (tmp_path / name).exists():
            shutil.copyfile(tmp_path / name, RECORD_DIR / name)
    (RECORD_DIR / "normalised.json").write_text(json.dumps({"kernel": kernel, "ours": ours},
                                                           indent=1))
    assert kernel["ipc"] and ours["ipc"], "a recording is empty"
    # KNOWN["mbim_pipes"]: a cycle per mbimcli process against one for the daemon's life
    runs = mbimcli_scenario.differential_mbimcli_runs(ModemConfig())
    assert pipe_events(kernel["msg_order"], MBIM_PIPES) == CYCLE * runs
    assert pipe_events(ours["msg_order"], MBIM_PIPES) == CYCLE
    # KNOWN["mux_pipes"]: one cycle each, at different moments
    assert pipe_events(kernel["msg_order"], MUX_PIPES) == CYCLE
    assert pipe_events(ours["msg_order"], MUX_PIPES) == CYCLE
    # KNOWN["at_pipes"]: never opened by the kernel here, once for the daemon's life by ours
    assert pipe_events(kernel["msg_order"], AT_PIPES) == []
    assert each_pipe_once(ours["msg_order"], AT_PIPES), ours["msg_order"]
    assert without_pipes(ours["msgs"], AT_PIPES) == kernel["msgs"]
    # everything else: equal
    assert other_messages(kernel["msg_order"]) == other_messages(ours["msg_order"])
    same = ("ipc", "msg_status", "mux_ul", "mux_dl", "ul_td", "dl_td")
    differences = {k: (kernel[k], ours[k]) for k in same if kernel[k] != ours[k]}
    assert not differences, differences
    # doorbells: counted, not compared (how many a host rings depends on its batching)
    assert kernel["doorbells"] > 0 and ours["doorbells"] > 0
