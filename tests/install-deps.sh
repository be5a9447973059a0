#!/usr/bin/env bash
# Installs the Debian packages the test suite needs when they are missing:
# PostgreSQL and MariaDB server binaries (started by the test environment in
# temporary directories, never as system services), their clients, and the
# headers the Rust build links against. Idempotent; quiet when all is there.
# Every way out says why: a failure names what it was doing.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
fail() { echo "install-deps: $*" >&2; exit 2; }

# Prints the Debian package of each missing piece, one per line.
missing_packages() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || echo postgresql
  compgen -G '/usr/lib/postgresql/*/bin/psql' >/dev/null || echo postgresql-client
  if ! { have mariadbd || [ -x /usr/sbin/mariadbd ]; } || ! have mariadb-install-db; then
    echo mariadb-server
  fi
  have mariadb || echo mariadb-client
  have pkg-config || echo pkg-config
  have setpriv || echo util-linux
  have openssl || echo openssl
  have git || echo git
  # sshd and ssh-keygen: the controller's SSH push is tested against an sshd
  # the test starts on loopback (never the system service).
  [ -x /usr/sbin/sshd ] || echo openssh-server
  have ssh-keygen || echo openssh-client
  have cc || echo gcc
  dpkg -s libssl-dev >/dev/null 2>&1 || echo libssl-dev
  return 0
}

# Go builds the control plane; Debian's golang-go is too old for it, so a
# missing Go is reported, not installed.
have go || fail "go is not installed; the control plane is built from Go modules (Go 1.24 or newer)"

mapfile -t missing < <(missing_packages)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
sudo=()
if [ "$(id -u)" != 0 ]; then
  have sudo || fail "need root (or sudo) to install ${missing[*]}"
  sudo=(sudo)
fi

# Package scripts must not start system-wide database services: the tests
# start their own servers. A policy-rc.d that exits 101 tells invoke-rc.d to
# leave them alone; whatever policy the machine had is put back afterwards.
policy=/usr/sbin/policy-rc.d
backup=""
if [ -e "$policy" ]; then
  backup=$(mktemp)
  "${sudo[@]}" cp -p "$policy" "$backup"
fi
restore_policy() {
  if [ -n "$backup" ]; then
    "${sudo[@]}" cp -p "$backup" "$policy" || echo "install-deps: could not restore $policy from $backup" >&2
    rm -f "$backup"
  else
    "${sudo[@]}" rm -f "$policy" || echo "install-deps: could not remove $policy" >&2
  fi
  return 0
}
# An EXIT trap's status becomes the script's: restore_policy always returns 0,
# and the script's own status (set below) is kept.
trap 'status=$?; restore_policy; exit $status' EXIT
printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
"${sudo[@]}" chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! "${sudo[@]}" apt-get update -qq >"$log" 2>&1; then
  cat "$log" >&2
  fail "apt-get update failed (output above)"
fi
if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  cat "$log" >&2
  fail "apt-get install ${missing[*]} failed (output above)"
fi
rm -f "$log"

# What was installed must now be found; a package that installs under another
# name than expected would otherwise only show as a failing test much later.
mapfile -t still < <(missing_packages)
[ ${#still[@]} -eq 0 ] || fail "still missing after apt-get install: ${still[*]}"
echo "install-deps: installed ${missing[*]}" >&2
