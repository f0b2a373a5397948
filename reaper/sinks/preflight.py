"""`reaper check`'s look at the sinks' surroundings: a jsonfile path that cannot be created is named.

The config's shape is checked by reaper.config; this module checks what only the file system can say,
without creating or changing anything: for each jsonfile sink, that its path is not a folder and that
its nearest existing parent is a folder we may write into (not a regular file, not under /proc or /sys).
One line per problem, in the words `reaper run` would log (the daemon starts anyway: the sink retries).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from reaper.config.schema import JsonFileSinkConfig, SinkConfig

_VIRTUAL = (Path("/proc"), Path("/sys"))  # kernel file systems: nothing new can be created there


def jsonfile_problem(path_text: str) -> str | None:
    """Why the jsonfile sink's output file cannot be created or appended to, or None."""
    if path_text == "-":
        return None
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.is_dir():
        return f"cannot open {path_text}: it is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"cannot open {path_text}: permission denied"
    if any(path == v or v in path.parents for v in _VIRTUAL):
        return f"cannot open {path_text}: {path.parts[1]} is a kernel file system where no file can be created"
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            return f"cannot open {path_text}: {parent} is a broken symbolic link"
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot open {path_text}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot open {path_text}: cannot create files in {parent} (permission denied)"
    return None


def sink_problems(sinks: Sequence[SinkConfig]) -> list[str]:
    """One line per sink whose output cannot be created: `sink <label>: cannot open <path>: <why>`."""
    problems = []
    for sink in sinks:
        if isinstance(sink, JsonFileSinkConfig):
            why = jsonfile_problem(sink.path)
            if why is not None:
                problems.append(f"sink {sink.label}: {why}")
    return problems
