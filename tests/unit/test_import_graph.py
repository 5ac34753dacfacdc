"""Imports point one way: no cycle among dsbuild's modules, counting imports inside functions too (a function-local
import that dodges a cycle is still one), and function-local imports of dsbuild's own modules only where a reason
is written down here."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import functools
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("builder", "quantize", "triton_repo")
# Where importing dsbuild modules inside functions is the design, and why.
LAZY_IMPORTS_ALLOWED = {
    "builder/cli.py": "each command imports what it runs, so `dsbuild --help`, check, push and pull start without torch",
}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            if "templates" in path.parts or "__pycache__" in path.parts:
                continue  # rendered into Triton repositories, not imported as dsbuild modules
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def import_graph(root: Path = REPO) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> the dsbuild modules it imports anywhere, module -> 'line: name' of its function-local imports)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    local: dict[str, list[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            found = {r for n in names if (r := _resolve(n, modules)) and r != mod}
            # `import builder.x` from inside builder/__init__ is the package's own submodule, not a dependency.
            found = {r for r in found if not (mod.startswith(r + ".") and modules[r].name == "__init__.py")}
            deps |= found
            if found and id(node) in in_function:
                local.setdefault(str(path.relative_to(root)), []).append(f"{node.lineno}: {', '.join(sorted(found))}")
        graph[mod] = deps
    return graph, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 50  # the walk found the code
    assert cycles(graph) == [], "imports must point one way"


def test_function_local_imports_only_where_allowed():
    _, local = import_graph()
    unexpected = {f: lines for f, lines in local.items() if f not in LAZY_IMPORTS_ALLOWED}
    assert unexpected == {}, "import dsbuild modules at module level (or add the file with its reason)"


def test_the_checks_can_fail(tmp_path):
    """A planted cycle through a function-local import is found, and reported as a local import."""
    pkg = tmp_path / "builder"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from builder.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from builder.a import f\n    return f\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    graph, local = import_graph(tmp_path)
    assert cycles(graph) == [["builder.a", "builder.b"]]
    assert list(local) == [str(Path("builder/b.py"))]


@pytest.mark.parametrize("module", ["builder.layout", "builder.errors", "builder.paths", "builder.atomic",
                                    "builder.retry", "builder.rundir", "builder.sampling_params",
                                    "builder.safeio", "builder.redact", "quantize.registry"])
def test_foundation_modules_import_nothing_above_them(module):
    graph, _ = import_graph()
    foundations = {"builder.errors", "builder.paths", "builder.atomic", "builder.retry", "builder.rundir",
                   "builder.layout", "builder.sampling_params", "builder.safeio", "builder.redact", "quantize.registry",
                   "builder"}
    assert graph[module] <= foundations, f"{module} imports {sorted(graph[module] - foundations)}"


# Commands that only read headers, manifests and configuration start seconds sooner without torch, which every
# `dsbuild check/push/pull/plan` (and every subprocess test of them) pays: importing torch takes 2-4 s on 2 cores.
# Planning resolves model sources (presets, generated model names, hub configs) without the tiny-model writer.
TORCH_FREE = ["builder.check", "builder.publish.push", "builder.publish.pull", "builder.model.safetensors_io",
              "quantize.w4afp8_config", "builder.cli", "builder.plan.spec", "builder.model.source"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_header_and_manifest_commands_do_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
