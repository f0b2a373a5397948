"""What a role may do on a server, read from the catalog (for `reaper check --connect`). Trio-flavoured.

Never by running a metric and reading its error: `has_function_privilege`, `has_any_column_privilege`,
`pg_has_role`, the ACLs of functions and relations (which predefined role a privilege is granted to,
so the fix can be `GRANT pg_monitor TO reaper;` rather than one GRANT per function), `pg_settings` (a
setting the role may not see is not in it), `pg_extension` / `pg_available_extensions`.

Only functions and relations of `pg_catalog` or belonging to an extension are looked at: a metric's
CTE names and aliases are not relations, and a user's own table of the same name is not the point.
A handful of read-only catalog queries per source, once.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from reaper.db import SourceConnection

ROLE_SQL = """select current_user::text as role,
  (select rolsuper from pg_roles where rolname = current_user) as superuser,
  array(select b.rolname::text from pg_roles b
        where b.rolname <> current_user and pg_has_role(current_user, b.oid, 'MEMBER') order by 1) as memberships"""

# For each function name: every overload in pg_catalog or an extension, whether this role may run it,
# and the predefined roles (pg_*) its ACL grants EXECUTE to.
FUNCTIONS_SQL = """select p.proname::text as name, p.oid::regprocedure::text as signature,
  has_function_privilege(p.oid, 'EXECUTE') as ok,
  array(select r.rolname::text from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        join pg_roles r on r.oid = a.grantee
        where a.privilege_type = 'EXECUTE' and r.rolname like 'pg\\_%' order by 1) as granted_to
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where p.proname = any($1::text[])
  and (n.nspname = 'pg_catalog'
       or exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid
                  and d.deptype = 'e'))"""

RELATIONS_SQL = """select r.name, c.oid::regclass::text as qualified,
  has_table_privilege(c.oid, 'SELECT') as ok, has_any_column_privilege(c.oid, 'SELECT') as some,
  array(select g.rolname::text from aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
        join pg_roles g on g.oid = a.grantee
        where a.privilege_type = 'SELECT' and g.rolname like 'pg\\_%' order by 1) as granted_to
from unnest($1::text[]) as r(name)
join pg_class c on c.oid = to_regclass(r.name)
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'pg_catalog'
  or exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = c.oid
             and d.deptype = 'e')"""

# pg_settings holds only the settings this role may see.
SETTINGS_SQL = "select name::text, setting::text from pg_settings where name = any($1::text[])"

EXTENSIONS_SQL = """select e.name::text, e.installed_version is not null as installed
from pg_available_extensions e where e.name = any($1::text[])"""

# Which predefined roles include which (pg_monitor includes pg_read_all_settings, ...), server-side.
PREDEFINED_SQL = """select r.rolname::text as role,
  array(select m.rolname::text from pg_roles m
        where m.rolname like 'pg\\_%' and m.oid <> r.oid and pg_has_role(r.oid, m.oid, 'MEMBER')) as includes
from pg_roles r where r.rolname in ('pg_monitor', 'pg_read_all_stats', 'pg_read_all_settings',
                                    'pg_stat_scan_tables', 'pg_read_server_files')"""


@attrs.frozen
class Function:
    signature: str  # pg_ls_waldir(), as GRANT EXECUTE ON FUNCTION takes it
    ok: bool
    granted_to: tuple[str, ...]  # predefined roles holding EXECUTE


@attrs.frozen
class Relation:
    qualified: str
    ok: bool
    some: bool  # some of its columns are readable
    granted_to: tuple[str, ...]


@attrs.frozen
class Privileges:
    role: str
    superuser: bool
    memberships: tuple[str, ...]
    functions: dict[str, tuple[Function, ...]]  # name -> overloads (absent: no such function here)
    relations: dict[str, Relation]  # name as written -> the relation (absent: not a catalog relation)
    settings: dict[str, str]  # visible settings -> value
    extensions: dict[str, bool]  # available extension -> installed in this database
    includes: dict[str, tuple[str, ...]]  # predefined role -> the predefined roles it includes

    def member_of(self, role: str) -> bool:
        return self.superuser or role in self.memberships


async def read_privileges(conn: SourceConnection, *, functions: Iterable[str], relations: Iterable[str],
                          settings: Iterable[str], extensions: Iterable[str]) -> Privileges:
    """The role's privileges on everything named. The caller bounds the call with a deadline."""
    who = (await conn.fetch(ROLE_SQL))[0]
    procs: dict[str, list[Function]] = {}
    for row in await conn.fetch(FUNCTIONS_SQL, sorted(functions)):
        procs.setdefault(row["name"], []).append(Function(row["signature"], bool(row["ok"]),
                                                          tuple(row["granted_to"])))
    rels = {row["name"]: Relation(row["qualified"], bool(row["ok"]), bool(row["some"]), tuple(row["granted_to"]))
            for row in await conn.fetch(RELATIONS_SQL, sorted(relations))}
    visible = {row["name"]: row["setting"] for row in await conn.fetch(SETTINGS_SQL, sorted(settings))}
    exts = {row["name"]: bool(row["installed"]) for row in await conn.fetch(EXTENSIONS_SQL, sorted(extensions))}
    includes = {row["role"]: tuple(row["includes"]) for row in await conn.fetch(PREDEFINED_SQL)}
    return Privileges(role=who["role"], superuser=bool(who["superuser"]), memberships=tuple(who["memberships"]),
                      functions={k: tuple(v) for k, v in procs.items()}, relations=rels, settings=visible,
                      extensions=exts, includes=includes)

