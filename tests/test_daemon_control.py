"""The control protocol: codec, checks against the declared operations, the socket server."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iosm_cuse.control import (
    MAX_LINE,
    OPS,
    ControlError,
    ControlServer,
    Request,
    call,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
    handle_line,
)


async def echo(op: str, args: dict[str, Any]) -> dict[str, Any]:
    if op == "link.add" and args["linkid"] == 1:
        raise ControlError(errno.EBUSY, "link id 1 is already used by wwan0-1")
    if op == "link.del":
        raise RuntimeError("handler bug")
    return {"op": op, "args": args}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_request_round_trip_fills_optional_args() -> None:
    req = Request(7, "link.add", {"dev": "wwan0-2", "linkid": 2})
    got = decode_request(encode_request(req))
    assert got == Request(7, "link.add", {"dev": "wwan0-2", "parent": None, "linkid": 2,
                                           "mtu": None})


@pytest.mark.parametrize(("line", "err", "text"), [
    (b"not json\n", errno.EINVAL, "not a JSON line"),
    (b"[1, 2]\n", errno.EINVAL, "JSON object"),
    (b'{"id": 1}\n', errno.EINVAL, "no 'op'"),
    (b'{"id": 1, "op": "reboot"}\n', errno.EOPNOTSUPP, "unknown operation"),
    (b'{"id": 1, "op": "link.add", "args": {}}\n', errno.EINVAL, "missing argument 'linkid'"),
    (b'{"id": 1, "op": "link.add", "args": {"linkid": "1"}}\n', errno.EINVAL, "must be int"),
    (b'{"id": 1, "op": "link.add", "args": {"linkid": true}}\n', errno.EINVAL, "must be int"),
    (b'{"id": 1, "op": "status", "args": {"x": 1}}\n', errno.EINVAL, "unknown argument 'x'"),
    (b'{"id": "a", "op": "status"}\n', errno.EINVAL, "id must be an integer"),
    (b'{"id": 1, "op": "status", "args": []}\n', errno.EINVAL, "'args' must be an object"),
    (b"\xff\xfe\n", errno.EINVAL, "not a JSON line"),
    (b"[" * 100_000 + b"\n", errno.EMSGSIZE, "longer than"),
])
def test_bad_requests_are_rejected_with_errno(line: bytes, err: int, text: str) -> None:
    with pytest.raises(ControlError) as info:
        decode_request(line)
    assert info.value.errno == err
    assert text in info.value.message


def test_handle_line_answers_errors_with_the_request_id() -> None:
    out = json.loads(run(handle_line(b'{"id": 5, "op": "link.add", "args": {"linkid": 1}}',
                                     echo)))
    assert out == {"id": 5, "ok": False, "errno": errno.EBUSY,
                   "error": "link id 1 is already used by wwan0-1"}
    bug = json.loads(run(handle_line(b'{"id": 6, "op": "link.del", "args": {}}', echo)))
    assert bug["ok"] is False and bug["errno"] == errno.EIO and "handler bug" in bug["error"]
    bad = json.loads(run(handle_line(b'{"id": 9, "op": "nope"}', echo)))
    assert bad["id"] == 9 and bad["errno"] == errno.EOPNOTSUPP


def test_decode_response_raises_the_daemon_error() -> None:
    assert decode_response(encode_result(3, {"a": 1}), 3) == {"a": 1}
    with pytest.raises(ControlError) as info:
        decode_response(encode_error(3, ControlError(errno.EBUSY, "busy")), 3)
    assert (info.value.errno, info.value.message) == (errno.EBUSY, "busy")
    for line in (b"garbage", encode_result(4, {}), b'{"id": 3, "ok": false}', b'{"id": 3}'):
        with pytest.raises(ControlError) as info:
            decode_response(line, 3)
        assert info.value.errno == errno.EPROTO


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda op, args, rid: json.dumps({"id": rid, "op": op, "args": args}).encode(),
              st.sampled_from([*OPS, "x"]),
              st.dictionaries(st.sampled_from(["dev", "linkid", "parent", "mtu", "zz"]),
                              st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                        st.booleans(), st.lists(st.integers(), max_size=2))),
              st.one_of(st.integers(), st.text(max_size=3), st.none())),
))
def test_any_line_gets_exactly_one_well_formed_response(line: bytes) -> None:
    out = run(handle_line(line, echo))
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    obj = json.loads(out)
    assert isinstance(obj["id"], int)
    if obj["ok"]:
        op = obj["result"]["op"]
        assert set(obj["result"]["args"]) == {a.name for a in OPS[op]}
    else:
        assert isinstance(obj["errno"], int) and obj["error"]


def test_server_socket_is_private_and_answers_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run" / "wwan0.sock"

    async def main() -> None:
        server = ControlServer(path, echo)
        await server.start()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            # Two requests in one write, a bad one in between: three answers, in order.
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"id":1,"op":"status"}\nbad\n{"id":2,"op":"link.show"}\n')
            lines = [json.loads(await reader.readline()) for _ in range(3)]
            assert [(o["id"], o["ok"]) for o in lines] == [(1, True), (0, False), (2, True)]
            # The blocking client, as the CLI uses it.
            result = await asyncio.to_thread(call, path, "link.show", {"dev": "wwan0"})
            assert result == {"op": "link.show", "args": {"dev": "wwan0"}}
            with pytest.raises(ControlError) as info:
                await asyncio.to_thread(call, path, "link.add", {"linkid": 1})
            assert info.value.errno == errno.EBUSY
            writer.close()
        finally:
            await server.close()
        assert not path.exists()

    run(main())


def test_oversized_line_is_refused_and_the_server_survives(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"

    async def main() -> None:
        server = ControlServer(path, echo)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"x" * (MAX_LINE + 100))
            err = json.loads(await reader.readline())
            assert err["errno"] == errno.EMSGSIZE
            assert await reader.read() == b""  # the server hung up on that client only
            writer.close()
            assert (await asyncio.to_thread(call, path, "status"))["op"] == "status"
        finally:
            await server.close()

    run(main())


def test_client_reports_a_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlError) as info:
        call(tmp_path / "none.sock", "status")
    assert info.value.errno == errno.ECONNREFUSED
    assert "iosm-cuse up" in info.value.message
    # A socket file nobody listens on (a dead daemon's) is the same case.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    with pytest.raises(ControlError) as info:
        call(dead, "status")
    assert info.value.errno == errno.ECONNREFUSED
    assert os.path.exists(dead)
