"""Traffic shaping of one session, sans-IO: given a packet's size and the time, when it may
leave, or that it is dropped. The packet gateway (gateway.py) holds the packets and runs the
timers; nothing here reads a clock or sleeps.

What a `Shaper` does to each packet, in this order (as netem on an egress queue):

1. loss: dropped with probability loss_percent/100 (Bernoulli, from the RNG it is given, so a
   seeded run drops the same packets every time);
2. rate: a token bucket of rate_mbit, filled continuously and holding at most `burst_bytes`
   (a few packets: the cap holds over any interval longer than a millisecond or two). A packet
   that finds too few tokens waits until there are enough; packets leave in order, so the
   bucket's debt is the queue. A packet arriving with `limit` packets still waiting is dropped
   (netem's default limit, 1000 packets: a tail-drop queue, not an unbounded one);
3. delay: every packet leaves delay_ms after the rate would let it go.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import asdict, dataclass

MAX_DELAY_MS = 60_000.0
MAX_RATE_MBIT = 100_000.0
MIN_RATE_MBIT = 0.001  # 1 kbit/s
QUEUE_LIMIT = 1000  # packets waiting for the rate (netem's default limit)
BURST_S = 0.002  # the bucket holds this long of the rate...
MIN_BURST_BYTES = 2 * 2048  # ...and at least two of the largest packets (MUX Lite: 2032)


@dataclass(frozen=True)
class ShapeSpec:
    """A session's shaping as set: delay in ms, loss in percent, rate in Mbit/s (None: no
    cap). Bad values raise ValueError with the reason."""

    delay_ms: float = 0.0
    loss_percent: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        for name in ("delay_ms", "loss_percent", "rate_mbit"):
            value = getattr(self, name)
            if value is None and name == "rate_mbit":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if not 0.0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be 0..{MAX_DELAY_MS:.0f}")
        if not 0.0 <= self.loss_percent <= 100.0:
            raise ValueError("loss_percent must be 0..100")
        if self.rate_mbit is not None and not MIN_RATE_MBIT <= self.rate_mbit <= MAX_RATE_MBIT:
            raise ValueError(f"rate_mbit must be {MIN_RATE_MBIT}..{MAX_RATE_MBIT:.0f}")

    def as_dict(self) -> dict[str, float | None]:
        plain: dict[str, float | None] = {k: (float(v) if v is not None else None)
                                          for k, v in asdict(self).items()}
        return plain


class Shaper:
    """The decisions for one session's packets in one direction."""

    def __init__(self, spec: ShapeSpec, rng: random.Random, *, limit: int = QUEUE_LIMIT
                 ) -> None:
        self.spec = spec
        self._rng = rng
        self._limit = limit
        self._delay = spec.delay_ms / 1000.0
        self._loss = spec.loss_percent / 100.0
        self._bytes_per_s = spec.rate_mbit * 1e6 / 8 if spec.rate_mbit is not None else None
        self._burst = max(MIN_BURST_BYTES, (self._bytes_per_s or 0.0) * BURST_S)
        self._tokens = self._burst  # at `_filled_at`; negative: owed by waiting packets
        self._filled_at: float | None = None
        self._waiting: deque[float] = deque()  # when each packet held by the rate leaves it
        self.passed = self.lost = self.overflowed = 0

    def admit(self, now: float, size: int) -> float | None:
        """When the packet of `size` bytes arriving at `now` (seconds, any monotonic clock)
        leaves; None if it is dropped (`lost` or `overflowed` counts which)."""
        if self._loss and self._rng.random() < self._loss:
            self.lost += 1
            return None
        leave = now
        rate = self._bytes_per_s
        if rate is not None:
            waiting = self._waiting
            while waiting and waiting[0] <= now:
                waiting.popleft()
            if len(waiting) >= self._limit:
                self.overflowed += 1
                return None
            if self._filled_at is not None:
                self._tokens = min(self._burst, self._tokens + (now - self._filled_at) * rate)
            self._filled_at = now
            self._tokens -= size
            if self._tokens < 0:
                leave = now - self._tokens / rate
                waiting.append(leave)
        self.passed += 1
        return leave + self._delay
