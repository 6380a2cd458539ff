"""`ip link` argument forms for wwan links, parsed without I/O.

Accepted, in any order of the keyword pairs (as iproute2 does)::

    add [dev|name] NAME [parentdev-name PARENT] [type wwan] [linkid ID] [mtu MTU]
    del|delete [dev] NAME
    show|list|lst [[dev] NAME] [--json|-j|-json]

Errors are `LinkError(errno, message)` with iproute2's wording where it has one, so the CLI can
print them as `ip` would. Whether a parent or link id is *acceptable* (base name, 0..7) is the
link manager's business; this module only checks the shape of the command line.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IFNAMSIZ = 16  # names are at most IFNAMSIZ - 1 characters
U32_MAX = 0xFFFFFFFF

VERBS = {"add": "add", "del": "del", "delete": "del", "show": "show", "list": "show",
         "lst": "show"}
JSON_FLAGS = frozenset({"--json", "-j", "-json"})
# Keyword -> field; the value follows the keyword. `name` is iproute2's synonym of `dev` for add.
_ADD_KEYWORDS = {"dev": "dev", "name": "dev", "parentdev-name": "parent", "type": "type",
                 "linkid": "linkid", "mtu": "mtu"}
_NAME_KEYWORDS = {"dev": "dev"}
_DECIMAL = re.compile(r"[0-9]{1,10}")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,8}")
INCOMPLETE = 'Command line is not complete. Try "ip link help".'


class LinkError(Exception):
    """A link request that cannot be done; `errno` follows the kernel (EBUSY, EINVAL, ENODEV)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LinkCommand:
    verb: str                      # "add" | "del" | "show"
    dev: str | None = None
    parent: str | None = None
    linkid: int | None = None
    mtu: int | None = None
    json: bool = False

    def request(self) -> dict[str, Any]:
        """The control socket's arguments (control.OPS) for this command."""
        out: dict[str, Any] = {}
        for key in ("dev", "parent", "linkid", "mtu"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def check_ifname(name: str) -> None:
    """iproute2's check_ifname(): 1..15 bytes, no '/', no whitespace, not '.' or '..'."""
    raw = name.encode("utf-8", "surrogateescape")
    if (not raw or len(raw) >= IFNAMSIZ or name in (".", "..")
            or any(c == "/" or c == ":" or c.isspace() for c in name)):
        raise LinkError(errno.EINVAL, f'Error: argument "{name}" is wrong: "dev" not a valid '
                                      f'ifname')


def parse(argv: Sequence[str]) -> LinkCommand:
    """`["add", "dev", "wwan0-1", ...]` -> LinkCommand; the verb comes first."""
    if not argv:
        raise LinkError(errno.EINVAL, INCOMPLETE)
    verb = VERBS.get(argv[0])
    if verb is None:
        raise LinkError(errno.EINVAL,
                        f'Command "{argv[0]}" is unknown, try "ip link help".')
    return parse_verb(verb, argv[1:])


def parse_verb(verb: str, args: Sequence[str]) -> LinkCommand:
    """The arguments after the verb (`add`, `del`/`delete`, `show`/`list`)."""
    canonical = VERBS.get(verb)
    if canonical == "add":
        return _parse_add(args)
    if canonical == "del":
        fields, as_json = _pairs(args, _NAME_KEYWORDS, allow_json=False)
        if "dev" not in fields:
            raise LinkError(errno.EINVAL, 'Not enough information: "dev" argument is required.')
        return LinkCommand("del", dev=fields["dev"])
    if canonical == "show":
        fields, as_json = _pairs(args, _NAME_KEYWORDS, allow_json=True)
        return LinkCommand("show", dev=fields.get("dev"), json=as_json)
    raise LinkError(errno.EINVAL, f'Command "{verb}" is unknown, try "ip link help".')


def _parse_add(args: Sequence[str]) -> LinkCommand:
    fields, _ = _pairs(args, _ADD_KEYWORDS, allow_json=False)
    if "dev" not in fields:
        raise LinkError(errno.EINVAL, 'Not enough information: "dev" argument is required.')
    kind = fields.get("type", "wwan")
    if kind != "wwan":
        raise LinkError(errno.EOPNOTSUPP,
                        f'Error: link type "{kind}" is not supported here; only "type wwan".')
    if "linkid" not in fields:
        # The kernel's wwan newlink needs IFLA_WWAN_LINK_ID: missing -> EINVAL.
        raise LinkError(errno.EINVAL, 'Error: "linkid" is required for wwan links.')
    linkid = _u32("linkid", fields["linkid"])
    mtu = _u32("mtu", fields["mtu"]) if "mtu" in fields else None
    return LinkCommand("add", dev=fields["dev"], parent=fields.get("parent"), linkid=linkid,
                       mtu=mtu)


def _pairs(args: Sequence[str], keywords: dict[str, str],
           allow_json: bool) -> tuple[dict[str, str], bool]:
    """Walk `keyword value` pairs; one bare word is the device name. Duplicates and unknown
    words are refused with iproute2's message."""
    fields: dict[str, str] = {}
    as_json = False
    i = 0
    while i < len(args):
        word = args[i]
        if allow_json and word in JSON_FLAGS:
            as_json = True
            i += 1
            continue
        key = keywords.get(word)
        if key is not None:
            if i + 1 >= len(args):
                raise LinkError(errno.EINVAL, INCOMPLETE)
            value = args[i + 1]
            i += 2
        else:
            key, value = "dev", word
            i += 1
        if key in fields:
            raise LinkError(errno.EINVAL,
                            f'Error: either "{key}" is duplicate, or "{word}" is a garbage.')
        if key == "dev" or key == "parent":
            check_ifname(value)
        fields[key] = value
    return fields, as_json


def _u32(what: str, text: str) -> int:
    # iproute2's get_u32 takes decimal, 0x hex and 0 octal; keep to decimal and hex.
    value = -1
    if _DECIMAL.fullmatch(text):
        value = int(text, 10)
    elif _HEX.fullmatch(text):
        value = int(text, 16)
    if not 0 <= value <= U32_MAX:
        raise LinkError(errno.EINVAL, f'Error: argument "{text}" is wrong: Invalid "{what}" '
                                      f'value')
    return value
