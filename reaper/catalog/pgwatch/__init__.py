"""Import pgwatch's YAML (metrics.yaml with presets, sources.yaml) as reaper TOML.

`metrics.import_metrics(path)` and `sources.import_sources(path)` return the TOML text and the report,
one line per thing that was changed, dropped or needs a hand: `FILE: key.path: what happened`.
Nothing is dropped without a line. An input that cannot be read or parsed raises ConfigError with one
line. What reaper would reject (`reaper check`) is written commented out, so the result always loads
and nothing is lost.

- `common`: reading YAML the way pgwatch (Go's yaml.v3) does, the report, value helpers;
- `metrics`: metrics.yaml -> `[metrics.NAME]` and `[presets.NAME]`;
- `sources`: sources.yaml -> `[[sources]]` and a placeholder sink;
- `dsn`: pgwatch's conn_str (URI, libpq key=value, etcd://, `$VAR`) -> reaper's dsn.

Import from the submodules; this package re-exports nothing (so importing one part loads only it).
"""
