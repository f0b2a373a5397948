"""Project rules that code review would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "reaper"
ASYNCIO_FLAVOURED = {"asyncio", "asyncpg", "trio_asyncio"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_db_touches_asyncio_asyncpg_or_trio_asyncio() -> None:
    offenders = {str(p.relative_to(PACKAGE)): sorted(imported_modules(p) & ASYNCIO_FLAVOURED)
                 for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "db"}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert imported_modules(PACKAGE / "db" / "__init__.py") >= {"asyncpg", "trio_asyncio"}
