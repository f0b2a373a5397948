#!/bin/bash
# Entrypoint of the reaper-test-pg image (tests/containers/build-image.sh puts it in the image).
#
# Initialises a cluster in $PGDATA as the OS user postgres (trust auth, superuser "postgres") unless
# one is there, then execs the server as that user, listening on ${PGLISTEN:-127.0.0.1}:$PGPORT
# with pg_stat_statements preloaded. Arguments are handed to the server, so the command line of
# the official postgres images works unchanged: `postgres -c name=value ...` (a leading "postgres"
# is dropped). With `docker run --network host`, PGPORT is the port the tests connect to.
set -euo pipefail

PGPORT=${PGPORT:-5432}
PGDATA=${PGDATA:-/var/lib/postgresql/data}
PGLISTEN=${PGLISTEN:-127.0.0.1}
export PGPORT PGDATA

bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    as_postgres "$bindir/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C \
        --no-sync --no-instructions >/dev/null
fi

if [ "${1:-}" = postgres ]; then shift; fi
exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$bindir/postgres" -D "$PGDATA" -p "$PGPORT" \
    -c listen_addresses="$PGLISTEN" -c unix_socket_directories=/var/run/postgresql \
    -c shared_preload_libraries=pg_stat_statements "$@"
