"""Scenarios: a TOML timeline of live-control actions (docs/control.md §3).

    name = "flaky coverage"
    [[step]]
    at = 0.0
    action = "signal"
    args = { rssi = 4 }
    [[step]]
    at = 2.5
    action = "register"
    args = { state = "searching" }

`parse` is sans-IO (text in, a checked `Scenario` out; ScenarioError names the step and its
line); every step's action and arguments are checked against the model's declaration
(sim/control.ACTIONS) before anything is played. `play` runs the steps in order at their times
through a `send` function: the CLI's (`iosm-cuse modem play`, over the control socket) or the
daemon's own (`iosm-cuse up --scenario`). Steps run one after the other, each after the
previous one's answer, so the same file gives the same sequence of indications.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from iosm_cuse.sim.control import ACTIONS, ActionError, check
from iosm_cuse.wire.args import is_int

MAX_STEPS = 10_000
MAX_AT = 7 * 24 * 3600.0   # seconds: a week of timeline is plenty
TOP_KEYS = frozenset({"name", "description", "step"})
STEP_KEYS = frozenset({"at", "action", "args"})
_STEP_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*step[ \t]*\]\]", re.MULTILINE)


class ScenarioError(ValueError):
    """A scenario file that cannot be played; the message names the step and line."""


@dataclass(frozen=True)
class Step:
    at: float                 # seconds after the start
    action: str               # a key of sim.control.ACTIONS
    args: dict[str, Any]      # checked; optional arguments left out are None
    line: int                 # where its [[step]] is, for messages (0: unknown)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: tuple[Step, ...]

    @property
    def duration(self) -> float:
        return self.steps[-1].at if self.steps else 0.0


def parse(text: str, source: str = "scenario") -> Scenario:
    """Check a whole scenario; ScenarioError for the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not TOML: {exc}") from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ScenarioError(f"{source}: unknown key {unknown[0]!r} (expected name, "
                            "description and [[step]] tables)")
    name, description = data.get("name", ""), data.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ScenarioError(f"{source}: name and description must be strings")
    raw = data.get("step", [])
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise ScenarioError(f"{source}: steps are [[step]] tables")
    if not raw:
        raise ScenarioError(f"{source}: no [[step]]")
    if len(raw) > MAX_STEPS:
        raise ScenarioError(f"{source}: {len(raw)} steps, at most {MAX_STEPS}")
    lines = [text.count("\n", 0, m.start()) + 1 for m in _STEP_HEADER.finditer(text)]
    steps: list[Step] = []
    for n, item in enumerate(raw, 1):
        line = lines[n - 1] if len(lines) == len(raw) else 0
        where = f"{source}:{line}: step {n}" if line else f"{source}: step {n}"
        steps.append(_step(item, where, line, steps[-1].at if steps else 0.0))
    return Scenario(name, description, tuple(steps))


def _step(item: dict[str, Any], where: str, line: int, previous_at: float) -> Step:
    unknown = sorted(set(item) - STEP_KEYS)
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r} (a step has at, action, "
                            "args)")
    at = item.get("at")
    if not (is_int(at) or isinstance(at, float)) or not 0 <= at <= MAX_AT:
        raise ScenarioError(f"{where}: 'at' must be seconds from the start, 0..{MAX_AT:g}")
    if at < previous_at:
        raise ScenarioError(f"{where}: at = {at} is before the previous step's "
                            f"{previous_at}: steps are in time order")
    action = item.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise ScenarioError(f"{where}: unknown action {action!r}; actions: "
                            f"{', '.join(ACTIONS)}")
    args = item.get("args", {})
    if not isinstance(args, dict):
        raise ScenarioError(f"{where}: 'args' must be a table")
    try:
        checked = check(action, args)
    except ActionError as exc:
        raise ScenarioError(f"{where}: {exc.message}") from None
    return Step(float(at), action, checked, line)


def given_args(step: Step) -> dict[str, Any]:
    """The step's arguments as a request carries them (those left out omitted)."""
    return {k: v for k, v in step.args.items() if v is not None}


# A modem restarting (after a `crash` step) answers EAGAIN: the step waits for it this long.
BUSY_RETRY_S = 20.0
BUSY_POLL_S = 0.25

Send = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
Report = Callable[[Step, dict[str, Any] | None, Exception | None], None]


async def _send_retrying(send: Send, step: Step, clock: Callable[[], float]
                         ) -> dict[str, Any]:
    deadline = clock() + BUSY_RETRY_S
    while True:
        try:
            return await send(step.action, given_args(step))
        except Exception as exc:
            if getattr(exc, "errno", None) != errno.EAGAIN or clock() > deadline:
                raise
        await asyncio.sleep(BUSY_POLL_S)


async def play(scenario: Scenario, send: Send, report: Report | None = None, *,
               clock: Callable[[], float] = time.monotonic,
               stop_on_error: bool = True) -> int:
    """Run the steps at their times: each is sent (`send(action, args)`) once its time has come
    and the previous one was answered. Returns the number of steps that failed; with
    `stop_on_error` the first failure ends the play (it is re-raised)."""
    start = clock()
    failed = 0
    for step in scenario.steps:
        delay = start + step.at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            result = await _send_retrying(send, step, clock)
        except Exception as exc:
            failed += 1
            if report is not None:
                report(step, None, exc)
            if stop_on_error:
                raise
            continue
        if report is not None:
            report(step, result, None)
    return failed
