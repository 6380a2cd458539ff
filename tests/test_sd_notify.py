"""systemd's notification protocol (docs/systemd.md §1): the pure encoder and address parser,
the sender against a datagram socket the test binds (path and abstract), and `iosm-cuse up`
telling a socket READY=1 once its port and wwan0 exist, and STOPPING=1 when it stops."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_up import StartUp
from helpers import until
from hypothesis import given
from hypothesis import strategies as st

from iosm_cuse.sd_notify import ENV, Notifier, NotifyError, encode, notify_address

DATAGRAM_MAX = 4096


def fields_of(message: bytes) -> dict[str, str]:
    """What systemd reads from a datagram: one KEY=VALUE per line."""
    text = message.decode()
    assert text.endswith("\n")
    return dict(line.split("=", 1) for line in text[:-1].split("\n"))


@contextlib.contextmanager
def bound_socket(address: str | bytes) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(30)
        yield sock
    finally:
        sock.close()


# --- the pure core ---------------------------------------------------------------------------


def test_addresses_path_and_abstract() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/42") == \
        b"\0/org/freedesktop/systemd1/notify/42"


@pytest.mark.parametrize("value", ["", "@", "relative/path", "vsock:2:1234", "/" + "x" * 200])
def test_addresses_refused(value: str) -> None:
    with pytest.raises(NotifyError):
        notify_address(value)


def test_encode_keeps_order_and_ends_each_line() -> None:
    assert encode({"READY": "1", "STATUS": "port /dev/wwan0mbim0"}) == \
        b"READY=1\nSTATUS=port /dev/wwan0mbim0\n"


@pytest.mark.parametrize("key", ["", "ready", "STATUS=", "ST ATUS", "STATUS\n"])
def test_encode_refuses_bad_keys(key: str) -> None:
    with pytest.raises(NotifyError):
        encode({key: "1"})


@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True), st.text(),
                       max_size=5))
def test_every_value_stays_in_its_field(fields: dict[str, str]) -> None:
    """A newline in a value (a STATUS built from an error message) cannot forge READY=1."""
    if not fields:
        return
    decoded = fields_of(encode(fields))
    assert list(decoded) == list(fields)
    assert decoded == {key: value.replace("\n", " ") for key, value in fields.items()}


# --- the sender ------------------------------------------------------------------------------


def test_from_environ_takes_the_variable_away(tmp_path: Path) -> None:
    env = {ENV: str(tmp_path / "notify"), "PATH": "/bin"}
    notifier = Notifier.from_environ(env)
    assert notifier.enabled and env == {"PATH": "/bin"}  # children never see it


def test_without_the_variable_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.ready("ready")  # no socket to send to: a no-op, no error
    notifier.close()


def test_a_bad_variable_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="iosm_cuse.sd_notify"):
        notifier = Notifier.from_environ({ENV: "vsock:2:9"})
    assert not notifier.enabled
    assert "vsock:2:9" in caplog.text


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_status_stopping_arrive_as_datagrams(tmp_path: Path, abstract: bool) -> None:
    value = f"@iosm-test-notify-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with bound_socket(notify_address(value)) as sock:
        notifier = Notifier.from_environ({ENV: value})
        try:
            notifier.ready("MBIM port /dev/wwan0mbim0")
            notifier.status("modem down: timeout")
            notifier.stopping("stopping: asked to stop")
        finally:
            notifier.close()
        got = [fields_of(sock.recv(DATAGRAM_MAX)) for _ in range(3)]
    assert got == [{"READY": "1", "STATUS": "MBIM port /dev/wwan0mbim0"},
                   {"STATUS": "modem down: timeout"},
                   {"STOPPING": "1", "STATUS": "stopping: asked to stop"}]


def test_a_vanished_socket_is_logged_once_and_never_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({ENV: str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="iosm_cuse.sd_notify"):
        for _ in range(3):
            notifier.status("still here")
    notifier.close()
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


# --- the daemon ------------------------------------------------------------------------------


@pytest.mark.host
def test_up_says_ready_once_port_and_link_exist_and_stopping_on_sigterm(
        start_up: StartUp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A path socket: `ip netns exec` keeps the file system, but abstract names are per network
    # namespace and the daemon runs in one of its own.
    path = tmp_path / "notify"
    with bound_socket(str(path)) as sock:
        monkeypatch.setenv(ENV, str(path))
        up = start_up()
        ready = fields_of(sock.recv(DATAGRAM_MAX))
        assert ready["READY"] == "1"
        assert f"MBIM port {up.port}" in ready["STATUS"] and "data link wwan0" in ready["STATUS"]
        assert "wwan0" in up.links() and Path(up.port).exists()
        # Only the main process talks to systemd: the model process must not inherit the socket.
        model_pid = up.status()["modem"]["pid"]
        environ = Path(f"/proc/{model_pid}/environ").read_bytes().split(b"\0")
        assert not any(var.startswith(ENV.encode() + b"=") for var in environ)
        up.proc.send_signal(signal.SIGTERM)
        stopping = fields_of(sock.recv(DATAGRAM_MAX))
        assert stopping == {"STOPPING": "1", "STATUS": "stopping: asked to stop"}
        until(lambda: up.proc.poll() is not None, 15, "up to exit after SIGTERM")
        assert up.proc.returncode == 0
        assert "wwan0" not in up.links()
