"""What a reload does: a description of the running state, a new config, and the plan between them.

Pure: no I/O, no trio. The reconciler decides with `plan_reload` what to start, stop, restart and
update in place; `reaper reload --plan` runs the SAME function on the description the daemon writes
into its status file, so a preview and the reload it previews cannot disagree.

A description holds no secret: a DSN is kept redacted, plus a salted hash of the real one (the salt
is the daemon's own, random per process), so a changed password shows as a changed `dsn` without
being written anywhere; the values of `specials.walg_env` (cloud credentials) are kept as hashes too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import orjson

from reaper.catalog.metrics import Catalog
from reaper.config.redact import redact_dsn
from reaper.config.schema import CONNECTION_FIELDS, Config, MetricDef, SinkConfig, SourceConfig
from reaper.kinds import DISCOVERY_KINDS

#: SourceConfig fields that need a new connection when they change (SourceConfig.connection_settings)
RESTART_FIELDS = CONNECTION_FIELDS
#: [collector] keys that a reload does not apply: they are read once, when the daemon starts
COLLECTOR_AT_START = ("state_dir", "instance_cache_max_seconds", "create_extensions")
SOURCE_ACTIONS = ("added", "removed", "restarted", "updated", "unchanged")
SINK_ACTIONS = ("added", "removed", "rebuilt", "unchanged")


def secret_hash(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}\0{secret}".encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=list))


# -- descriptions -------------------------------------------------------------------------------------

@attrs.frozen
class SourceDescription:
    """One configured source as the plan sees it (a discovery source: what its sources inherit)."""

    name: str
    dsn: str  # redacted
    dsn_hash: str  # salted hash of the real dsn
    settings: dict[str, Any]  # every other SourceConfig field, as JSON values (secrets hashed)
    intervals: dict[str, int]  # the active metrics on a primary: metric -> seconds
    standby_intervals: dict[str, int]  # ... and in recovery
    definitions: dict[str, str]  # metric -> fingerprint of its definition, for every metric above

    @property
    def discovery(self) -> bool:
        return self.settings.get("kind") in DISCOVERY_KINDS


@attrs.frozen
class SinkDescription:
    label: str
    settings: dict[str, Any]  # the sink's config as JSON values; a dsn redacted
    dsn_hash: str | None = None


@attrs.frozen
class RunningState:
    """What runs: the reconciler's configured sources and sinks (not the ones a discovery source found,
    which follow their parent), in the shape the status file keeps."""

    salt: str
    groups: tuple[str, ...] = ()  # `reaper run --group`: the sources of other groups are not this process's
    owned: tuple[str, ...] | None = None  # [fleet]: the sources this member holds (None: not in a fleet)
    sources: tuple[SourceDescription, ...] = ()
    discovered: dict[str, str] = attrs.field(factory=dict)  # a discovered source's name -> its parent's
    fed: tuple[str, ...] = ()  # sources read from a [[sources_from]] config database (re-read at a reload)
    sinks: tuple[SinkDescription, ...] = ()
    collector: dict[str, Any] = attrs.field(factory=dict)


# id(definition) -> (the definition, its fingerprint): a definition object never changes, and a reload
# compares each running source with its new config (two descriptions a source): hashing the whole
# catalogue's ~150 definitions for each of them cost a 1000-source fleet seconds of CPU per reload
_FINGERPRINTS: dict[int, tuple[MetricDef, str]] = {}
_FINGERPRINTS_KEPT = 4096  # a few catalogues' worth; past it the cache starts again


def fingerprint(metric: MetricDef) -> str:
    """A short hash of a metric's whole definition (SQL, gauges, timeouts ...)."""
    known = _FINGERPRINTS.get(id(metric))
    if known is not None and known[0] is metric:
        return known[1]
    raw = orjson.dumps(attrs.asdict(metric), option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS, default=list)
    if len(_FINGERPRINTS) >= _FINGERPRINTS_KEPT:
        _FINGERPRINTS.clear()
    digest = _FINGERPRINTS[id(metric)] = (metric, hashlib.sha256(raw).hexdigest()[:12])
    return digest[1]


def definition_fingerprints(catalog: Catalog) -> dict[str, str]:
    """metric -> its fingerprint, for every metric of the catalogue."""
    return {name: fingerprint(metric) for name, metric in catalog.metrics.items()}


