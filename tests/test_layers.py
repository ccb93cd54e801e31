"""The import graph of ``proxy/`` against its layers (ARCHITECTURE.md): ``core`` <-
``protocols`` <- ``services`` <- ``pipeline`` <- ``web`` <- the commands. Read from
the source (the imports as written, a function's own ones and those under
``TYPE_CHECKING`` included), so a module that reaches up a layer, or two modules
that need each other, fail here before anyone has to untangle them. ``core``
reads no settings and names no SDK's fields or cookies (the protocols do)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "proxy"
LAYERS = {"core": 0, "protocols": 1, "services": 2, "pipeline": 3, "web": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The ``proxy`` modules ``name`` imports (relative or absolute), anywhere in it."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif node.level:
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 2 else None


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        (m, d) for m, deps in GRAPH.items() for d in deps
        if layer(m) is not None and layer(d) is not None and layer(d) > layer(m)  # type: ignore[operator]
    )
    assert upward == []


def test_the_import_graph_has_no_cycles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for dep in sorted(GRAPH[name]):
            if seen.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in seen:
                visit(dep, path + [dep])
        seen[name] = 2

    for name in sorted(GRAPH):
        if name not in seen:
            visit(name, [name])


def test_core_reads_no_settings():
    """``core`` takes plain values (a cookie jar's fields, consent ``Signals``), never the settings."""
    readers = {m for m, deps in GRAPH.items() if layer(m) == 0 and "proxy.settings" in deps}
    assert not readers, sorted(readers)


# An SDK's field, cookie or id name in ``core`` is a vendor difference outside the protocol seam.
VENDOR_NAMES = (
    "$initial_referrer", "$initial_referring_domain", "$set_once", "$device_id", "$user_id", "distinct_id",
    "__mp_", "ajs_", "anonymousId", "userId", "writeKey", "messageId",
)


def test_core_names_no_sdk_field_or_cookie():
    found = []
    for name, path in MODULES.items():
        if layer(name) != 0:
            continue
        tree = ast.parse(path.read_text())
        docs = {
            id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found += [f"{name}: {node.value!r}" for v in VENDOR_NAMES if v in node.value]
    assert not found, found


def test_the_graph_is_read_at_all():
    """The checks above see the imports they judge (a parser that found nothing would pass them)."""
    assert "proxy.core.ids" in GRAPH["proxy.services.store"]
    assert "proxy.services.liverelay" in GRAPH["proxy.cli.serve"]
    assert "proxy.pipeline.exchange" in GRAPH["proxy.pipeline.deliver"]


def test_the_pipeline_knows_no_web_framework():
    """Stages see the Exchange, services, protocols and core: never aiohttp or ``web``."""
    reaching = {}
    for name, path in MODULES.items():
        if not name.startswith("proxy.pipeline"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] if not node.level else []
            else:
                continue
            if any(t == "aiohttp" or t.startswith("aiohttp.") for t in targets):
                reaching[name] = targets
        if any(d.startswith("proxy.web") for d in GRAPH[name]):
            reaching[name] = sorted(GRAPH[name])
    assert reaching == {}


def test_no_module_hides_an_import_behind_type_checking():
    """``TYPE_CHECKING`` imports hid the old circle (handlers <-> crossdomain, cdn):
    none is left, so the graph above is the whole truth."""
    hiding = [name for name, path in MODULES.items() if "TYPE_CHECKING" in path.read_text()]
    assert hiding == []


# Declarative tables may run long: one line per metric, nothing to follow.
LONG_TABLES = {("proxy.services.metrics", "__init__")}
MAX_FUNCTION_LINES = 60


def test_no_function_in_proxy_is_over_sixty_lines_except_declarative_tables():
    long = [
        (name, node.name, node.end_lineno - node.lineno + 1)
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and (name, node.name) not in LONG_TABLES
    ]
    assert not long, long
    # Each allowed table still exists and is still long (the list may only shrink).
    for module, function in LONG_TABLES:
        lengths = [n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(MODULES[module].read_text()))
                   if isinstance(n, ast.FunctionDef) and n.name == function]
        assert lengths and max(lengths) > MAX_FUNCTION_LINES, (module, function)
