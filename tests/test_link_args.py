"""`ip link` argument forms accepted by `iosm-cuse link` (iosm_cuse.link.args)."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iosm_cuse.link.args import LinkCommand, LinkError, parse, parse_verb

PAIRS = [["dev", "wwan0-1"], ["parentdev-name", "wwan0"], ["type", "wwan"], ["linkid", "1"]]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_add_accepts_every_order_of_the_keyword_pairs(order: tuple[int, ...]) -> None:
    argv = ["add"] + [w for i in order for w in PAIRS[i]]
    assert parse(argv) == LinkCommand("add", dev="wwan0-1", parent="wwan0", linkid=1)


@pytest.mark.parametrize("argv, expected", [
    (["add", "wwan0-1", "linkid", "1"], LinkCommand("add", dev="wwan0-1", linkid=1)),
    (["add", "name", "wwan0-3", "type", "wwan", "linkid", "3"],
     LinkCommand("add", dev="wwan0-3", linkid=3)),
    (["add", "wwan0-2", "parentdev-name", "wwan0", "type", "wwan", "linkid", "0x2", "mtu",
      "1400"], LinkCommand("add", dev="wwan0-2", parent="wwan0", linkid=2, mtu=1400)),
    (["add", "linkid", "9", "x"], LinkCommand("add", dev="x", linkid=9)),  # range: manager's
    (["del", "dev", "wwan0-1"], LinkCommand("del", dev="wwan0-1")),
    (["delete", "wwan0-1"], LinkCommand("del", dev="wwan0-1")),
    (["show"], LinkCommand("show")),
    (["list", "dev", "wwan0"], LinkCommand("show", dev="wwan0")),
    (["show", "wwan0-1", "--json"], LinkCommand("show", dev="wwan0-1", json=True)),
    (["show", "-j"], LinkCommand("show", json=True)),
])
def test_accepted_forms(argv: list[str], expected: LinkCommand) -> None:
    assert parse(argv) == expected


def test_request_carries_only_what_was_given() -> None:
    assert parse(["add", "wwan0-1", "linkid", "1"]).request() == {"dev": "wwan0-1", "linkid": 1}
    assert parse(["add", "dev", "a", "parentdev-name", "wwan0", "linkid", "2", "mtu",
                  "1500"]).request() == {"dev": "a", "parent": "wwan0", "linkid": 2,
                                         "mtu": 1500}
    assert parse_verb("show", []).request() == {}


@pytest.mark.parametrize("argv, err, text", [
    ([], errno.EINVAL, "not complete"),
    (["frob"], errno.EINVAL, 'Command "frob" is unknown'),
    (["add", "dev", "wwan0-1", "foo", "linkid", "1"], errno.EINVAL,
     'either "dev" is duplicate, or "foo" is a garbage'),
    (["add", "dev", "a", "dev", "b", "linkid", "1"], errno.EINVAL, '"dev" is duplicate'),
    (["add", "a", "linkid", "1", "linkid", "2"], errno.EINVAL, '"linkid" is duplicate'),
    (["add", "a", "linkid"], errno.EINVAL, "not complete"),
    (["add", "a", "linkid", "x"], errno.EINVAL, 'argument "x" is wrong: Invalid "linkid"'),
    (["add", "a", "linkid", "-1"], errno.EINVAL, 'Invalid "linkid"'),
    (["add", "a", "linkid", "4294967296"], errno.EINVAL, 'Invalid "linkid"'),
    (["add", "a", "linkid", "1_0"], errno.EINVAL, 'Invalid "linkid"'),
    (["add", "a", "linkid", "1", "mtu", "big"], errno.EINVAL, 'Invalid "mtu"'),
    (["add", "a"], errno.EINVAL, '"linkid" is required'),
    (["add", "linkid", "1"], errno.EINVAL, '"dev" argument is required'),
    (["add", "a", "type", "vlan", "linkid", "1"], errno.EOPNOTSUPP, 'only "type wwan"'),
    (["add", "a" * 16, "linkid", "1"], errno.EINVAL, "not a valid ifname"),
    (["add", "a/b", "linkid", "1"], errno.EINVAL, "not a valid ifname"),
    (["add", "a", "parentdev-name", "w w", "linkid", "1"], errno.EINVAL, "not a valid ifname"),
    (["del"], errno.EINVAL, '"dev" argument is required'),
    (["del", "a", "b"], errno.EINVAL, "is a garbage"),
    (["del", "a", "--json"], errno.EINVAL, "is a garbage"),
    (["show", "a", "b"], errno.EINVAL, "is a garbage"),
])
def test_errors(argv: list[str], err: int, text: str) -> None:
    with pytest.raises(LinkError) as info:
        parse(argv)
    assert info.value.errno == err
    assert text in info.value.message


def test_fifteen_characters_is_the_longest_name() -> None:
    assert parse(["add", "a" * 15, "linkid", "1"]).dev == "a" * 15


@given(st.lists(st.sampled_from(["add", "del", "delete", "show", "dev", "name", "type", "wwan",
                                 "linkid", "mtu", "parentdev-name", "1", "-1", "x", "--json",
                                 "", "wwan0-1", "0x10"]), max_size=10)
       | st.lists(st.text(max_size=20), max_size=10))
def test_any_argv_parses_or_raises_link_error(argv: list[str]) -> None:
    try:
        cmd = parse(argv)
    except LinkError as exc:
        assert exc.errno > 0 and exc.message
    else:
        assert cmd.verb in ("add", "del", "show")
        assert cmd.dev is None or 0 < len(cmd.dev.encode("utf-8", "surrogateescape")) <= 15