class _Shared:
    """One object for equal JSON values: a fleet's descriptions mostly hold the same settings, intervals
    and fingerprints, and a status plan of 1000 sources would otherwise keep 1000 copies of each (~2 KB a
    source). The values are never changed once described."""

    def __init__(self) -> None:
        self._seen: dict[bytes, Any] = {}

    def __call__(self, value: Any) -> Any:
        key = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS)
        return self._seen.setdefault(key, value)


def describe_source(source: SourceConfig, catalog: Catalog, salt: str,
                    fingerprints: Mapping[str, str] | None = None,
                    shared: Callable[[Any], Any] | None = None) -> SourceDescription:
    shared = shared or _Shared()
    settings = _jsonable(attrs.asdict(source))
    settings.pop("name")
    settings.pop("dsn")
    env = settings.get("specials", {}).get("walg_env")
    if env:
        settings["specials"]["walg_env"] = {k: "#" + secret_hash(salt, str(v)) for k, v in env.items()}
    primary = catalog.intervals(source, standby=False)
    standby = catalog.intervals(source, standby=True)
    return SourceDescription(
        name=source.name, dsn=redact_dsn(source.dsn), dsn_hash=secret_hash(salt, source.dsn),
        settings=shared(settings), intervals=shared(primary), standby_intervals=shared(standby),
        definitions=shared({m: _fingerprint_of(m, catalog, fingerprints) for m in sorted({*primary, *standby})}))


def _fingerprint_of(name: str, catalog: Catalog, fingerprints: Mapping[str, str] | None) -> str:
    if fingerprints is not None:
        return fingerprints.get(name, "")
    metric = catalog.metrics.get(name)
    return "" if metric is None else fingerprint(metric)


def describe_sink(sink: SinkConfig, salt: str) -> SinkDescription:
    settings = _jsonable(attrs.asdict(sink))
    dsn = getattr(sink, "dsn", None)
    if dsn is None:
        return SinkDescription(sink.label, settings)
    settings["dsn"] = redact_dsn(dsn)
    return SinkDescription(sink.label, settings, secret_hash(salt, dsn))


def empty_groups(config: Config, groups: Iterable[str]) -> list[str]:
    """The --group names that no enabled source of the config is in (a typo collects nothing, silently)."""
    have = {s.group for s in config.sources if s.enabled}
    return [g for g in dict.fromkeys(groups) if g not in have]


def wanted_sources(config: Config, groups: Iterable[str] = (),
                   owned: Iterable[str] | None = None) -> list[SourceConfig]:
    """The sources a process run with --group `groups` collects: enabled, in one of them, and in a
    fleet, owned by this member (as Reconciler.wanted_sources)."""
    chosen = frozenset(groups)
    mine = None if owned is None else frozenset(owned)
    return [s for s in config.sources if s.enabled and (not chosen or s.group in chosen)
            and (mine is None or s.name in mine)]


def describe(config: Config, catalog: Catalog, salt: str, *, groups: Iterable[str] = (),
             owned: Iterable[str] | None = None, sources: Iterable[SourceConfig] | None = None,
             discovered: Mapping[str, str] | None = None, sinks: Iterable[SinkConfig] | None = None,
             fed: Iterable[str] = ()) -> RunningState:
    """A config (or the parts of it that run: `sources`, `sinks`) as a RunningState."""
    fingerprints = definition_fingerprints(catalog)
    shared = _Shared()
    chosen = wanted_sources(config, groups, owned) if sources is None else sources
    return RunningState(
        salt=salt, groups=tuple(groups), owned=None if owned is None else tuple(sorted(owned)),
        sources=tuple(describe_source(s, catalog, salt, fingerprints, shared) for s in chosen),
        discovered=dict(discovered or {}), fed=tuple(sorted(fed)),
        sinks=tuple(describe_sink(k, salt) for k in (config.sinks if sinks is None else sinks)),
        collector=_jsonable(attrs.asdict(config.collector)))


# -- the plan -----------------------------------------------------------------------------------------

