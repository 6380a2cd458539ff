"""The udev rules and the systemd unit: parsed for the keys we rely on (udevadm 252 has no
`verify`), the unit checked by `systemd-analyze verify`, install-udev into a prefix, and (host
tier) the rules loaded by the real udevadm in a private mount namespace."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from iosm_cuse.bus.pci import IOSM_PCI_IDS, IVSHMEM_PCI_ID
from iosm_cuse.cli import main
from iosm_cuse.system import uevent
from iosm_cuse.udev_install import (
    RULES,
    TEST_RULES,
    UNIT,
    InstallError,
    plan_install,
    render_rules,
    render_unit,
    source_dir,
)

UDEV = Path(__file__).resolve().parent.parent / "udev"

# udev(7): keys that only match, keys that only assign, keys that do both (with {attr}).
MATCH_KEYS = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "NAME", "SUBSYSTEM", "SUBSYSTEMS",
              "DRIVER", "DRIVERS", "TAG", "TAGS", "TEST", "PROGRAM", "RESULT", "CONST",
              "SYMLINK", "ENV", "ATTR", "ATTRS", "SYSCTL"}
ASSIGN_KEYS = {"NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "SECLABEL", "ATTR", "SYSCTL", "ENV",
               "TAG", "RUN", "LABEL", "GOTO", "IMPORT", "OPTIONS"}
TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def parse_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """udev rules text -> rules, each a list of (key, attr, op, value); raises on bad syntax."""
    rules = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = []
        for part in re.split(r',(?=\s*[A-Z_]+(?:\{[^}]*\})?\s*[=!+\-:])', line):
            m = TOKEN.fullmatch(part)
            assert m, f"cannot parse {part!r} in {line!r}"
            key, attr, op, value = m.groups()
            if op in ("==", "!="):
                assert key in MATCH_KEYS, f"{key} cannot match"
            else:
                assert key in ASSIGN_KEYS, f"{key} cannot be assigned"
            if key in ("ATTR", "ATTRS", "ENV"):
                assert attr, f"{key} needs {{name}}"
            tokens.append((key, attr, op, value))
        rules.append(tokens)
    return rules


def rules_of(name: str) -> list[list[tuple[str, str | None, str, str]]]:
    return parse_rules((UDEV / name).read_text())


def find(rules: list[list[tuple[str, str | None, str, str]]], key: str, attr: str | None = None,
         ) -> list[list[tuple[str, str | None, str, str]]]:
    return [r for r in rules if any(k == key and (attr is None or a == attr) for k, a, _, _ in r)]


def test_parser_rejects_what_udev_rejects() -> None:
    with pytest.raises(AssertionError):
        parse_rules('SUBSYSTEM=="pci", FOO="x"')
    with pytest.raises(AssertionError):
        parse_rules('SUBSYSTEM=="pci" GROUP="x"')  # missing comma
    with pytest.raises(AssertionError):
        parse_rules('RUN=="x"')  # RUN cannot match


def test_rules_parse_and_gotos_land() -> None:
    for name in (RULES, TEST_RULES):
        rules = rules_of(name)
        labels = [v for r in rules for k, _, _, v in r if k == "LABEL"]
        for r in rules:
            for k, _, _, v in r:
                if k == "GOTO":
                    assert v in labels, f"{name}: GOTO {v} has no LABEL"


def test_every_modem_id_is_marked_for_pci_and_uio() -> None:
    rules = rules_of(RULES)
    for subsystem, attr_key in (("pci", "ATTR"), ("uio", "ATTRS")):
        marked = set()
        for r in rules:
            d = {(k, a): v for k, a, _, v in r}
            if d.get(("SUBSYSTEM", None)) == subsystem and d.get(("ENV", "IOSM_CUSE")) == "modem":
                marked.add((int(d[(attr_key, "vendor")], 16), int(d[(attr_key, "device")], 16)))
        assert marked == set(IOSM_PCI_IDS), subsystem


def test_test_rules_mark_ivshmem_with_the_key_the_main_rules_read() -> None:
    test = rules_of(TEST_RULES)
    ids = {(int({(k, a): v for k, a, _, v in r}[(ak, "vendor")], 16),
            int({(k, a): v for k, a, _, v in r}[(ak, "device")], 16))
           for r in test for ak in ("ATTR", "ATTRS")
           if (ak, "vendor") in {(k, a) for k, a, _, _ in r}}
    assert ids == {tuple(IVSHMEM_PCI_ID)}
    assert all(("ENV", "IOSM_CUSE", "=", "test") in r for r in test)
    main_rules = rules_of(RULES)
    gate = [r for r in main_rules if ("ENV", "IOSM_CUSE", "==", "") in r]
    assert gate and ("GOTO", None, "=", "iosm_cuse_end") in gate[0]


def test_daemon_started_only_through_systemd_wants() -> None:
    rules = rules_of(RULES)
    (wants,) = find(rules, "ENV", "SYSTEMD_WANTS")
    assert ("TAG", None, "+=", "systemd") in wants  # SYSTEMD_WANTS needs the systemd tag
    assert ("SUBSYSTEM", None, "==", "uio") in wants and ("ACTION", None, "==", "add") in wants
    assert ("ENV", "SYSTEMD_WANTS", "+=", "iosm-cuse@%k.service") in wants
    for r in find(rules, "RUN"):
        for k, _, _, v in r:
            if k == "RUN":
                assert "iosm-cuse" not in v and "systemd-run" not in v and "&" not in v


def test_binding_rule_overrides_driver_for_pci_add() -> None:
    (bind,) = find(rules_of(RULES), "ATTR", "driver_override")
    assert ("ATTR", "driver_override", "=", "uio_pci_generic") in bind
    assert ("ACTION", None, "==", "add") in bind and ("SUBSYSTEM", None, "==", "pci") in bind


def test_mbim_port_group_and_mode() -> None:
    (port,) = find(rules_of(RULES), "GROUP")
    d = {(k, op): v for k, _, op, v in port}
    kernel = d[("KERNEL", "==")].replace("[0-9]*", "[0-9]+")  # udev's | is regex's
    assert d[("SUBSYSTEM", "==")] == "cuse"
    for name in ("wwan0mbim0", "wwan1at0", "wwan0at1"):  # and the AT ports (docs/at-ports.md)
        assert re.fullmatch(kernel, name), name
    assert not re.fullmatch(kernel, "wwan0")
    assert d[("GROUP", "=")] == "dialout" and d[("MODE", "=")] == "0660"


def test_tun_link_grouped_with_its_port_for_modemmanager() -> None:
    """The rule's ID_MM_PHYSDEV_UID for wwan<N> must be the one the daemon's forged port event
    carries for wwan<N>mbim0, or ModemManager sees two devices."""
    (link,) = find(rules_of(RULES), "TEST")
    d = {(k, a, op): v for k, a, op, v in link}
    assert d[("SUBSYSTEM", None, "==")] == "net" and d[("TEST", None, "==")] == "tun_flags"
    assert re.fullmatch(d[("KERNEL", None, "==")].replace("[0-9]*", "[0-9]+"), "wwan3")
    assert d[("ENV", "ID_MM_CANDIDATE", "=")] == "1"
    assert d[("ENV", "ID_MM_DEVICE_PROCESS", "=")] == "1"
    ports = uevent.Ports("wwan3", "wwan3mbim0", 10, 60, 7)
    assert d[("ENV", "ID_MM_PHYSDEV_UID", "=")].replace("%k", "wwan3") == \
        uevent.port_event(ports, "add", 1, 1)["ID_MM_PHYSDEV_UID"] == \
        uevent.net_event(ports, "add", 1, 1)["ID_MM_PHYSDEV_UID"]


def _verify_unit(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    unit = tmp_path / "iosm-cuse@uio0.service"
    unit.write_text(text)
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies(tmp_path: Path) -> None:
    text = (UDEV / UNIT).read_text()
    result = _verify_unit(tmp_path, text)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    for line in ("BindsTo=dev-%i.device", "After=dev-%i.device", "Restart=on-failure",
                 "KillSignal=SIGTERM", "ExecStart=/usr/bin/env iosm-cuse up --device /dev/%I"):
        assert line in text.splitlines()
    # as install-udev writes it: the absolute path of this installation's program
    program = str((Path(sys.executable).parent / "iosm-cuse").resolve())
    rendered = _verify_unit(tmp_path, render_unit(text, program))
    assert rendered.returncode == 0 and rendered.stderr.strip() == "", rendered.stderr
    missing = _verify_unit(tmp_path, render_unit(text, "/nonexistent/iosm-cuse"))
    assert "is not executable" in missing.stderr
    # and verify does catch mistakes, so the pass above means something
    bad = _verify_unit(tmp_path, text.replace("KillMode=mixed", "KillMode=sometimes"))
    assert "kill mode" in bad.stderr


def test_install_into_prefix_fills_group_and_program(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = Path(sys.executable).parent
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    result = CliRunner().invoke(main, ["install-udev", "--prefix", str(tmp_path),
                                       "--group", "netdev"])
    assert result.exit_code == 0, result.output
    rules = (tmp_path / "etc/udev/rules.d" / RULES).read_text()
    assert 'GROUP="netdev"' in rules and 'GROUP="dialout"' not in rules
    assert not (tmp_path / "etc/udev/rules.d" / TEST_RULES).exists()
    unit = (tmp_path / "etc/systemd/system" / UNIT).read_text()
    exec_line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert exec_line == f"ExecStart={(venv_bin / 'iosm-cuse').resolve()} up --device /dev/%I"
    assert "reload" not in result.output  # not the live root: nothing reloaded


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["install-udev", "--prefix", str(tmp_path), "--dry-run",
                                       "--test-device"])
    assert result.exit_code == 0, result.output
    assert "would write" in result.output and TEST_RULES in result.output
    assert list(tmp_path.iterdir()) == []


def test_bad_group_rejected(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["install-udev", "--prefix", str(tmp_path),
                                       "--group", 'x" MODE="0666'])
    assert result.exit_code != 0 and "bad group" in result.output
    with pytest.raises(InstallError):
        render_rules("no group here", "dialout")


def test_live_install_reloads_and_triggers_present_modems() -> None:
    plan = plan_install(source_dir(), Path("/"), "dialout", False, "/usr/bin/iosm-cuse",
                        udevd_running=True, systemd_running=True)
    cmds = [" ".join(c) for c in plan.commands]
    assert cmds[0] == "systemctl daemon-reload" and cmds[1] == "udevadm control --reload"
    assert any("--attr-match=device=0x7560" in c for c in cmds)
    assert not any("0x1110" in c for c in cmds)
    quiet = plan_install(source_dir(), Path("/"), "dialout", False, "/usr/bin/iosm-cuse",
                         udevd_running=False, systemd_running=False)
    assert quiet.commands == ()
    portable = plan_install(source_dir(), Path("/x"), "dialout", False, "/usr/bin/env iosm-cuse",
                            udevd_running=False, systemd_running=False)
    assert "ExecStart=/usr/bin/env iosm-cuse up" in portable.files[1][1]


@pytest.mark.host
@pytest.mark.skipif(shutil.which("udevadm") is None, reason="no udevadm")
def test_real_udevadm_loads_rules_without_complaint(tmp_path: Path) -> None:
    """udevadm test (no udevd needed) reads only the system rule dirs, so hide them behind
    tmpfs in a private mount namespace and put ours there alone."""
    device = next(iter(sorted(Path("/sys/bus/pci/devices").glob("*"))), None) \
        or Path("/sys/class/net/lo")
    script = (
        "set -e; for d in /etc/udev/rules.d /usr/lib/udev/rules.d /lib/udev/rules.d "
        "/run/udev/rules.d; do [ -d $d ] && mount -t tmpfs none $d; done; "
        f"cp {UDEV / RULES} {UDEV / TEST_RULES} /etc/udev/rules.d/; "
        "echo 'SUBSYSTEM==\"pci\", BOGUS=\"1\"' > /etc/udev/rules.d/99-canary.rules; "
        f"udevadm test --action=add {device.resolve()}")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=120, check=False)
    out = result.stdout + result.stderr
    assert f"Reading rules file: /etc/udev/rules.d/{RULES}" in out, out
    assert "99-canary.rules:1" in out  # udevadm does report a bad key: the check can fail
    ours = [x for x in out.splitlines() if "iosm-cuse" in x and "Reading rules" not in x]
    assert ours == [], ours
