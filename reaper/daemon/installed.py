"""reaper's own files on disk, against the code the running daemon loaded: a reload after an upgrade.

reaper imports a feature's modules only when the config uses it (a sink type, a source kind, a special metric,
the health endpoints; issue 14's memory). A daemon left running across `pip install -U reaper` (or a package
upgrade) therefore imported the new version's files at a reload that added such a feature: a module that no
longer fits the running code failed the reload with a traceback and ended the daemon (its collection with it).

Before a reload is applied, `reload_problems` names the modules the new config needs that are not loaded yet.
When reaper's files changed since the daemon started, loading them would mix two versions: the reload is
refused, with one line saying to restart. Otherwise they are imported there, and one that cannot be (a broken
installation) refuses the reload the same way. A start loads them the same way (`load_needed`): one line, no
traceback. A reload that needs nothing new after an upgrade is applied, and the log says which version runs.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path

import attrs

import reaper
from reaper.catalog.metrics import Catalog
from reaper.config.schema import Config, PostgresSinkConfig, PrometheusSinkConfig
from reaper.errors import ConfigError
from reaper.special.registry import REGISTRY

log = logging.getLogger("reaper.daemon.installed")

PACKAGE = Path(reaper.__file__).resolve().parent
_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)
#: what a source kind needs beyond a plain PostgreSQL connection
KIND_MODULES = {"patroni": ("reaper.kinds.patroni",), "pgbouncer": ("reaper.db.simple",),
                "pgpool": ("reaper.db.simple",)}


def _files_mark() -> tuple[int, int]:
    """(how many .py files reaper has, the newest one's mtime in ns): what an upgrade or an edit changes."""
    try:
        stamps = [p.stat().st_mtime_ns for p in PACKAGE.rglob("*.py")]
    except OSError:
        return (0, 0)
    return (len(stamps), max(stamps, default=0))


def installed_version() -> str:
    """The version reaper's files on disk say now ("gone" when they are no longer there)."""
    try:
        found = _VERSION.search((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    except OSError:
        return "gone"
    return found.group(1) if found else "unknown"


@attrs.define
class Installation:
    """reaper's files as the daemon found them when it started."""

    version: str = reaper.__version__
    mark: tuple[int, int] = attrs.field(factory=_files_mark)

    def changed(self) -> str | None:
        """None when reaper's files are as at start; else what to say: the running and the installed version."""
        if _files_mark() == self.mark:
            return None
        now = installed_version()
        return (f"reaper's files changed on disk since this daemon started (running {self.version}, installed "
                f"{now})" if now != self.version else
                f"reaper's files changed on disk since this daemon started (version {now} both)")


def needed_modules(config: Config, catalog: Catalog) -> set[str]:
    """The modules reaper imports only for what this config uses."""
    needed: set[str] = set()
    for sink in config.sinks:
        if isinstance(sink, PostgresSinkConfig):
            needed.add("reaper.sinks.postgres")
        elif isinstance(sink, PrometheusSinkConfig):
            needed.add("reaper.sinks.prometheus")
    if config.collector.http_listen:
        needed.add("reaper.daemon.health")
    if config.sources_from:
        needed |= {"reaper.catalog.pgwatch.sources", "reaper.db.configdb"}
    metrics: set[str] = set()
    for source in config.sources:
        if not source.enabled:
            continue
        needed.update(KIND_MODULES.get(source.kind, ()))
        for standby in (False, True):
            metrics.update(catalog.intervals(source, standby=standby))
    for name in metrics:
        entry = REGISTRY.get(name)
        if entry is None:
            continue
        for path in (entry.collector, entry.reads):
            if path and ":" in path:
                needed.add(path.partition(":")[0])
    return needed


def _load(modules: set[str], why: str) -> list[str]:
    problems = []
    for name in sorted(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # a broken file or a dependency missing: said, never the daemon's end
            problems.append(f"reaper's module {name} cannot be loaded ({type(e).__name__}: {e}): {why}")
    return problems


def load_needed(config: Config, catalog: Catalog) -> None:
    """At start: import what the config needs; ConfigError (one line per module) when one cannot be."""
    problems = _load(needed_modules(config, catalog) - set(sys.modules),
                     "a broken installation; reinstall reaper")
    if problems:
        raise ConfigError(problems)


def reload_problems(config: Config, catalog: Catalog, installation: Installation) -> list[str]:
    """Why this config cannot be applied by the running code (empty: it can); says an upgrade once per reload."""
    missing = needed_modules(config, catalog) - set(sys.modules)
    changed = installation.changed()
    if changed and missing:
        return [f"{changed}, and this configuration needs parts of reaper the daemon has not loaded "
                f"({', '.join(sorted(missing))}): mixing two versions is not safe; restart the daemon (systemctl "
                f"restart reaper) to apply it"]
    if changed:
        log.warning("reload: %s: this daemon runs what it loaded at its start until it is restarted (systemctl "
                    "restart reaper)", changed)
    return _load(missing, "a broken installation; reinstall reaper, then restart the daemon")
