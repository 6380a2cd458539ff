"""Rejected untrusted input: counted per kind, logged once per kind and then at most once per
`every` seconds with the running count. Shared by both ends of the bus, the MUX codecs' users,
the packet paths and the ports, so every layer counts and reports bad input the same way."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("iosm_cuse.wire.rejects")


class Rejects:
    """Counters of rejected device input, one log line per kind (then at most one per `every`
    seconds, with the running count)."""

    def __init__(self, logger: logging.Logger = log, every: float = 10.0,
                 what: str = "device input") -> None:
        self.what = what
        self.counters: dict[str, int] = {}
        self._logger = logger
        self._every = every
        self._last_log: dict[str, float] = {}

    def __call__(self, kind: str, detail: str) -> None:
        n = self.counters.get(kind, 0) + 1
        self.counters[kind] = n
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is None or now - last >= self._every:
            self._last_log[kind] = now
            self._logger.warning("rejected %s [%s] (%d so far): %s", self.what, kind, n, detail)
