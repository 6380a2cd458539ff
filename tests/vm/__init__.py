"""The kernel test tier's runner: a QEMU guest of Debian's kernel, booted once per run.

Run `python3 -m tests.vm --help` from the repository root; see tests/vm/README.md.
"""
