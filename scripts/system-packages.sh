#!/usr/bin/env bash
# The Debian packages the tests use besides what pip brings, in one place:
#
#   scripts/system-packages.sh install         # apt-get install those missing (.ci/run does)
#   scripts/system-packages.sh hide make test  # run a command as on a machine without them
#
# `hide` runs the command in a mount namespace of its own (unshare --mount, as root), where
# every executable file those packages installed has an empty, non-executable file bound over
# it and /usr/lib/postgresql is an empty tmpfs: what a new user's machine looks like to the
# tests, which then skip with one line naming the package. Nothing outside the namespace
# changes, and it is gone when the command ends. systemd (systemd-analyze) stays: a new
# machine has it.
set -euo pipefail

PACKAGES="pgbouncer haproxy etcd-server patroni postgresql prometheus prometheus-postgres-exporter"

missing() { ! command -v "$1" >/dev/null && [ ! -x "/usr/sbin/$1" ]; }

case "${1:-}" in
  install)
    if missing pgbouncer || missing haproxy || missing etcd || missing patroni || missing promtool \
       || missing prometheus-postgres-exporter || ! ls /usr/lib/postgresql/*/bin/pg_rewind >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES >/dev/null
    fi
    ;;
  hide)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 hide COMMAND [ARGS...]" >&2; exit 2; }
    # The packages and the PostgreSQL server packages they pull in (postgresql-NN).
    installed=$(dpkg-query -W -f '${Package} ${Status}\n' $PACKAGES 'postgresql-[0-9]*' 2>/dev/null \
                | awk '$NF == "installed" {print $1}')
    exec unshare --mount --propagation private -- bash -c '
      set -euo pipefail
      empty=$(mktemp)
      for package in $1; do
        dpkg -L "$package" | while read -r file; do
          if [ -f "$file" ] && [ -x "$file" ] && [ ! -L "$file" ]; then mount --bind "$empty" "$file"; fi
        done
      done
      [ -d /usr/lib/postgresql ] && mount -t tmpfs none /usr/lib/postgresql
      rm -f "$empty"  # the mounts keep it
      shift
      exec "$@"' hide "$installed" "$@"
    ;;
  *)
    echo "usage: $0 install | hide COMMAND [ARGS...]" >&2
    exit 2
    ;;
esac
