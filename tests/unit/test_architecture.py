"""The architecture as checked facts: import layers, no cycles, no private names across modules,
no function over 100 lines, no source file over 600 lines. The README's Layout section describes what these enforce."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LIB = REPO / "finestyle"
MAX_FUNCTION_LINES = 100
MAX_FILE_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in LIB.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every finestyle import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finestyle"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("finestyle"):
                    found.append((a.name, [], node.lineno))
    return found


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names, _ in _imports(p):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != m:
                    graph[m].add(cand)
                    break
    # Tarjan-free check: depth-first search for a back edge.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cyc := visit(n)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cyc = visit(m)
            assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_no_private_names_imported_across_modules():
    bad = []
    for p in _modules().values():
        for target, names, line in _imports(p):
            bad += [
                f"{p.relative_to(REPO)}:{line} imports {target}.{n}"
                for n in names
                if n.startswith("_") and not n.endswith("__")
            ]
    assert not bad, "\n".join(bad)


def test_no_function_over_100_lines():
    long = []
    for p in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} has {n} lines")
    assert not long, "\n".join(long)


def test_every_import_of_the_library_resolves():
    """Every `from finestyle... import name` in the library, flows, scripts and tests names something
    that exists (a module split along its seams keeps what others import from it)."""
    import importlib.util

    bad = []
    for root in (LIB, REPO / "flows", REPO / "scripts", REPO / "tests"):
        for p in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    ("finestyle", "flows")
                ):
                    mod = importlib.import_module(node.module)
                    bad += [
                        f"{p.relative_to(REPO)}:{node.lineno} {node.module}.{a.name}"
                        for a in node.names
                        if not hasattr(mod, a.name)
                        and importlib.util.find_spec(f"{node.module}.{a.name}") is None
                    ]
    assert not bad, "\n".join(bad)


def test_no_source_file_over_600_lines():
    """Files sized to be read: a module that grows past this is split along its seams."""
    roots = [LIB, REPO / "flows", REPO / "scripts", REPO / "tests"]
    long = [
        f"{p.relative_to(REPO)} has {n} lines"
        for root in roots
        for p in sorted(root.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not long, "\n".join(long)


def test_library_never_imports_prefect_or_flows():
    hits = []
    for p in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            hits += [f"{p}: {n}" for n in names if n.split(".")[0] in ("prefect", "flows", "prefect_dask")]
    assert not hits, hits