@attrs.frozen
class Change:
    """One changed setting or interval: `key` (`dsn`, `tags.env`, a metric's name ...), old -> new
    as text (None: not there)."""

    key: str
    old: str | None
    new: str | None

    def text(self) -> str:
        if self.old is None:
            return f"{self.key} {self.new} (new)"
        if self.new is None:
            return f"{self.key} {self.old} (gone)"
        return f"{self.key} {self.old} -> {self.new}"


@attrs.frozen
class SourcePlan:
    name: str
    action: str  # one of SOURCE_ACTIONS
    reasons: tuple[str, ...] = ()  # restarted: the settings that force it; added: a takeover
    settings: tuple[Change, ...] = ()  # changed config keys (restart ones included)
    intervals: tuple[Change, ...] = ()  # active metrics whose interval changed, came or went (seconds)
    standby_intervals: tuple[Change, ...] = ()  # ... the set used in recovery, when it differs
    definitions: tuple[str, ...] = ()  # active metrics whose definition (SQL ...) changed
    discovery: bool = False

    @property
    def config_changed(self) -> bool:
        return bool(self.settings)

    def detail(self) -> str:
        """What forces or makes up the change: `dsn forces a new connection; interval db_stats 60s -> 30s`."""
        parts = list(self.reasons) if self.action == "added" else []
        if self.action == "restarted":
            parts.append(f"{', '.join(self.reasons)} {'forces' if len(self.reasons) == 1 else 'force'} "
                         "a new connection")
        parts += [c.text() for c in self.settings]
        parts += [f"interval {c.text()}" for c in self.intervals]
        parts += [f"standby interval {c.text()}" for c in self.standby_intervals]
        parts += [f"definition of {m} changed" for m in self.definitions]
        if self.discovery and self.action == "updated":
            parts.append("discovers again; its sources follow")
        return "; ".join(parts)


@attrs.frozen
class SinkPlan:
    label: str
    action: str  # one of SINK_ACTIONS
    settings: tuple[Change, ...] = ()


@attrs.frozen
class Plan:
    """What a reload does (or would do). With `errors`, nothing: the reload is refused."""

    sources: tuple[SourcePlan, ...] = ()
    sinks: tuple[SinkPlan, ...] = ()
    collector: tuple[Change, ...] = ()
    at_start: tuple[str, ...] = ()  # collector keys of `collector` that apply only when the daemon starts
    errors: tuple[str, ...] = ()

    def count(self, action: str, *, sinks: bool = False) -> int:
        return sum(1 for p in (self.sinks if sinks else self.sources) if p.action == action)

    def summary(self) -> str:
        if self.errors:
            return f"refused: {len(self.errors)} problems"
        sources = ", ".join(f"{self.count(a)} {a}" for a in SOURCE_ACTIONS)
        sinks = ", ".join(f"{self.count(a, sinks=True)} {a}" for a in SINK_ACTIONS)
        return f"sources {sources}; sinks {sinks}"

    def lines(self, *, unchanged: bool = False) -> list[str]:
        """One line per thing the reload changes (per refusal reason when refused), for logs and terminals."""
        if self.errors:
            return list(self.errors)
        out = []
        for p in self.sources:
            if p.action != "unchanged" or unchanged:
                out.append(f"source {p.name}: {p.action}" + (f": {p.detail()}" if p.detail() else ""))
        for k in self.sinks:
            if k.action != "unchanged" or unchanged:
                out.append(f"sink {k.label}: {k.action}"
                           + (f": {'; '.join(c.text() for c in k.settings)}" if k.settings else ""))
        for c in self.collector:
            out.append(f"collector: {c.text()}" + (" (applies at the next start)" if c.key in self.at_start else ""))
        return out

    @property
    def changes_anything(self) -> bool:
        return not self.errors and (bool(self.collector) or any(p.action != "unchanged" for p in self.sources)
                                    or any(p.action != "unchanged" for p in self.sinks))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "",
             flatten: Iterable[str] = ()) -> list[Change]:
    """Changed keys; the keys in `flatten` (tables) are compared key by key (`tags.env`)."""
    found: list[Change] = []
    tables = set(flatten)
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in tables and isinstance(a, Mapping | None) and isinstance(b, Mapping | None):
            found += _changes(a or {}, b or {}, f"{prefix}{key}.", tables)
        else:
            found.append(Change(prefix + key, None if key not in old else _text(a),
                                None if key not in new else _text(b)))
    return found


