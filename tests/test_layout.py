"""The package's shape (issue 11, "a layout that shows the design"), checked from the source text.

- the import graph of reaper/ has no cycle, late imports inside functions included (a module's import
  of its own parent package, which Python performs implicitly, is not counted: a package `__init__`
  may import its submodules, and they import siblings, never the package facade; imports under
  `if TYPE_CHECKING:` never run and are not counted either);
- no module has more than 500 lines;
- the wheel ships no test infrastructure: nothing under reaper/ imports the throwaway-server helper
  (tests/pgserver.py) or installs packages with pip at run time;
- importing the catalogue does not import the special metrics' handlers (psutil is loaded only when
  an OS metric is used).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reaper"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """`reaper.a.b` as the module that defines it: itself, or (for `from reaper.a import b` with b a
    name) its package; None outside reaper."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every reaper module `module` imports anywhere in its text (top level or in functions), except
    under `if TYPE_CHECKING:`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # drop typing-only blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            # `from reaper.x import y`: y is a submodule, or a name defined in reaper.x
            targets = [t for t in targets if t in MODULES] or [base]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            targets = [str(node.args[0].value)]
        for target in targets:
            resolved = resolve(target)
            if resolved is not None and resolved != module and not module.startswith(resolved + "."):
                found.add(resolved)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_are_resolved_to_the_defining_module() -> None:
    assert "reaper.config.schema" in imports_of("reaper.config.load")  # from reaper.config.schema import ...
    assert "reaper.errors" in imports_of("reaper.config.load")
    assert "reaper.catalog.pgwatch.common" in imports_of("reaper.catalog.pgwatch.metrics")


def test_the_import_graph_has_no_cycle() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_over_500_lines() -> None:
    sizes = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    too_long = sorted(f"{MODULES[m].relative_to(PACKAGE.parent)}: {n} lines" for m, n in sizes.items()
                      if n > MAX_LINES)
    assert not too_long, f"over {MAX_LINES} lines: " + ", ".join(too_long)


RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "system", "execv", "execvp", "run_process",
           "open_process", "create_subprocess_exec", "create_subprocess_shell", "main"}


def runs_pip(call: ast.Call) -> bool:
    """A call that starts a process (or pip's own main) with `pip` among its words."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in RUNNERS:
        return False
    words = [n.value for arg in call.args for n in ast.walk(arg) if isinstance(n, ast.Constant)
             and isinstance(n.value, str)]
    return any(re.search(r"(^|[\s/])pip3?($|\s)|ensurepip", w) for w in words) or (
        isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "pip")


def pip_argv(node: ast.List | ast.Tuple) -> bool:
    """An argv such as [python, "-m", "pip", "install", ...] built before it is run."""
    words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return any(w in ("pip", "pip3") or w.endswith("/pip") for w in words) and "install" in words


def test_the_wheel_ships_no_test_infrastructure() -> None:
    problems = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "pgserver" or n.endswith(".pgserver") or n.startswith("tests") or n.startswith("pip")
                   for n in names):
                problems.append(f"{module}:{node.lineno}: imports {names} (test infrastructure or pip)")
            if isinstance(node, ast.List | ast.Tuple) and pip_argv(node):
                problems.append(f"{module}:{node.lineno}: a pip command line: {ast.unparse(node)[:100]}")
            if isinstance(node, ast.Call) and runs_pip(node):
                problems.append(f"{module}:{node.lineno}: installs packages at run time: {ast.unparse(node)[:100]}")
    assert not problems, "\n".join(problems)


def test_the_pip_detector_sees_the_usual_forms() -> None:
    def calls(code: str) -> list[bool]:
        return [runs_pip(n) for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]

    assert any(calls("subprocess.run([sys.executable, '-m', 'pip', 'install', 'x'])"))
    assert any(calls("subprocess.check_call('pip install x', shell=True)"))
    assert not any(calls("print('install it: pip install -e .[demo]')"))
    argv = ast.parse("[sys.executable, '-m', 'pip', 'install', '--target', d]").body[0].value  # type: ignore[attr-defined]
    assert pip_argv(argv)


def test_importing_the_catalogue_does_not_import_special_handlers() -> None:
    code = ("import sys, reaper.catalog.metrics, reaper.config.load, reaper.catalog.pgwatch.metrics, reaper.special; "
            "print(sorted(m for m in sys.modules if m == 'psutil' or m.startswith('reaper.special.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['reaper.special.registry']"
