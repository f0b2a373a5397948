"""Every column reaper stores has the JSON kind pgwatch's own SQL gives it (tests/data/pgwatch_kinds.tsv).

For each metric in the table, reaper's SQL for the server's version runs on a real PostgreSQL: the
column types (psql's \\gdesc) must map to the table's kind (integer / number / string / boolean, or array
for a PostgreSQL array, which pgwatch writes as a JSON array), and
the rows, encoded by the sinks' encoder, must carry that kind in their JSON text (an integer column
never `300.0`). On the pg15 fixture always; on PostgreSQL 14 and 18 with the `matrix` marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pgserver import PgServer, ServerHandle, cleanup_stale, create_extensions

from reaper import db
from reaper.catalog.docs import load_kind_differences, render_shipped
from reaper.catalog.metrics import load_shipped_definitions
from reaper.sinks.encode import dumps

KINDS_TSV = Path(__file__).resolve().parent / "data" / "pgwatch_kinds.tsv"
METRICS = load_shipped_definitions().metrics
TYPE_KINDS = {"bigint": "integer", "integer": "integer", "smallint": "integer", "double precision": "number",
              "real": "number", "numeric": "number", "text": "string", "name": "string",
              "character varying": "string", "boolean": "boolean"}


def load_kinds(path: Path = KINDS_TSV) -> dict[str, dict[str, tuple[str, str]]]:
    """{metric: {column: (kind, note)}} from the table."""
    table: dict[str, dict[str, tuple[str, str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        metric, column, kind, *note = line.split("\t")
        assert kind in ("integer", "number", "string", "boolean", "array"), line
        table.setdefault(metric, {})[column] = (kind, note[0] if note else "")
    return table


KINDS = load_kinds()


def json_kind(token: Any) -> str:
    """The kind of one value as written in JSON text (parsed with the hooks in `parse_tokens`)."""
    if token is None:
        return "null"
    if isinstance(token, bool):
        return "boolean"
    if isinstance(token, str):
        return "string"
    if isinstance(token, list):
        return "array"
    return token[0]  # ("integer", text) or ("number", text)


def parse_tokens(data: bytes) -> Any:
    return json.loads(data, parse_int=lambda s: ("integer", s), parse_float=lambda s: ("number", s),
                      parse_constant=lambda s: ("number", s))


def compatible(expected: str, found: str) -> bool:
    return found == "null" or found == expected or (expected == "number" and found == "integer")


def column_types(server: ServerHandle, sql: str) -> dict[str, str]:
    out = server.psql(sql.strip() + "\n\\gdesc")
    return dict(line.split("|", 1) for line in out.splitlines())


async def fetch_rows(dsn: str, sql: str) -> list[dict[str, Any]]:
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=60)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()


def mismatches(server: ServerHandle, dsn: str) -> list[str]:
    major = server.major
    problems: list[str] = []
    for name, columns in sorted(KINDS.items()):
        metric = METRICS.get(name)
        if metric is None:
            problems.append(f"{name}: in the table but not a reaper metric")
            continue
        sql = metric.sql_for(major)
        if sql is None:
            continue
        try:
            types = column_types(server, sql)
        except Exception as e:
            if any(ext in str(e) for ext in metric.requires_extension):
                continue
            problems.append(f"{name}: {e}")
            continue
        for column, pg_type in types.items():
            if column == "epoch_ns":
                continue
            if column not in columns:
                problems.append(f"{name}.{column}: returned by reaper but not in the table")
                continue
            expected, note = columns[column]
            found = "array" if pg_type.endswith("[]") else TYPE_KINDS.get(pg_type, f"({pg_type})")
            if found != expected and not note.startswith("deliberate"):
                problems.append(f"{name}.{column}: PostgreSQL {major} type {pg_type} is {found}, "
                                f"pgwatch has {expected}")
        for row in trio.run(fetch_rows, dsn, sql):
            encoded = parse_tokens(dumps(row))
            for column, token in encoded.items():
                if column in columns and not columns[column][1].startswith("deliberate"):
                    found = json_kind(token)
                    if not compatible(columns[column][0], found):
                        problems.append(f"{name}.{column}: written as {found} {token!r}, "
                                        f"pgwatch has {columns[column][0]}")
    return sorted(set(problems))


def test_the_table_is_well_formed() -> None:
    assert KINDS, "no rows"
    assert sorted(n for n in KINDS if n not in METRICS) == []
    for name, columns in KINDS.items():
        declared = set(METRICS[name].columns)
        assert sorted(c for c in columns if c not in declared) == [], name


def test_deliberate_rows_are_listed_in_the_metric_reference() -> None:
    deliberate = sorted((m, c, kind) for m, cols in KINDS.items() for c, (kind, note) in cols.items()
                        if note.startswith("deliberate"))
    differences = load_kind_differences(KINDS_TSV)
    assert sorted((d.metric, d.column, d.pgwatch_kind) for d in differences) == deliberate
    text = render_shipped()
    section = text.split("## Deliberate differences from pgwatch's value kinds\n", 1)[1].split("\n## ", 1)[0]
    for d in differences:
        assert f"| [{d.metric}](#{d.metric}) | {d.column} | {d.pgwatch_kind} | " in section
    if not differences:
        assert "None." in section


def test_json_kind_reads_the_text() -> None:
    assert json_kind(parse_tokens(b"300")) == "integer"
    assert json_kind(parse_tokens(b"300.0")) == "number"
    assert json_kind(parse_tokens(b"1e+21")) == "number"
    assert json_kind(parse_tokens(b'"x"')) == "string"
    assert json_kind(parse_tokens(b"true")) == "boolean"
    assert json_kind(parse_tokens(b"[16384, 16390]")) == "array"


@pytest.mark.pg
def test_kinds_match_pgwatch_on_pg15(pg15: ServerHandle) -> None:
    problems = mismatches(pg15, pg15.dsn())
    assert problems == []


@pytest.fixture(scope="module", params=[14, 18], ids=["pg14", "pg18"])
def matrix_server(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    cleanup_stale()
    server = PgServer.create(major=request.param, settings={"shared_preload_libraries": "pg_stat_statements"})
    try:
        create_extensions(server, "postgres", ["pg_stat_statements"])
        yield server
    finally:
        server.cleanup()


@pytest.mark.pg
@pytest.mark.matrix
def test_kinds_match_pgwatch_on_14_and_18(matrix_server: PgServer) -> None:
    problems = mismatches(matrix_server, matrix_server.dsn())
    assert problems == []
