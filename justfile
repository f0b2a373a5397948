# reaper's everyday commands. `just --list` shows them.

python := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python3" }

# run the whole test suite (starts its own PostgreSQL servers)
test *ARGS:
    {{python}} -m pytest {{ARGS}}

# build the test image reaper-test-pg:MAJOR from Debian packages, no registry (root, a Docker engine, debootstrap)
test-image MAJOR="15":
    tests/containers/build-image.sh {{MAJOR}}

# the version matrix alone: every metric on PostgreSQL 14-18; rewrites docs/matrix.json and docs/metrics.md
test-matrix *ARGS:
    REAPER_WRITE_MATRIX=1 {{python}} -m pytest -m matrix {{ARGS}}; rc=$?; {{python}} -m reaper.cli metrics docs --output docs/metrics.md && exit $rc

# ruff and mypy
lint:
    {{python}} -m ruff check reaper tests
    {{python}} -m mypy

# measure reaper's cost (seed, fleet100, fleet1000, sink) next to postgres_exporter; rewrites docs/benchmarks.md
# (server-cost: bench/server_cost.py, the server ms per minute of basic/standard/exhaustive, about 10 min)
bench SCENARIO *ARGS:
    {{python}} -c 'import matplotlib' 2>/dev/null || {{python}} -m pip install -q -e '.[bench]'
    {{python}} {{ if SCENARIO == "server-cost" { "bench/server_cost.py" } else { "bench/run.py " + SCENARIO } }} {{ARGS}}

# run the daemon with a config file
run CONFIG="conf/reaper.toml":
    {{python}} -m reaper.cli run --config {{CONFIG}}

# watch reaper collect from a throwaway PostgreSQL
demo *ARGS:
    {{python}} -m reaper.cli demo {{ARGS}}

# set up a development virtualenv
venv:
    python3 -m venv .venv
    .venv/bin/pip install -e '.[test,demo]'
