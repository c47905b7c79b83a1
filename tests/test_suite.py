"""Rules of the test suite itself, checked on its source: every test can fail, and tests reach
the code through its public names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).parent

# pytest calls that fail a test by themselves.
_FAILING_CALLS = {"pytest.raises", "pytest.fail", "pytest.warns"}

# Private members that tests still reach, each waiting for a public seam: none now. An entry
# is a (file name, member) pair; a new use fails test_tests_reach_no_private_members unless it
# is listed here, with the seam it waits for said beside it.
_PRIVATE_STILL_USED: set[tuple[str, str]] = set()


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(TESTS.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _checks_directly(function: ast.AST) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Assert | ast.Raise):
            return True
        if isinstance(node, ast.Call) and ast.unparse(node.func) in _FAILING_CALLS:
            return True
    return False


def _called_names(function: ast.AST) -> set[str]:
    return {
        ast.unparse(node.func).rsplit(".", 1)[-1]
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
    }


def _tests_without_a_check(trees: list[tuple[Path, ast.Module]]) -> list[str]:
    """Test functions with no assert, no failing pytest call, and no call of a helper of the
    suite that has one (helpers are followed through other helpers)."""
    helpers: dict[str, list[ast.AST]] = {}
    for _, tree in trees:
        for function in _functions(tree):
            if not function.name.startswith("test_"):
                helpers.setdefault(function.name, []).append(function)
    checking = {name for name, fns in helpers.items() if any(map(_checks_directly, fns))}
    grew = True
    while grew:
        grew = False
        for name, fns in helpers.items():
            if name not in checking and any(_called_names(f) & checking for f in fns):
                checking.add(name)
                grew = True
    return [
        f"{path.relative_to(TESTS)}:{function.name}"
        for path, tree in trees
        for function in _functions(tree)
        if function.name.startswith("test_")
        and not _checks_directly(function)
        and not (_called_names(function) & checking)
    ]


def test_every_test_can_fail() -> None:
    """A test without an assert, a failing pytest call or a checking helper passes whatever the
    code does. The scan finds such a test in a sample, so that it cannot pass by finding nothing."""
    sample = ast.parse(
        "def wait(x):\n    assert x\n"
        "def test_waits():\n    wait(1)\n"
        "def test_only_runs():\n    print('ran')\n"
    )
    assert _tests_without_a_check([(TESTS / "sample.py", sample)]) == ["sample.py:test_only_runs"]
    assert _tests_without_a_check(list(_sources())) == []


def _private_members(tree: ast.Module) -> set[str]:
    """``obj._name`` on anything but ``self``, ``cls`` or a class of the same file, and
    ``from nanobot... import _name``."""
    own_classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and ast.unparse(node.value) not in {"self", "cls", *own_classes}
        ):
            found.add(node.attr)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanobot"):
            found |= {alias.name for alias in node.names if alias.name.startswith("_")}
    return found


def test_tests_reach_no_private_members() -> None:
    """Tests use the public names of the code (or a public seam made for them); any use left
    is listed above, and no new one appears."""
    sample = ast.parse("from nanobot.x import _hidden\nmanager._loop.stop()\nself._own = 1\n")
    assert _private_members(sample) == {"_hidden", "_loop"}
    used = {
        (path.name, member)
        for path, tree in _sources()
        if path.parent == TESTS or path.parent.parent == TESTS
        for member in _private_members(tree)
    }
    assert used - _PRIVATE_STILL_USED == set()
