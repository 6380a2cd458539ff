"""No file under tests/ imports a test module: what tests share lives in helper modules
(helpers.py, daemon_up.py, mux_traffic.py, ...) and conftest.py fixtures.

Importing a test module runs its collection-time code a second time under another name, drags
its tests' private state into another module and makes test files depend on each other's
layout. Reads every file's imports (module level and inside functions) with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TEST_PACKAGE = TESTS.name  # `from tests import test_x` names the module as an attribute


def _is_test_module(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1].startswith("test_")


def _imports_from(node: ast.ImportFrom) -> list[str]:
    module = node.module or ""
    found = [module] if _is_test_module(module) else []
    # `from tests import test_x` / `from . import test_x`: the names are modules
    if node.level or module == TEST_PACKAGE or module.startswith(TEST_PACKAGE + "."):
        found += [alias.name for alias in node.names if _is_test_module(alias.name)]
    return found


def _imported_by_name(node: ast.Call) -> list[str]:
    """importlib.import_module("test_x") and __import__("test_x")."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name not in ("import_module", "__import__") or not node.args:
        return []
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return [first.value] if _is_test_module(first.value) else []
    return []


def imported_test_modules(source: str, filename: str = "<source>") -> list[str]:
    """The test modules `source` imports, in the order they appear."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            found += _imports_from(node)
        elif isinstance(node, ast.Call):
            found += _imported_by_name(node)
    return found


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("source, expected", [
    ("from test_daemon_host import Up\n", ["test_daemon_host"]),
    ("import test_mux_pair as pair\n", ["test_mux_pair"]),
    ("from tests.test_ipc_untrusted import run\n", ["tests.test_ipc_untrusted"]),
    ("from tests import test_watch, helpers\n", ["test_watch"]),
    ("from . import test_smoke\n", ["test_smoke"]),
    ("from conftest import Ivshmem\n", []),  # fixtures' types: conftest is no test module
    ("def f():\n    import test_gso\n", ["test_gso"]),
    ("import importlib\nm = importlib.import_module('test_record')\n", ["test_record"]),
    ("from helpers import until\nimport daemon_up\nfrom mux_traffic import packet\n", []),
    ("from hypothesis import given\nfrom iosm_cuse.wire import ipc\n", []),
])
def test_the_checker_sees_test_module_imports(source: str, expected: list[str]) -> None:
    assert imported_test_modules(source) == expected


def test_no_file_under_tests_imports_a_test_module() -> None:
    files = _python_files()
    assert len(files) > 40  # the walk found the suite, not an empty folder
    offenders = {str(p.relative_to(TESTS)): names for p in files
                 if (names := imported_test_modules(p.read_text(), str(p)))}
    assert offenders == {}, "move what they share into a helper module or a fixture"
