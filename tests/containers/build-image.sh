#!/usr/bin/env bash
# Build the PostgreSQL image the container test provider uses, from Debian packages, without any
# image registry: debootstrap a minimal Debian with postgresql-<major>, `docker import` it as the
# base image, then commit tests/containers/entrypoint.sh on top of it.
#
#   tests/containers/build-image.sh [MAJOR]       (default 15; Debian 12 ships only 15)
#
# Images: reaper-test-pg-base:<major> (the root file system; kept while the tag exists) and
# reaper-test-pg:<major> (base + entrypoint; rebuilt when entrypoint.sh changes). Both are cached by
# tag: a second run with nothing changed takes a second. REAPER_TEST_PG_REBUILD=1 rebuilds both.
# Needs: root (debootstrap), a running Docker engine, debootstrap, and a Debian mirror: the first
# deb.debian.org-style URI in /etc/apt/sources.list{,.d/*}, or REAPER_DEBIAN_MIRROR. Suite:
# REAPER_DEBIAN_SUITE (default: this machine's codename, else bookworm).
# Any failure ends with one line starting "build-image: FAILED:" and a non-zero exit.
set -euo pipefail

major=${1:-15}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
base_tag="reaper-test-pg-base:$major"
tag="reaper-test-pg:$major"
bindir="/usr/lib/postgresql/$major/bin"
work=""

fail() { echo "build-image: FAILED: $*" >&2; exit 1; }
cleanup() {
    if [ -n "$work" ]; then rm -rf "$work"; fi
    if [ -n "${cid:-}" ]; then docker rm -f "$cid" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'fail "line $LINENO: \"$BASH_COMMAND\" exited with status $?"' ERR

[[ "$major" =~ ^[0-9]+$ ]] || fail "major must be a number, got '$major'"
command -v docker >/dev/null || fail "no docker command on PATH"
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer (docker info)"

mirror() {
    if [ -n "${REAPER_DEBIAN_MIRROR:-}" ]; then echo "$REAPER_DEBIAN_MIRROR"; return; fi
    # one-line (deb URI suite ...) and deb822 (URIs: ...) sources; skip the security archive
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' \
                 -e 's/^URIs:[[:space:]]*\([^[:space:]]\+\).*/\1/p' \
        | grep -v -- '-security' | head -n 1 || true
}

if [ "${REAPER_TEST_PG_REBUILD:-0}" = 1 ]; then
    docker image rm -f "$tag" "$base_tag" >/dev/null 2>&1 || true
fi

if docker image inspect "$base_tag" >/dev/null 2>&1; then
    echo "build-image: $base_tag exists (cached)"
else
    [ "$(id -u)" -eq 0 ] || fail "debootstrap needs root to build $base_tag"
    command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap)"
    url=$(mirror)
    [ -n "$url" ] || fail "no Debian mirror found in /etc/apt/sources.list*; set REAPER_DEBIAN_MIRROR"
    suite=${REAPER_DEBIAN_SUITE:-$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")}
    suite=${suite:-bookworm}
    work=$(mktemp -d /var/tmp/reaper-pg-image.XXXXXX)
    echo "build-image: debootstrap $suite from $url with postgresql-$major (about a minute)"
    if ! debootstrap --variant=minbase --include="postgresql-$major" "$suite" "$work/rootfs" "$url" \
            >"$work/debootstrap.log" 2>&1; then
        tail -n 15 "$work/debootstrap.log" >&2
        fail "debootstrap of $suite with postgresql-$major from $url did not work (log above)"
    fi
    [ -x "$work/rootfs$bindir/postgres" ] || fail "postgresql-$major gave no $bindir/postgres"
    [ -e "$work/rootfs/usr/lib/postgresql/$major/lib/pg_stat_statements.so" ] \
        || fail "pg_stat_statements.so is missing from postgresql-$major"
    # the package's postinst made a cluster in /var/lib/postgresql/<major>/main: the entrypoint makes its own
    rm -rf "$work/rootfs/var/lib/postgresql/$major" "$work/rootfs/var/cache/apt/archives/"*.deb
    echo "build-image: docker import $base_tag"
    tar -C "$work/rootfs" -c . | docker import \
        -c "ENV PATH=$bindir:/usr/sbin:/usr/bin:/sbin:/bin" \
        -c "ENV LANG=C.UTF-8" \
        - "$base_tag" >/dev/null || fail "docker import of $base_tag did not work"
    rm -rf "$work"; work=""
fi

sum=$(sha256sum "$here/entrypoint.sh" | cut -d' ' -f1)
have=$(docker image inspect -f '{{ index .Config.Labels "org.reaper.entrypoint-sha256" }}' "$tag" 2>/dev/null || true)
if [ "$have" = "$sum" ]; then
    echo "build-image: $tag exists with this entrypoint (cached)"
    exit 0
fi
cid=$(docker create "$base_tag" /bin/true) || fail "docker create from $base_tag did not work"
docker cp "$here/entrypoint.sh" "$cid:/usr/local/bin/reaper-pg-entrypoint" || fail "docker cp of the entrypoint"
docker commit \
    -c 'ENTRYPOINT ["/usr/local/bin/reaper-pg-entrypoint"]' \
    -c 'CMD ["postgres"]' \
    -c "ENV PATH=$bindir:/usr/sbin:/usr/bin:/sbin:/bin" \
    -c 'ENV LANG=C.UTF-8' \
    -c "LABEL org.reaper.entrypoint-sha256=$sum org.reaper.pg-major=$major" \
    "$cid" "$tag" >/dev/null || fail "docker commit of $tag did not work"
echo "build-image: built $tag ($(docker run --rm --entrypoint postgres "$tag" --version))"
