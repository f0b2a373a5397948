"""Reading pgwatch's YAML files the way pgwatch (Go's yaml.v3) reads them.

A module of its own so that PyYAML is imported only by the commands that read YAML (`import-pgwatch`),
never by the daemon (reading a config database's rows needs no YAML).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from reaper.catalog.pgwatch.common import Report
from reaper.config.files import read_text
from reaper.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false, as Go's yaml.v3) and duplicate keys recorded, not lost."""

    duplicates: list[tuple[int, Any]]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    self.duplicates.append((key_node.start_mark.line + 1, key))
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(path: Path, report: Report) -> Any:
    """A pgwatch YAML file's data, read as pgwatch (yaml.v3) reads it; one-line ConfigError when invalid."""
    text = read_text(path, "YAML file")
    loader = _Loader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(e.problem or e.context or "syntax error").split())
        raise ConfigError([f"{path}: invalid YAML{where}: {what}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: invalid YAML: {' '.join(str(e).split())}"]) from None
    finally:
        loader.dispose()
    for line, key in loader.duplicates:
        report(str(path), f"line {line}", f"duplicate key {key!r}: the last one is used "
                                          "(pgwatch refuses a file with duplicate keys)")
    return data