def _interval_changes(old: Mapping[str, int], new: Mapping[str, int]) -> tuple[Change, ...]:
    return tuple(Change(m, None if m not in old else f"{old[m]}s", None if m not in new else f"{new[m]}s")
                 for m in sorted({*old, *new}) if old.get(m) != new.get(m))


def compare_source(old: SourceDescription, new: SourceDescription) -> SourcePlan:
    """One running source against its new description: restarted, updated or unchanged."""
    settings = _changes(old.settings, new.settings, flatten=("metrics", "standby_metrics", "tags", "specials",
                                                             "walg_env"))
    if old.dsn_hash != new.dsn_hash:
        settings.insert(0, Change("dsn", old.dsn, new.dsn if new.dsn != old.dsn else new.dsn + " (password changed)"))
    intervals = _interval_changes(old.intervals, new.intervals)
    standby = _interval_changes(old.standby_intervals, new.standby_intervals)
    definitions = tuple(m for m in new.definitions if m in old.definitions and old.definitions[m] != new.definitions[m])
    restart = tuple(c.key for c in settings if c.key in RESTART_FIELDS)
    # a changed discovery source gets a new task that rediscovers (its sources follow): "updated"
    if old.discovery != new.discovery or (restart and not new.discovery):
        action = "restarted"
    elif settings or intervals or standby or definitions:
        action = "updated"
    else:
        action = "unchanged"
    return SourcePlan(new.name, action, restart if action == "restarted" else (), tuple(settings),
                      intervals, standby if standby != intervals else (), definitions, new.discovery)


def _sink_plans(old: Iterable[SinkDescription], new: Iterable[SinkDescription]) -> list[SinkPlan]:
    before = {k.label: k for k in old}
    after = {k.label: k for k in new}
    plans = [SinkPlan(label, "removed") for label in before if label not in after]
    for label, sink in after.items():
        was = before.get(label)
        if was is None:
            plans.append(SinkPlan(label, "added"))
            continue
        changes = _changes(was.settings, sink.settings)
        if was.dsn_hash != sink.dsn_hash and not any(c.key == "dsn" for c in changes):
            changes.insert(0, Change("dsn", _text(was.settings.get("dsn")), f"{sink.settings.get('dsn')} "
                                     "(password changed)"))
        plans.append(SinkPlan(label, "rebuilt" if changes else "unchanged", tuple(changes)))
    return plans


def plan_reload(running: RunningState, new: Config, catalog: Catalog | None = None, *,
                file_only: bool = False) -> Plan:
    """What applying `new` (already validated) to what runs does. `catalog`: the new config's
    (default: built from `new` and the shipped definitions as they are now). `file_only`: `new` is the
    config file alone (`reaper reload --plan`), without the sources of [[sources_from]] databases, which
    the reload itself reads again: those are not planned as removed."""
    catalog = Catalog.for_config(new) if catalog is None else catalog
    wanted = describe(new, catalog, running.salt, groups=running.groups, owned=running.owned)
    before = {s.name: s for s in running.sources}
    after = {s.name: s for s in wanted.sources}
    # a source read from a config database is not in the file: the reload reads those databases again
    sources = [SourcePlan(name, "unchanged", ("from a config database ([[sources_from]]): read again by the reload",))
               if file_only and name in running.fed else SourcePlan(name, "removed", discovery=s.discovery)
               for name, s in before.items() if name not in after]
    for name, source in after.items():
        was = before.get(name)
        if was is not None:
            sources.append(compare_source(was, source))
        elif name in running.discovered:
            sources.append(SourcePlan(name, "added", (f"takes the name over from a source that "
                                                      f"{running.discovered[name]} found",),
                                      discovery=source.discovery))
        else:
            sources.append(SourcePlan(name, "added", discovery=source.discovery))
    collector = _changes(running.collector, wanted.collector)
    return Plan(sources=tuple(sources), sinks=tuple(_sink_plans(running.sinks, wanted.sinks)),
                collector=tuple(collector), at_start=tuple(c.key for c in collector if c.key in COLLECTOR_AT_START))


def refused(problems: Iterable[str]) -> Plan:
    return Plan(errors=tuple(problems))
