"""What reaper reads of a source's server as a connection opens (reaper.db._connect): one statement."""

# A number that changes when an extension is created or dropped (each new one has a new oid): the batch's statement
# reports it at every tick (reaper.db.combined), so a `CREATE EXTENSION pg_stat_statements` run while reaper collects
# starts the metrics that need it at the next tick, and a DROP skips them, with no reconnect (and no extra statement
# but when it changed). A scan of pg_extension's few rows: microseconds.
EXTENSIONS_MARK = "(select coalesce(sum(oid::int8), 0) from pg_extension)"

SERVER_FACTS_SQL = ("select current_setting('server_version_num')::int as num, current_setting('server_version') as v,"
                    " pg_is_in_recovery() as rec, current_database() as db,"
                    " inet_server_addr() is null as via_socket,"
                    " coalesce(inet_server_addr() in ('127.0.0.1', '::1'), true) as lo,"
                    " (select setting from pg_settings where name = 'statement_timeout') as st,"
                    " array(select extname::text from pg_extension) as exts, " + EXTENSIONS_MARK + " as extmark,"
                    " current_setting('idle_session_timeout', true) as ist,"  # (PostgreSQL 14+; else null)
                    " extract(epoch from pg_postmaster_start_time())::float8 as pst")
SYSTEM_ID_SQL = "(select system_identifier from pg_control_system())"
# The search_path a database's owner or a role's settings give would decide which function or view a metric's
# unqualified name runs: a schema listed before pg_catalog, or a view named like an extension's in "$user", runs
# the owner's code in reaper's session (as a superuser, if reaper connects as one). reaper connects with
# search_path = pg_catalog (a client's startup setting outranks theirs), then pins pg_catalog, the source's
# `search_path` schemas and the installed extensions' schemas, in that order, for the session. Only when the
# startup setting is in force: a pooler that dropped it hands out server sessions reaper must leave as it found.
PIN_SEARCH_PATH = (", case when current_setting('search_path') = 'pg_catalog' then set_config('search_path',"
                   " (select string_agg(quote_ident(s), ', ' order by o) from (select s, min(o) as o from"
                   " unnest(array['pg_catalog'] || $1::text[] || array(select n.nspname::text from pg_extension e"
                   " join pg_namespace n on n.oid = e.extnamespace order by e.oid)) with ordinality as u(s, o)"
                   " group by s) as v), false) end as sp")
# After CREATE or DROP EXTENSION: the extensions, and ($1) the pinned path with the schemas of new ones at its end
EXTENSIONS_REPINNED_SQL = ("select array(select extname::text from pg_extension) as exts, " + EXTENSIONS_MARK
                           + " as extmark, case when $1 then"
                           " set_config('search_path', current_setting('search_path') || coalesce((select"
                           " string_agg(', ' || quote_ident(s), '') from (select distinct n.nspname::text as s"
                           " from pg_extension e join pg_namespace n on n.oid = e.extnamespace"
                           " where n.nspname <> all(current_schemas(false))) as x), ''), false) end as sp")
