"""`reaper check --connect` for each `postgres` sink: will its role be able to write there?

One connection and one read-only statement per storage database, nothing created or changed: whether the
server takes writes (not a standby, not read-only), whether reaper's schema is there (and its version), and
whether the role may do what the sink does at its first start and then at every new time range: create the
schema (CREATE on the database), create partitions (CREATE on `subpartitions`, and being, or being a member
of, the owner of the metric tables: PostgreSQL lets only a table's owner add partitions to it). Each problem
comes with the statement that fixes it.
"""

from __future__ import annotations

import asyncpg
import attrs
import trio
from trio_asyncio import aio_as_trio

from reaper.config.schema import PostgresSinkConfig
from reaper.db import tls
from reaper.db.storage import LATEST_VERSION, StorageError, _connect_kwargs, describe_storage_error

FACTS_SQL = """\
select current_user as role, current_database() as database, pg_is_in_recovery() as in_recovery,
  current_setting('transaction_read_only') = 'on' as read_only, current_setting('server_version') as version,
  has_database_privilege(current_database(), 'CREATE') as may_create_schemas,
  exists (select from pg_class c join pg_namespace n on n.oid = c.relnamespace  -- (to_regclass needs USAGE)
          where n.nspname = 'admin' and c.relname = 'reaper_schema_version') as has_schema,
  (select n.nspowner::regrole::text from pg_namespace n where n.nspname = 'admin') as owner,
  (select pg_has_role(n.nspowner, 'USAGE') from pg_namespace n where n.nspname = 'admin') as is_owner,
  (select r.rolsuper from pg_namespace n join pg_roles r on r.oid = n.nspowner where n.nspname = 'admin')
    as owner_is_superuser,
  case when to_regnamespace('public') is not null then has_schema_privilege('public', 'CREATE') end
    as may_create_tables,
  case when to_regnamespace('admin') is not null then has_schema_privilege('admin', 'USAGE') end as may_use_admin,
  case when to_regnamespace('subpartitions') is not null
       then has_schema_privilege('subpartitions', 'CREATE') end as may_add_partitions"""


@attrs.frozen
class StorageCheck:
    label: str
    reachable: bool
    error: str = ""
    detail: str = ""  # "PostgreSQL 15.4, database metrics, role reaper, schema v2"
    problems: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def check_storage(config: PostgresSinkConfig) -> StorageCheck:
    """Connect to the sink's database (within its connect timeout) and judge what its role may do."""
    try:
        kwargs = await _connect_kwargs(config.password_file, config.write_timeout_seconds, "reaper check", config.dsn)
        with trio.fail_after(config.connect_timeout_seconds + config.write_timeout_seconds):
            facts = await aio_as_trio(_read_facts)(config.dsn, kwargs, config.connect_timeout_seconds)
    except trio.TooSlowError:
        return StorageCheck(config.label, False, f"no answer within {config.connect_timeout_seconds:g}s")
    except StorageError as e:
        return StorageCheck(config.label, False, str(e))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, ValueError) as e:
        return StorageCheck(config.label, False, describe_storage_error(e))
    return judge_storage(config.label, facts)


async def _read_facts(dsn: str, kwargs: dict[str, object], connect_seconds: float) -> dict[str, object]:
    conn = await tls.connect(dsn, {"timeout": connect_seconds, **kwargs})
    try:
        facts = dict(await conn.fetchrow(FACTS_SQL))
        if facts["has_schema"] and facts["may_use_admin"]:
            facts["schema_version"] = await conn.fetchval(
                "select coalesce(max(version), 0) from admin.reaper_schema_version")
        return facts
    finally:
        await conn.close(timeout=2)


def judge_storage(label: str, facts: dict[str, object]) -> StorageCheck:
    role, database = str(facts["role"]), str(facts["database"])
    version = int(facts.get("schema_version") or 0)  # type: ignore[call-overload]
    schema = (f"schema v{version}" if version else "reaper's schema") if facts["has_schema"] else "no reaper schema yet"
    detail = f"PostgreSQL {facts['version']}, database {database}, role {role}, {schema}"
    problems: list[str] = []
    fixes: list[str] = []
    if facts["in_recovery"]:
        problems.append("the server is a standby: nothing can be written there (point the sink at the primary)")
    elif facts["read_only"]:
        problems.append("sessions are read-only here (default_transaction_read_only)")
        fixes.append(f"ALTER ROLE {_quote(role)} IN DATABASE {_quote(database)} "
                     "SET default_transaction_read_only = off;")
    if not facts["has_schema"]:
        if not facts["may_create_schemas"]:
            problems.append(f"the storage schema is not there and role {role} may not create it (CREATE on the "
                            f"database): run `reaper storage init` as the database's owner, or grant it")
            fixes.append(f"GRANT CREATE ON DATABASE {_quote(database)} TO {_quote(role)};")
        if facts["may_create_tables"] is False:  # the metric tables are public.<metric>, as pgwatch's
            problems.append(f"role {role} may not create the metric tables in schema public")
            fixes.append(f"GRANT CREATE ON SCHEMA public TO {_quote(role)};")
    else:
        if version > LATEST_VERSION:
            problems.append(f"schema v{version} is newer than this reaper knows (v{LATEST_VERSION}): upgrade reaper")
        owner = str(facts["owner"])
        if facts["is_owner"] is False and facts["owner_is_superuser"]:
            problems.append(f"the storage tables belong to superuser {owner}: role {role} cannot add partitions to "
                            f"them (let the sink write as the role that ran `reaper storage init`, or run it as "
                            f"{role} on a new database)")
        elif facts["is_owner"] is False:
            problems.append(f"the storage tables belong to {owner}: role {role} cannot add partitions to them")
            fixes.append(f"GRANT {_quote(owner)} TO {_quote(role)};")
        elif facts["may_create_tables"] is False:
            problems.append(f"role {role} may not create the tables of new metrics in schema public")
            fixes.append(f"GRANT CREATE ON SCHEMA public TO {_quote(role)};")
        if facts["is_owner"] and facts["may_add_partitions"] is False:
            problems.append(f"role {role} may not create tables in schema subpartitions")
            fixes.append(f"GRANT CREATE ON SCHEMA subpartitions TO {_quote(role)};")
    return StorageCheck(label, True, detail=detail, problems=tuple(problems), fixes=tuple(fixes))
