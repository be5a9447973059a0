#!/usr/bin/env bash
# The render benchmark: N tenants (default 10,000) × the demo's 8 resources
# from SQLite, rendered by kiln to a directory and to stdout, side by side
# with `helm template` of the same blueprint written as a chart
# (tests/bench/chart) over the same tenants as values, to stdout and to a
# new directory each. Prints wall time and peak RSS of each, best of RUNS
# (default 3), and the ratios. Writing ~80,000 small files is bound by the
# file system, so the directory figures say more about the disk than about
# either tool.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
N=${N:-10000}
RUNS=${RUNS:-3}

helm=$(tests/bench/helm/build.sh)
cargo build --release -q
kiln=target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The same tenants twice: a SQL seed for kiln, values for helm.
tests/bench/tenants.sh "$N" "$work"
mkdir -p "$work/config"
cp -r fixtures/demo/templates fixtures/demo/blueprint.yaml "$work/config/"
sed -e "s|sqlite://tenants.db|sqlite://$work/tenants.db|" -e "s|seedFile: seed.sql|seedFile: $work/seed.sql|" \
  fixtures/demo/source.yaml > "$work/config/source.yaml"
"$kiln" validate -f "$work/config" --sample 1 >/dev/null   # creates the database, untimed

measure() { # id, label, command...: best wall seconds and peak RSS over RUNS
  local id=$1 label=$2; shift 2
  local best="" rss=0
  for _ in $(seq "$RUNS"); do
    [ "$id" = cold ] && rm -rf "$work/out"
    [ "$id" = helmdir ] && rm -rf "$work/helm-out"
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; exit 2; }
    read -r wall kb < "$work/time"
    if [ -z "$best" ] || awk -v a="$wall" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$wall; fi
    [ "$kb" -gt "$rss" ] && rss=$kb
  done
  printf '%-32s %8.2f s %8d MB\n' "$label" "$best" $((rss / 1024))
  echo "$best" > "$work/$id.wall"
}

objects_kiln=$("$kiln" render -f "$work/config" | grep -c '^---$')
objects_helm=$("$helm" template bench tests/bench/chart -f "$work/values.yaml" | grep -c '^---$')
echo "tenants: $N; objects: kiln $objects_kiln, helm $objects_helm"
printf '%-32s %10s %11s\n' "" "wall" "peak RSS"
measure cold "kiln render --out (cold)" "$kiln" render -f "$work/config" --out "$work/out"
measure warm "kiln render --out (unchanged)" "$kiln" render -f "$work/config" --out "$work/out"
measure stdout "kiln render (stdout)" "$kiln" render -f "$work/config"
measure helm "helm template (stdout)" "$helm" template bench tests/bench/chart -f "$work/values.yaml"
measure helmdir "helm template --output-dir" "$helm" template bench tests/bench/chart -f "$work/values.yaml" --output-dir "$work/helm-out"
ratio() { awk -v h="$(cat "$work/$1.wall")" -v k="$(cat "$work/$2.wall")" -v n="$3" 'BEGIN { printf "%s: helm / kiln = %.1fx\n", n, h / k }'; }
ratio helm stdout "to stdout"
ratio helmdir cold "to a new directory"
