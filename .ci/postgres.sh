#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests that need a real one (examples/postgres).
#
#   eval "$(.ci/postgres.sh start)"   # prints the exports of AIODELAY_TEST_PG_DSN and _DIR
#   pytest tests/test_example_postgres.py
#   .ci/postgres.sh stop              # stops the cluster of $AIODELAY_TEST_PG_DIR, removes it
#
# `start [DIR]` makes the cluster in DIR (a new directory under /tmp if none is given) with
# Debian's postgresql binaries (apt-get install -y postgresql), listening on a free port of
# 127.0.0.1 only, no Unix socket, trust authentication from 127.0.0.1 only, and no fsync (its
# data is thrown away). As root it runs initdb and the server as the `postgres` user, since
# PostgreSQL refuses to run as root. Only the export lines go to stdout; the server log is
# DIR/log. `stop [DIR]` stops the server and removes DIR, if DIR is one that `start` made.
set -euo pipefail

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

marker=aiodelay-throwaway-cluster

bindir() {
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n $found && -x $found/initdb ]] \
        || die "PostgreSQL's server binaries not found in /usr/lib/postgresql/*/bin (Debian: apt-get install -y postgresql)"
    echo "$found"
}

# As root, run the server's commands as the postgres user (Debian's package makes it), from /:
# the postgres user may not be allowed into the caller's directory.
as_owner() {
    if ((EUID == 0)); then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

start() {
    local bin dir port
    bin="$(bindir)"
    if (($# > 0)); then
        dir="$1"
        mkdir -p "$dir"
        [[ -z "$(ls -A "$dir")" ]] || die "$dir is not empty"
    else
        dir="$(mktemp -d "${TMPDIR:-/tmp}/aiodelay-pg.XXXXXX")"
    fi
    dir="$(cd "$dir" && pwd)"
    touch "$dir/$marker"
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 || die "no postgres user (Debian: apt-get install -y postgresql)"
        chown postgres: "$dir"
    fi
    # A port that was free a moment ago; postgres cannot bind port 0 and report it.
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync --no-instructions \
        -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || die "initdb failed: $(tail -n 5 "$dir/initdb.log")"
    as_owner tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    as_owner tee "$dir/data/pg_hba.conf" >/dev/null <<EOF
host all all 127.0.0.1/32 trust
EOF
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/data/log" -w -t 30 start >/dev/null \
        || die "the server did not start: $(tail -n 5 "$dir/data/log" 2>/dev/null)"
    echo "export AIODELAY_TEST_PG_DSN='postgresql://postgres@127.0.0.1:$port/postgres'"
    echo "export AIODELAY_TEST_PG_DIR='$dir'"
}

stop() {
    local dir="${1:-${AIODELAY_TEST_PG_DIR:-}}"
    [[ -n $dir ]] || die "stop: which cluster? give its directory or set AIODELAY_TEST_PG_DIR"
    [[ -e $dir/$marker ]] || die "stop: $dir is not a cluster that postgres.sh start made"
    if [[ -e $dir/data/postmaster.pid ]]; then
        # immediate: the data is thrown away, so no checkpoint to wait for.
        as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
    fi
    rm -rf "$dir"
}

case "${1:-}" in
start) shift && start "$@" ;;
stop) shift && stop "$@" ;;
*) die "usage: $0 start [DIR] | stop [DIR]" ;;
esac
