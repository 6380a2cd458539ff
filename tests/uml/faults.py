"""`python3 -m tests.uml.faults [--mux lite|aggregation ...] [--fault KIND ...]`

Issue 12 point 8: each device fault of the model (iosm_cuse/sim/faults.py: bad MUX offset, bad
MUX length, oversized DL TD size, in-band CRASH) met by the kernel's iosm driver under UML, in
each MUX mode; one boot per pair (about 15 s each). Prints what the kernel did, from
tests/uml/fault_probe.py inside and the runner outside (a kernel that panics ends the boot: the
runner's reason line says so). Exit status 0 when every run got to its report; what the kernel
did is a finding (README "Testing the kernel's iosm driver with the model"), not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys

from tests.uml.run import ROOT
from tests.uml.run import main as run_uml

FAULTS = ["mux-offset", "mux-length", "td-size", "crash"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.uml.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mux", action="append", choices=["lite", "aggregation"])
    ap.add_argument("--fault", action="append", choices=FAULTS)
    args = ap.parse_args(argv)
    python = ROOT / ".venv" / "bin" / "python"
    probe = f"{shlex.quote(str(python))} tests/uml/fault_probe.py"
    incomplete = 0
    for mux in args.mux or ["lite", "aggregation"]:
        for fault in args.fault or FAULTS:
            print(f"=== fault {fault}, MUX {mux}", flush=True)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = run_uml(["--mux", mux, "--fault", fault, "--cmd", probe])
            for line in err.getvalue().splitlines():
                if line.startswith("uml:") and "console tail" not in line:
                    print(line)
            if status != 0:
                incomplete += 1
                print(f"=== fault {fault}, MUX {mux}: the run did not reach its report "
                      f"(exit {status})")
                print("\n".join(err.getvalue().splitlines()[-25:]))
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
