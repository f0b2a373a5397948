"""The reload plan (reaper.daemon.plan): every kind of change, named exactly; no secret in what the
status file keeps; and `reaper reload --plan` / `check --against-running` on a written status file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import cattrs
import pytest

from reaper.catalog.metrics import Catalog
from reaper.cli import main
from reaper.config.schema import (
    CollectorConfig,
    Config,
    JsonFileSinkConfig,
    MetricDef,
    PostgresSinkConfig,
    SourceConfig,
)
from reaper.daemon.plan import (
    RESTART_FIELDS,
    Change,
    Plan,
    RunningState,
    SourcePlan,
    describe,
    empty_groups,
    plan_reload,
)
from reaper.daemon.status import DaemonStatus, write_status_file

SECRET = "s3cr3t-Pw"
SALT = "0123456789abcdef"


def src(name: str, **kw: object) -> SourceConfig:
    kw.setdefault("dsn", f"postgresql://reaper:{SECRET}@db1:5432/{name}")
    return SourceConfig(name=name, **kw)  # type: ignore[arg-type]


def conf(*sources: SourceConfig, sinks: tuple = (), **kw: object) -> Config:
    sinks = sinks or (JsonFileSinkConfig(path="/tmp/out.jsonl"),)
    return Config(sources=sources, sinks=sinks, **kw)  # type: ignore[arg-type]


def running(config: Config, **kw: object) -> RunningState:
    return describe(config, Catalog.for_config(config), SALT, **kw)  # type: ignore[arg-type]


def step(plan: Plan, name: str) -> SourcePlan:
    (found,) = [p for p in plan.sources if p.name == name]
    return found


BASE = conf(src("a", preset="basic", tags={"env": "prod"}), src("b", preset="basic"))


def test_an_unchanged_config_changes_nothing() -> None:
    plan = plan_reload(running(BASE), BASE)
    assert [p.action for p in plan.sources] == ["unchanged", "unchanged"]
    assert [k.action for k in plan.sinks] == ["unchanged"]
    assert not plan.changes_anything and plan.lines() == []


def test_added_and_removed_sources() -> None:
    new = conf(src("b", preset="basic"), src("c"))
    plan = plan_reload(running(BASE), new)
    assert (step(plan, "a").action, step(plan, "b").action, step(plan, "c").action) == ("removed", "unchanged",
                                                                                        "added")
    assert plan.summary() == ("sources 1 added, 1 removed, 0 restarted, 0 updated, 1 unchanged; "
                              "sinks 0 added, 0 removed, 0 rebuilt, 1 unchanged")


def test_a_dsn_change_restarts_and_names_dsn_without_the_password() -> None:
    new = conf(src("a", preset="basic", tags={"env": "prod"}, dsn=f"postgresql://reaper:{SECRET}@db2:5432/a"),
               src("b", preset="basic", dsn="postgresql://reaper:another-Pw@db1:5432/b"))
    plan = plan_reload(running(BASE), new)
    a, b = step(plan, "a"), step(plan, "b")
    assert (a.action, a.reasons) == ("restarted", ("dsn",))
    assert a.settings == (Change("dsn", "postgresql://reaper:***@db1:5432/a", "postgresql://reaper:***@db2:5432/a"),)
    assert "dsn forces a new connection" in a.detail()
    # only the password changed: the redacted text is the same, the hash tells
    assert (b.action, b.reasons) == ("restarted", ("dsn",))
    assert b.settings[0].new == "postgresql://reaper:***@db1:5432/b (password changed)"
    assert SECRET not in json.dumps(cattrs.unstructure(plan)) and "another-Pw" not in json.dumps(
        cattrs.unstructure(plan))


@pytest.mark.parametrize(("field", "value"), [("query_timeout_seconds", 5.0), ("connect_timeout_seconds", 1.0),
                                              ("kind", "pgbouncer"), ("password_file", "/etc/pw"),
                                              ("lock_timeout_seconds", 3.0), ("search_path", ("app", "public"))])
def test_every_connection_setting_forces_a_restart_naming_it(field: str, value: Any) -> None:
    new = conf(attrs.evolve(BASE.sources[0], **{field: value}), BASE.sources[1])
    a = step(plan_reload(running(BASE), new), "a")
    assert (a.action, a.reasons) == ("restarted", (field,))


def test_restart_fields_are_exactly_the_connection_settings() -> None:
    source = src("a")
    changed: dict[str, Any] = {
        "dsn": "postgresql://x@y/z", "kind": "pgpool", "password_file": "/p", "connect_timeout_seconds": 9.0,
        "query_timeout_seconds": 9.0, "lock_timeout_seconds": 9.0, "search_path": ("app",),
        "tags": {"k": "v"}, "preset": "standard", "metrics": {"wal": 5},
               "group": "g2", "only_if_primary": True, "include_pattern": "x", "discovery_interval_seconds": 9.0}
    for field, value in changed.items():
        forces = attrs.evolve(source, **{field: value}).connection_settings() != source.connection_settings()
        assert forces == (field in RESTART_FIELDS), field


def test_an_interval_change_updates_in_place_with_the_metric_and_both_intervals() -> None:
    new = conf(src("a", preset="basic", tags={"env": "prod"}, metrics={"db_stats": 30}), BASE.sources[1])
    a = step(plan_reload(running(BASE), new), "a")
    assert a.action == "updated" and a.reasons == ()
    assert a.intervals == (Change("db_stats", "60s", "30s"),)
    assert Change("metrics.db_stats", None, "30") in a.settings
    assert "interval db_stats 60s -> 30s" in a.detail()


def test_a_preset_change_lists_every_metric_that_comes_or_goes() -> None:
    new = conf(src("a", preset="minimal", tags={"env": "prod"}), BASE.sources[1])
    a = step(plan_reload(running(BASE), new), "a")
    assert a.action == "updated"
    assert {c.key: (c.old, c.new) for c in a.intervals} == {
        "db_stats": ("60s", None), "db_size": ("300s", None), "wal": ("60s", None), "kpi": (None, "60s")}


def test_a_tag_change_updates_in_place() -> None:
    new = conf(src("a", preset="basic", tags={"env": "staging", "team": "x"}), BASE.sources[1])
    a = step(plan_reload(running(BASE), new), "a")
    assert a.action == "updated"
    assert a.settings == (Change("tags.env", "prod", "staging"), Change("tags.team", None, "x"))
    assert a.intervals == ()


def test_a_changed_metric_definition_updates_the_sources_that_use_it() -> None:
    custom = {"my_metric": MetricDef(sql={11: "select 1 as x"}, name="my_metric")}
    old = conf(src("a", metrics={"my_metric": 10}), src("b", preset="basic"), metrics=custom)
    new = attrs.evolve(old, metrics={"my_metric": MetricDef(sql={11: "select 2 as x"}, name="my_metric")})
    plan = plan_reload(running(old), new)
    assert step(plan, "a").action == "updated" and step(plan, "a").definitions == ("my_metric",)
    assert step(plan, "b").action == "unchanged"


def test_sinks_added_removed_and_rebuilt_naming_the_changed_key() -> None:
    pg = PostgresSinkConfig(dsn=f"postgresql://w:{SECRET}@store/metrics", name="store")
    old = conf(*BASE.sources, sinks=(JsonFileSinkConfig(path="/tmp/out.jsonl"), pg))
    new = conf(*BASE.sources, sinks=(attrs.evolve(pg, batch_size=10), JsonFileSinkConfig(path="/tmp/other.jsonl")))
    plan = plan_reload(running(old), new)
    actions = {k.label: (k.action, k.settings) for k in plan.sinks}
    assert actions == {"jsonfile:/tmp/out.jsonl": ("removed", ()),
                       "store": ("rebuilt", (Change("batch_size", "256", "10"),)),
                       "jsonfile:/tmp/other.jsonl": ("added", ())}
    repassword = conf(*BASE.sources, sinks=(JsonFileSinkConfig(path="/tmp/out.jsonl"),
                                            attrs.evolve(pg, dsn="postgresql://w:other-Pw@store/metrics")))
    (store,) = [k for k in plan_reload(running(old), repassword).sinks if k.label == "store"]
    assert store.action == "rebuilt" and store.settings[0].key == "dsn"


def test_collector_keys_read_only_at_start_are_said_so() -> None:
    new = attrs.evolve(BASE, collector=CollectorConfig(state_dir="/elsewhere", min_db_size_mb=10))
    plan = plan_reload(running(BASE), new)
    assert {c.key for c in plan.collector} == {"state_dir", "min_db_size_mb"} and plan.at_start == ("state_dir",)
    assert "collector: state_dir null -> /elsewhere (applies at the next start)" in plan.lines()


def test_groups_and_fleet_ownership_limit_what_is_planned() -> None:
    grouped = conf(src("a", group="east"), src("b", group="west"))
    plan = plan_reload(running(grouped, groups=["east"]), attrs.evolve(grouped, sources=(
        *grouped.sources, src("c", group="west"), src("d", group="east"))))
    assert {p.name: p.action for p in plan.sources} == {"a": "unchanged", "d": "added"}
    owned = plan_reload(running(grouped, owned=["b"]), grouped)
    assert {p.name: p.action for p in owned.sources} == {"b": "unchanged"}


def test_a_configured_source_taking_a_discovered_name_and_a_discovery_source_changing() -> None:
    disco = src("inst", kind="postgres-discovery", preset="basic")
    old = conf(disco)
    state = running(old, discovered={"inst_app": "inst"})
    new = conf(attrs.evolve(disco, include_pattern="^app"), src("inst_app"))
    plan = plan_reload(state, new)
    inst, child = step(plan, "inst"), step(plan, "inst_app")
    assert (inst.action, inst.discovery, inst.config_changed) == ("updated", True, True)
    assert "discovers again" in inst.detail()
    assert child.action == "added" and "inst" in child.reasons[0]
    flipped = plan_reload(state, conf(attrs.evolve(disco, kind="postgres")))
    assert (step(flipped, "inst").action, step(flipped, "inst").reasons) == ("restarted", ("kind",))


def test_sources_read_from_a_config_database_are_not_planned_as_removed() -> None:
    """`reaper reload --plan` reads the file alone; sources from [[sources_from]] are read again by the reload."""
    state = running(conf(src("a"), src("from_db")), fed=["from_db"])
    plan = plan_reload(state, conf(src("a")), file_only=True)
    assert step(plan_reload(state, conf(src("a"))), "from_db").action == "removed"  # the daemon's own view
    assert step(plan, "from_db").action == "unchanged" and "config database" in step(plan, "from_db").reasons[0]
    assert step(plan, "a").action == "unchanged"


def test_the_description_holds_no_secret_and_survives_the_status_file(tmp_path: Path) -> None:
    plain = src("a")
    source = attrs.evolve(plain, specials=attrs.evolve(plain.specials, walg_env={"AWS_SECRET_ACCESS_KEY": SECRET}))
    pg = PostgresSinkConfig(dsn=f"postgresql://w:{SECRET}@store/metrics")
    state = running(conf(source, sinks=(pg,)))
    status = DaemonStatus(pid=1, version="x", started_wall=0, updated_wall=0, config_path="c.toml", reloads=0,
                          reload_failures=0, tasks=0, sources=(), sinks=(), running=state)
    write_status_file(tmp_path / "status.json", status)
    text = (tmp_path / "status.json").read_text()
    assert SECRET not in text and "postgresql://reaper:***@db1:5432/a" in text
    from reaper.daemon.status import read_status_file

    assert read_status_file(tmp_path / "status.json").running == state


# -- the command line on a written status file ---------------------------------------------------------

def _write_config(path: Path, state_dir: Path, sources: str) -> None:
    path.write_text(f'[collector]\nstate_dir = "{state_dir}"\n\n[[sinks]]\ntype = "jsonfile"\n'
                    f'path = "{state_dir}/out.jsonl"\n\n{sources}')


SOURCES = ('[[sources]]\nname = "a"\ndsn = "postgresql://reaper@localhost/a"\npreset = "basic"\n\n'
           '[[sources]]\nname = "b"\ndsn = "postgresql://reaper@localhost/b"\npreset = "basic"\n')


@pytest.fixture
def daemon_state(tmp_path: Path) -> tuple[Path, Path]:
    """A status file as a daemon running `config` writes it (its own pid stands for the daemon)."""
    import os

    from reaper.config.load import load_config

    state = tmp_path / "state"
    config = tmp_path / "reaper.toml"
    _write_config(config, state, SOURCES)
    loaded = load_config(config)
    status = DaemonStatus(pid=os.getpid(), version="x", started_wall=0, updated_wall=0, config_path=str(config),
                          reloads=0, reload_failures=0, tasks=0, sources=(), sinks=(),
                          running=running(loaded))
    write_status_file(state / "status.json", status)
    return config, state


def test_reload_plan_prints_plain_lines_and_json(daemon_state: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
                                                 ) -> None:
    config, state = daemon_state
    _write_config(config, state, SOURCES.replace('name = "b"\ndsn = "postgresql://reaper@localhost/b"\npreset = '
                                                 '"basic"', 'name = "b"\ndsn = "postgresql://reaper@otherhost/b"\n'
                                                 'preset = "basic"'))
    assert main(["reload", "--plan", "--config", str(config), "--format", "plain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan\treload of ") and "1 restarted" in lines[0]
    assert "source\ta\tunchanged\t" in lines
    assert ("source\tb\trestarted\tdsn forces a new connection; dsn postgresql://reaper@localhost/b -> "
            "postgresql://reaper@otherhost/b") in lines
    assert main(["reload", "--plan", "--state-dir", str(state), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["applied"] is False and document["config"] == str(config)
    assert [(p["name"], p["action"], p["reasons"]) for p in document["plan"]["sources"]] == [
        ("a", "unchanged", []), ("b", "restarted", ["dsn"])]


def test_an_invalid_config_is_planned_as_refused(daemon_state: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config, state = daemon_state
    _write_config(config, state, SOURCES.replace('preset = "basic"', 'preset = "nope"', 1))
    assert main(["reload", "--plan", "--config", str(config), "--format", "plain"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "refused" in out[0]
    assert [line for line in out if line.startswith("error\t") and "nope" in line]


def test_check_against_running(daemon_state: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, state = daemon_state
    _write_config(config, state, SOURCES + '\n[[sources]]\nname = "c"\ndsn = "postgresql://reaper@localhost/c"\n')
    assert main(["check", "--config", str(config), "--against-running", "--format", "plain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("ok: 3 sources (3 enabled), 1 sinks, 0 own metrics, 0 own presets")
    assert "source\tc\tadded\t" in out


def test_reload_plan_without_a_status_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reload", "--plan", "--state-dir", str(tmp_path)]) == 1
    assert "no status file" in capsys.readouterr().err


def test_a_group_no_enabled_source_is_in_is_named() -> None:
    """`reaper run --group NAME` with a typo collected nothing without a word; the daemon now warns with these."""
    config = conf(src("a", group="web"), src("b", group="batch", enabled=False), src("c"))
    assert empty_groups(config, ["web", "wbe", "batch", "default", "wbe"]) == ["wbe", "batch"]
    assert empty_groups(config, []) == []


def test_a_reload_hashes_each_definition_once_not_the_catalogue_per_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload describes every running source twice (old and new config); each description hashed the
    whole catalogue's definitions (~0.8 ms): 1.6 s of CPU per reload of a 1000-source fleet. Counted, not
    timed: a definition is hashed once, when a source first uses it; a metric no source uses, never."""
    import reaper.daemon.plan as plan_module
    hashed: list[str] = []
    real = attrs.asdict

    def asdict(obj: Any, **kw: Any) -> dict[str, Any]:
        if isinstance(obj, MetricDef):  # a definition read to be hashed (a source's settings are read too)
            hashed.append(obj.name)
        return real(obj, **kw)

    monkeypatch.setattr(plan_module.attrs, "asdict", asdict)
    monkeypatch.setattr(plan_module, "_FINGERPRINTS", {})
    catalog = Catalog.for_config()
    used = set(catalog.intervals(src("a", preset="basic"), standby=False))
    assert 0 < len(used) < len(catalog.metrics)
    first = plan_module.describe_source(src("a", preset="basic"), catalog, SALT)
    assert len(hashed) == len(used)
    for i in range(100):
        again = plan_module.describe_source(src(f"s{i}", preset="basic"), catalog, SALT)
        assert again.definitions == first.definitions
    assert len(hashed) == len(used)
    edited = attrs.evolve(catalog, metrics={**catalog.metrics, next(iter(used)): attrs.evolve(
        catalog.metrics[next(iter(used))], description="edited")})
    changed = plan_module.describe_source(src("a", preset="basic"), edited, SALT)
    assert len(hashed) == len(used) + 1  # the edited definition, and it alone
    assert changed.definitions != first.definitions
