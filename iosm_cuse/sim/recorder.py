"""The model's protocol recorder: what the device end sees of a host, as events.

Off by default. When on (`IOSM_MODEL_RECORD=FILE` in the model process's environment, or
`iosm-cuse modem --record FILE`), the model calls `record(kind, **fields)` for:

    ipc         {"state": "INIT"}            IPC state the host's doorbell asked for and got
    doorbell    {}                           a host doorbell (IPC or pipe) the model serviced
    msg         {"type": "OPEN_PIPE", "pipe": 0, "tds": 16, "status": "SUCCESS"}
    ul_td       {"channel": 0, "pipe": 0, "size": 120}      one UL transfer taken
    dl_td       {"channel": 0, "pipe": 1, "size": 98}       one DL transfer placed
    mux_ul      {"cmd": "OPEN_SESSION", "if_id": 0}         a MUX command from the host
    mux_dl      {"cmd": "OPEN_SESSION_RESP", "if_id": 0}    a MUX command to the host

`Recorder` is sans-IO: events go to a sink callable. `jsonl_recorder(path)` is the adapter that
writes one JSON object per line. `normalise(events)` turns a recording into what two drivers
running the same scenario should agree on: counts and orders, never timing
(docs/uml-virtpci.md §10, tests/uml/differential.py).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

ENV = "IOSM_MODEL_RECORD"
Event = dict[str, Any]


class Recorder:
    """Numbers each event (`n`) and hands it to `sink`."""

    def __init__(self, sink: Callable[[Event], None]) -> None:
        self.sink = sink
        self.n = 0

    def __call__(self, kind: str, **fields: Any) -> None:
        self.n += 1
        self.sink({"n": self.n, "ev": kind, **fields})


class _JsonLines:
    def __init__(self, f: IO[str]) -> None:
        self.f = f

    def __call__(self, event: Event) -> None:
        self.f.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.f.flush()              # the process may be killed: every line is on disk


def jsonl_recorder(path: str | os.PathLike[str]) -> Recorder:
    """A recorder appending JSON lines to `path` (line-buffered; the file stays open for the
    process's life)."""
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)
    return Recorder(_JsonLines(f))


def recorder_from_env(environ: Mapping[str, str] = os.environ) -> Recorder | None:
    path = environ.get(ENV)
    return jsonl_recorder(path) if path else None


def load(path: str | os.PathLike[str]) -> list[Event]:
    """A recording's events; a torn last line (the process was killed mid-write) is left out."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


def normalise(events: Iterable[Event]) -> dict[str, Any]:
    """What does not depend on timing: the IPC states in order; the ring messages (per type,
    the pipes and their TD counts; and every message in order); the MUX commands in each
    direction in order, with repeats of the same command collapsed; which channels carried UL
    and DL transfers, and how many. Doorbells are counted, never compared by number (the host may
    coalesce them)."""
    ipc: list[str] = []
    msgs: dict[str, set[tuple[int, int]]] = collections.defaultdict(set)
    order: list[str] = []
    statuses: set[str] = set()
    mux: dict[str, list[str]] = {"mux_ul": [], "mux_dl": []}
    tds: dict[str, collections.Counter[int]] = {"ul_td": collections.Counter(),
                                                "dl_td": collections.Counter()}
    doorbells = 0
    for ev in events:
        kind = ev.get("ev")
        if kind == "ipc":
            state = str(ev.get("state"))
            if not ipc or ipc[-1] != state:
                ipc.append(state)
        elif kind == "msg":
            msgs[str(ev.get("type"))].add((int(ev.get("pipe", -1)), int(ev.get("tds", 0))))
            order.append(f"{ev.get('type')}:{ev.get('pipe', -1)}")
            statuses.add(str(ev.get("status")))
        elif kind in mux:
            name = f"{ev.get('cmd')}:{ev.get('if_id')}"
            seq = mux[kind]
            if not seq or seq[-1] != name:
                seq.append(name)
        elif kind in tds:
            tds[kind][int(ev.get("channel", -1))] += 1
        elif kind == "doorbell":
            doorbells += 1
    return {
        "ipc": ipc,
        "msgs": {k: sorted(v) for k, v in sorted(msgs.items())},
        "msg_order": order,
        "msg_status": sorted(statuses),
        "mux_ul": mux["mux_ul"], "mux_dl": mux["mux_dl"],
        "ul_td": dict(sorted(tds["ul_td"].items())),
        "dl_td": dict(sorted(tds["dl_td"].items())),
        "doorbells": doorbells,
    }
