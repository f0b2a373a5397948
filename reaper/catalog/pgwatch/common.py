"""What the pgwatch importers share: the result and report, YAML read as pgwatch reads it, value helpers."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from reaper import __version__
from reaper.catalog.metrics import load_shipped_definitions
from reaper.errors import ConfigError

ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@attrs.frozen
class ImportResult:
    text: str  # the TOML document
    notes: tuple[str, ...]  # report lines, `FILE: key.path: what happened`
    summary: str  # what was written, e.g. "75 metrics, 15 presets, 1 commented out"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bare: list[str] = []  # the same without the file name, for the header comment

    def __call__(self, origin: str, where: str, message: str) -> None:
        text = f"{where}: {message}" if where else message
        self.lines.append(f"{origin}: {text}")
        self.bare.append(text)


# ---------------------------------------------------------------------------------------------
# Finding YAML files (reading them: reaper.catalog.pgwatch.yamlread, which imports PyYAML only when used)


def yaml_files(path: Path) -> list[Path]:
    """A file, or every *.yaml/*.yml under a folder (pgwatch accepts both)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".yaml", ".yml"))
        if not files:
            raise ConfigError([f"{path}: no *.yaml or *.yml files in this folder"])
        return files
    return [path]


def one_line(text: str) -> str:
    return " ".join(text.split())


def literal_dollars(value: str) -> str:
    """A text pgwatch takes literally, for reaper (which expands `$NAME`/`${NAME}` in every source string):
    each `$` that reaper would read as a reference or an escape is written `$$`."""
    return re.sub(r"\$(?=[$\{A-Za-z_])", "$$", value)


def env_field(value: str) -> tuple[str, list[str]]:
    """pgwatch expands `$VAR`/`${VAR}` in a field whose value starts with `$`: return ours (`${VAR}`)."""
    if not value.startswith("$"):
        return literal_dollars(value), []
    names: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        names.append(name)
        return "${" + name + "}"

    return ENV_REF.sub(repl, value), names


def interval(value: Any, origin: str, where: str, report: Report) -> int | None:
    """pgwatch intervals are seconds (a float in sources); 0 or less disables. Ours: whole seconds, 0 disables."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and \
            not math.isfinite(value)):
        report(origin, where, f"interval {value!r} is not a number of seconds; dropped")
        return None
    if value <= 0:
        if value < 0:
            report(origin, where, f"interval {value!r} disables the metric in pgwatch; written as 0 (disabled)")
        return 0
    if isinstance(value, float) and not value.is_integer():
        report(origin, where, f"interval {value!r} is not whole seconds; rounded up to {math.ceil(value)}")
        return math.ceil(value)
    return int(value)


def as_text(value: Any, origin: str, where: str, report: Report) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool | list | dict):
        report(origin, where, f"expected text, got {value!r}; dropped")
        return None
    return value if isinstance(value, str) else str(value)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def comment_out(toml_text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in toml_text.strip().splitlines())


def header(kind: str, files: list[Path], path: Path, notes: list[str], extra: list[str]) -> str:
    source = str(path) if len(files) == 1 else f"{path} ({len(files)} files)"
    lines = [f"Imported from pgwatch's {kind} file {source}",
             f"by `reaper import-pgwatch {kind}` (reaper {__version__}).", *extra]
    if notes:
        lines += ["", "Import notes (also printed on stderr when imported):"] + [f"  {n}" for n in notes]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines) + "\n"


def shipped_names() -> tuple[set[str], set[str]]:
    """Names of the metrics and presets reaper ships (empty if the shipped files do not load)."""
    try:
        shipped = load_shipped_definitions()
    except ConfigError:
        return set(), set()
    return set(shipped.metrics), set(shipped.presets)



def array_table(name: str, table: Mapping[str, Any]) -> str:
    """One `[[name]]` table; nested mappings written inline (`metrics = { wal = 60 }`), as in conf/reaper.toml."""
    lines = [f"[[{name}]]"]
    for key, value in table.items():
        if isinstance(value, Mapping):
            items = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items())
            lines.append(f"{key} = {{ {items} }}" if items else f"{key} = {{}}")
        else:
            lines.append(tomli_w.dumps({key: value}).strip())
    return "\n".join(lines) + "\n"
