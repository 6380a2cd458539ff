"""Arguments of a JSON request, declared as data and checked in one place.

Both ends of the control path use it: the daemon's control socket (`iosm_cuse/control.py`)
checks a request against its operation's arguments before anything acts on it, and the model
process checks the live-control actions it is sent (`iosm_cuse/sim/control.py`) against the same
declarations. A value outside its declared choices or range is refused here, so a handler only
ever sees well-typed, in-range arguments.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import Any, TypeGuard


class ArgError(Exception):
    """A request's arguments do not fit their declaration; `errno` is EINVAL."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


@dataclass(frozen=True)
class Arg:
    """One argument: its JSON type (int, float, str, bool or dict), whether it may be left out,
    and what values it may take: `choices` (an enum's values), `lo`..`hi` (numbers; `also`
    names values allowed outside the range, e.g. 99 for "unknown"), `max_len` (strings)."""

    name: str
    kind: type
    required: bool = True
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    also: tuple[int, ...] = ()
    max_len: int | None = None
    pattern: str | None = None   # a string's whole value must match this regular expression

    def check(self, op: str, value: object) -> object:
        """`value` if it fits; ArgError naming `op` and the argument otherwise."""
        where = f"{op}: {self.name!r}"
        if self.kind is int:
            ok = is_int(value)
        elif self.kind is float:
            ok = is_int(value) or isinstance(value, float)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            raise ArgError(f"{where} must be {_KIND_NAMES.get(self.kind, self.kind.__name__)}")
        if self.choices and value not in self.choices:
            raise ArgError(f"{where} must be one of {'|'.join(self.choices)}, not {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ArgError(f"{where} must be a finite number")
            below = self.lo is not None and value < self.lo
            above = self.hi is not None and value > self.hi
            if (below or above) and value not in self.also:
                raise ArgError(f"{where} must be {self.range_text()}, not {value!r}")
        if isinstance(value, str):
            if self.max_len is not None and len(value) > self.max_len:
                raise ArgError(f"{where} is longer than {self.max_len} characters")
            if any(ord(c) < 0x20 and c not in "\n\t" for c in value):
                raise ArgError(f"{where} holds control characters")
            if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
                raise ArgError(f"{where}: {value!r} is not {self.pattern_text()}")
        return value

    def pattern_text(self) -> str:
        return PATTERN_NAMES.get(self.pattern or "", f"/{self.pattern}/")

    def range_text(self) -> str:
        lo = "" if self.lo is None else f"{self.lo:g}"
        hi = "" if self.hi is None else f"{self.hi:g}"
        text = f"{lo}..{hi}"
        return text + "".join(f" or {v}" for v in self.also)


# What a pattern means, for the error message.
MCCMNC = r"[0-9]{5,6}"
PHONE_NUMBER = r"\+?[0-9]{1,20}"
PATTERN_NAMES = {MCCMNC: "an MCCMNC (5 or 6 digits)",
                 PHONE_NUMBER: "a phone number (digits, optionally after +)"}

_KIND_NAMES = {int: "int", float: "a number", str: "str", bool: "true or false",
               dict: "an object"}


def check_args(op: str, spec: tuple[Arg, ...], args: dict[str, Any]) -> dict[str, Any]:
    """`args` checked against `spec`: every declared name present (None when optional and left
    out), nothing undeclared; ArgError for the first problem."""
    known = {a.name for a in spec}
    extra = sorted(set(args) - known)
    if extra:
        raise ArgError(f"{op}: unknown argument {extra[0]!r}")
    out: dict[str, Any] = {}
    for a in spec:
        value = args.get(a.name)
        if value is None:
            if a.required:
                raise ArgError(f"{op}: missing argument {a.name!r}")
            out[a.name] = None
            continue
        out[a.name] = a.check(op, value)
    return out


def is_int(value: object) -> TypeGuard[int]:
    # bool is an int in Python but not in the protocol.
    return isinstance(value, int) and not isinstance(value, bool)
