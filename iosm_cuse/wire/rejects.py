"""Dropped or rejected untrusted input, one mechanism for every layer.

Each event is counted per kind and logged as one line per kind: the first at once, later ones
at most once per `every` seconds, with the running count. A flood of bad input therefore costs a
counter bump, not a log line per event. Both ends of the bus use it (device-written rings and
TDs, host-written messages), so do the MUX users, the packet paths (links, the model's gateway)
and the ports (CUSE requests, the PTY stream). Plain traffic counters (packets, bytes) stay
plain ints where they are bumped; this is for what is thrown away.

Pure: the standard library only, and the clock is injectable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger("iosm_cuse.wire.rejects")

LOG_EVERY = 10.0       # s between two lines of one kind (device/host protocol input)
PACKET_LOG_EVERY = 60.0  # s for packet paths, where a misbehaving peer drops at packet rate

Clock = Callable[[], float]


class Rejects:
    """Counters of rejected or dropped input by kind, with one rate-limited log line per kind.

    `what` starts every line (who drops, e.g. "gateway" or "wwan0-1"); `kinds` are counters
    that exist (at 0) before their first event, so status output always shows them.
    """

    def __init__(self, logger: logging.Logger = log, every: float = LOG_EVERY,
                 what: str = "rejected device input", *, kinds: Iterable[str] = (),
                 clock: Clock = time.monotonic) -> None:
        self.what = what
        self.counters: dict[str, int] = dict.fromkeys(kinds, 0)
        self._logger = logger
        self._every = every
        self._clock = clock
        self._last_log: dict[object, float] = {}

    def __call__(self, kind: str, detail: str, *args: object, per: object = None) -> None:
        """Count one event of `kind`; log `detail % args` unless this kind (and `per`, e.g. a
        session, when given) was logged less than `every` seconds ago. The detail is only
        formatted when it is logged."""
        n = self.counters.get(kind, 0) + 1
        self.counters[kind] = n
        key = kind if per is None else (kind, per)
        now = self._clock()
        last = self._last_log.get(key)
        if last is not None and now - last < self._every:
            return
        self._last_log[key] = now
        text = detail % args if args else detail
        self._logger.warning("%s: %s [%s: %d so far]", self.what, text, kind, n)

    def count(self, kind: str, n: int = 1) -> None:
        """Count `n` events of `kind` without a log line: for drops whose cause was reported
        where it happened (a MUX that refused a packet counts and logs its own reason)."""
        self.counters[kind] = self.counters.get(kind, 0) + n

    def __getitem__(self, kind: str) -> int:
        return self.counters.get(kind, 0)

    @property
    def total(self) -> int:
        return sum(self.counters.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counters)


def merged(plain: Mapping[str, int], rejects: Rejects,
           order: Iterable[str] | None = None) -> dict[str, int]:
    """Plain counters and a Rejects' counters as one dict (for status output); in `order` when
    given (names missing from both count 0)."""
    both = {**plain, **rejects.counters}
    if order is None:
        return both
    return {name: both.get(name, 0) for name in order}
