"""Property (issue 12 item 5): whatever `check` accepts, `run` starts and stops cleanly.

Configs are generated with odd numbers (nan, inf, negatives, zero, huge), odd strings (empty, control
characters, `$`) and missing keys. The pure part asserts that load_config either returns a config or
raises ConfigError with one line per problem; the process part runs a real `reaper run` on each accepted
config (a jsonfile sink into tmp, a source at a closed local port) and stops it with SIGTERM: exit 0.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reaper.config.load import load_config
from reaper.config.schema import Config
from reaper.errors import ConfigError

REAPER = [sys.executable, "-m", "reaper.cli"]

ODD_NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, 0.0, -1, -0.5, 1e12, 2**62, 1, 0.001, 30, 2147483]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
)
ODD_STRINGS = st.one_of(st.sampled_from(["", " ", "a\nb", "a\x00b", "\t", "$", "$$", "${", "ok", "127.0.0.1:0",
                                         "nonsense", "127.0.0.1:99999", "reaper", "pgwatch"]),
                        st.text(max_size=12))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    # a JSON string is a TOML basic string, except that TOML wants \uXXXX surrogates spelled out: avoid them
    return json.dumps(value.encode("utf-8", "replace").decode("utf-8"))


def toml_table(header: str, values: dict[str, Any]) -> str:
    return header + "\n" + "".join(f"{key} = {toml_value(v)}\n" for key, v in values.items()) + "\n"


NUMERIC_SOURCE = ["connect_timeout_seconds", "query_timeout_seconds", "discovery_interval_seconds"]
NUMERIC_COLLECTOR = ["queue_capacity", "shutdown_grace_seconds", "max_backoff_seconds", "spill_max_bytes",
                     "min_db_size_mb", "instance_cache_max_seconds"]
NUMERIC_JSONFILE = ["max_bytes", "backups"]
STRING_SOURCE = ["name", "group"]


def overrides(keys: list[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A subset of keys, each with a drawn value (a key left out keeps its default)."""
    return st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))


@st.composite
def configs(draw: st.DrawFn, numbers: st.SearchStrategy[Any] = ODD_NUMBERS,
            strings: st.SearchStrategy[Any] = ODD_STRINGS) -> dict[str, dict[str, Any]]:
    source: dict[str, Any] = {"name": "s", "dsn": "postgresql://reaper@127.0.0.1:1/db"}
    source.update(draw(overrides(NUMERIC_SOURCE, numbers)))
    source.update(draw(overrides(STRING_SOURCE, strings)))
    if draw(st.booleans()):
        source["metrics"] = {"db_stats": draw(numbers)}
    collector = draw(overrides(NUMERIC_COLLECTOR, numbers))
    sink = draw(overrides(NUMERIC_JSONFILE, numbers))
    prometheus = draw(overrides(["listen", "namespace"], strings)) if draw(st.booleans()) else None
    return {"source": source, "collector": collector, "sink": sink, **({"prometheus": prometheus} if prometheus
                                                                        is not None else {})}


def write(parts: dict[str, dict[str, Any]], directory: Path) -> Path:
    collector = {"state_dir": str(directory / "state"), **parts["collector"]}
    text = toml_table("[collector]", collector) + toml_table("[[sources]]", parts["source"])
    text += toml_table("[[sinks]]", {"type": "jsonfile", "path": str(directory / "out.ndjson"), **parts["sink"]})
    if "prometheus" in parts:
        text += toml_table("[[sinks]]", {"type": "prometheus", "listen": "127.0.0.1:0", **parts["prometheus"]})
    path = directory / "reaper.toml"
    path.write_text(text)
    return path


def load(path: Path) -> Config | None:
    """The config, or None when it is refused: then with one line per problem, each naming the file."""
    try:
        return load_config(path, environ={})
    except ConfigError as e:
        assert e.problems
        for line in e.problems:
            assert "\n" not in line and line.startswith(f"{path}: "), line
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_load_config_accepts_or_refuses_with_lines(parts: dict[str, dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        load(write(parts, Path(tmp)))


# Values near the edges, most of them acceptable: the process part wants accepted configs.
EDGE_NUMBERS = st.sampled_from([1, 1.5, 2, 5, 10, 30, 60, 1, 5, 60, 0, 0.001, 2147483])
EDGE_STRINGS = st.sampled_from(["a", "x y", "$$dollar", "ünï", "127.0.0.1:0", "ns_1"])


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(configs(EDGE_NUMBERS, EDGE_STRINGS))
def test_whatever_check_accepts_run_starts_and_stops_cleanly(parts: dict[str, dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write(parts, Path(tmp))
        assume(load(path) is not None)
        log = Path(tmp) / "stderr.log"
        with log.open("w") as err:
            proc = subprocess.Popen([*REAPER, "run", "--config", str(path)], stdout=subprocess.DEVNULL,
                                    stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 30
            while "collecting:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # polling a condition with a deadline, not a synchronising sleep
            assert "collecting:" in log.read_text(), log.read_text()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert proc.returncode == 0, text
        assert "Traceback" not in text, text
