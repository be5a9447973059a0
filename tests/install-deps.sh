#!/usr/bin/env bash
# Installs the Debian packages the test suite needs when they are missing:
# PostgreSQL and MariaDB server binaries (started by the test environment in
# temporary directories, never as system services), their clients, and the
# headers the Rust build links against. Idempotent; quiet when all is there.
set -euo pipefail

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
have psql || missing+=(postgresql-client)
{ have mariadbd || [ -x /usr/sbin/mariadbd ]; } && have mariadb-install-db || missing+=(mariadb-server)
have mariadb || missing+=(mariadb-client)
have pkg-config || missing+=(pkg-config)
have setpriv || missing+=(util-linux)
have git || missing+=(git)
have cc || missing+=(gcc)
have go || missing+=(golang-go)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)

[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
sudo=()
if [ "$(id -u)" != 0 ]; then
  have sudo || { echo "install-deps: need root (or sudo) to install ${missing[*]}" >&2; exit 2; }
  sudo=(sudo)
fi

# Package scripts must not start system-wide database services: the tests
# start their own servers. policy-rc.d tells invoke-rc.d to leave them alone.
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${sudo[@]}" chmod 755 /usr/sbin/policy-rc.d
  added_policy=1
fi
cleanup() { [ "$added_policy" = 1 ] && "${sudo[@]}" rm -f /usr/sbin/policy-rc.d; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
