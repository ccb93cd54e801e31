"""The suite's own layout: no test module imports another.

What several test modules share lives in helper modules (``tests/support.py``,
``tests/fakeupstream.py``, ``tests/e2e/harness.py``, the conftests). A test
module another one imports cannot be moved, renamed or deleted on its own, its
module-level set-up runs for the importer too, and a test function taken from
it by name is collected twice."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _test_module(dotted: str) -> bool:
    """Whether an absolute module name is one of the suite's test modules:
    ``test_x`` (as run from tests/), ``tests.test_x``, ``tests.e2e.test_x``."""
    parts = dotted.split(".")
    if parts[0].startswith("test_"):
        return True
    return parts[0] == "tests" and any(p.startswith("test_") for p in parts[1:])


def imported_test_modules(source: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a test module in ``source`` (the text of
    ``path``), at any depth (inside functions too), in every spelling: ``import
    tests.test_x``, ``from tests.test_x import y``, ``from tests import test_x``,
    ``from .test_x import y``, ``from . import test_x``, ``import test_x``, and
    ``importlib.import_module``/``__import__`` of a literal name. A name taken
    ``from`` a package (a directory) is a module; from a module, an attribute."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            parts = [p for p in (node.module or "").split(".") if p]
            if node.level:  # relative to the package of ``path``
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                shown, test_part = "." * node.level + ".".join(parts), any(p.startswith("test_") for p in parts)
            else:
                base, shown, test_part = ROOT, ".".join(parts), _test_module(".".join(parts))
            if test_part:
                found.append((node.lineno, shown))
            elif base.joinpath(*parts).is_dir():
                sep = "." if parts else ""
                found += [(node.lineno, f"{shown}{sep}{a.name}") for a in node.names if a.name.startswith("test_")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and (
                _test_module(arg) or any(p.startswith("test_") for p in arg.split(".") if arg.startswith("."))
            ):
                found.append((node.lineno, arg))
    return found


def test_no_test_module_imports_another() -> None:
    """Every tests/test_*.py and tests/e2e/test_*.py imports helpers from helper
    modules only; a failure names each module, line and the test module imported."""
    # The check itself recognises every spelling (else an empty result proves nothing).
    spellings = "\n".join([
        "import tests.test_a", "from tests.test_a import x", "from tests import test_a", "from tests.e2e.test_a import x",
        "from tests.e2e import test_a", "from .test_a import x", "from . import test_a", "from ..test_a import x",
        "import test_a", "from test_a import x", "def f():\n    from tests.test_a import x",
        "importlib.import_module('tests.test_a')",
        # and none of these is one:
        "from tests.support import x", "from tests.e2e.harness import x", "from aiohttp.test_utils import x",
        "import tests.conftest", "from . import support", "from tests.support import test_like_helper",
    ])
    assert [line for line, _ in imported_test_modules(spellings, TESTS / "test_example.py")] == list(range(1, 11)) + [12, 13]

    modules = sorted([*TESTS.glob("test_*.py"), *(TESTS / "e2e").glob("test_*.py")])
    assert len(modules) > 10, modules
    offences = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in modules
        for line, module in sorted(imported_test_modules(path.read_text(encoding="utf-8"), path))
    ]
    assert not offences, (
        "test modules import other test modules; move what they share to tests/support.py "
        "(or a conftest, for a fixture):\n" + "\n".join(offences)
    )
