#!/usr/bin/env bash
# The apply benchmark: N instances (default 1,000) × 10 objects (a Namespace,
# 3 ConfigMaps, 3 Services, 3 Deployments with 0 replicas) applied to the
# test environment's API server, side by side with `kubectl apply
# --server-side` of the same objects. Each cold apply gets a fresh
# environment (an API server holding tens of thousands of objects from the
# run before is slower, which would favour whoever goes first). Measures a
# cold apply, a no-op resync (and counts the writes the API server saw
# during it), and a 1% change for both; then a ceiling: the same tree cold
# at 8 and 64 writes in flight, and what a user would do instead: the same
# objects split over 16 parallel `kubectl apply --server-side`; the best of
# all is what this API server takes on this machine. Counts the API
# requests Kiln sends per object, by verb, cold, no-op and on a 1% change.
#   tests/bench/apply.sh           (stops a running `tests/env up` environment)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
N=${N:-1000}
fresh() { # a new, empty environment
  tests/env down >/dev/null 2>&1 || true
  eval "$(tests/env up 2>/dev/null)"
  kubectl=$KILN_TEST_KUBECTL
  export KUBECONFIG=$KILN_TEST_KUBECONFIG
}
cargo build --release -q
kiln=$PWD/target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"; tests/env down >/dev/null 2>&1 || true' EXIT
run=$(date +%s | tail -c 5)

config() { # prefix: a configuration whose instances live in <prefix>-<key>
  tests/bench/fleet.sh "$work/$1" "$N" "$1"
}

writes() { # writes (dry-runs included) the API server has answered so far
  "$kubectl" get --raw /metrics | awk '/^apiserver_request_total\{/ && /verb="(POST|PUT|PATCH|APPLY|DELETE)"/ && /resource="(namespaces|configmaps|services|deployments)"/ { n += $NF } END { printf "%d\n", n }'
}

requests() { # requests for the tree's kinds (inventory ConfigMaps included) by verb, so far
  "$kubectl" get --raw /metrics | awk '/^apiserver_request_total\{/ && /resource="(namespaces|configmaps|services|deployments)"/ {
    match($0, /verb="[A-Z]*"/); v = substr($0, RSTART + 6, RLENGTH - 7); n[v] += $NF }
    END { for (v in n) printf "%s %d\n", v, n[v] }' | sort
}

per_object() { # label, before, after, objects: the requests between two counts, per verb
  join -a 2 -e 0 -o 0,1.2,2.2 <(echo "$2") <(echo "$3") | awk -v label="$1" -v objects="$4" '
    { d = $3 - $2; if (d > 0) { line = line sprintf(" %s %d", $1, d); total += d } }
    END { printf "  %-28s %6d requests, %.2f per object:%s\n", label, total, total / objects, line }'
}

timed() { # label, command...: wall seconds and peak RSS
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out.log" 2>"$work/err.log" || { tail -5 "$work/err.log" >&2; exit 2; }
  read -r wall kb < "$work/time"
  printf '%-44s %8.2f s %6d MB\n' "$label" "$wall" $((kb / 1024))
  echo "$wall" > "$work/last.wall"
}

k=k$run; c=c$run; x=x$run
config "$k"; config "$c"
"$kiln" render -f "$work/$k/kiln.yaml" --out "$work/$k/out" 2>/dev/null
"$kiln" render -f "$work/$c/kiln.yaml" > "$work/$c/all.yaml"
echo "objects: $(grep -c '^---$' "$work/$c/all.yaml") per tree"

# 1%: config-1 of a tenth of the instances changes: 100 objects of 10,000.
change() { # prefix
  awk -v n="$(( N / 10 ))" 'NR <= n { sub("greeting: hello", "greeting: changed") } { print }' "$work/$1/rows.yaml" > "$work/rows"
  mv "$work/rows" "$work/$1/rows.yaml"
  sed -i 's/data: {greeting: "{{ row.greeting }}", index: "\([23]\)"}/data: {greeting: hello, index: "\1"}/' "$work/$1/kiln.yaml"
}

fresh
r0=$(requests)
timed "kiln apply (cold)" "$kiln" apply --dir "$work/$k/out" --inventory "$k"; kcold=$(cat "$work/last.wall")
r1=$(requests)
before=$(writes)
timed "kiln apply (no-op resync)" "$kiln" apply --dir "$work/$k/out" --inventory "$k"
echo "writes during kiln's no-op resync: $(( $(writes) - before ))"
r2=$(requests)
change "$k"
"$kiln" render -f "$work/$k/kiln.yaml" --out "$work/$k/out" 2>/dev/null
timed "kiln apply (1% changed)" "$kiln" apply --dir "$work/$k/out" --inventory "$k"
grep -o 'applied [0-9]*' "$work/err.log" | sed 's/^/  kiln: /'
r3=$(requests)
objects=$(( N * 10 ))
echo "API requests Kiln sent (apiserver_request_total; the physical limit is one write per object that changes):"
per_object "cold ($objects writes needed)" "$r0" "$r1" "$objects"
per_object "no-op (0 writes needed)" "$r1" "$r2" "$objects"
per_object "1% changed (100 needed)" "$r2" "$r3" "$objects"

fresh
timed "kubectl apply --server-side (cold)" "$kubectl" apply --server-side -f "$work/$c/all.yaml"; ccold=$(cat "$work/last.wall")
timed "kubectl apply --server-side (no-op)" "$kubectl" apply --server-side -f "$work/$c/all.yaml"
change "$c"
"$kiln" render -f "$work/$c/kiln.yaml" > "$work/$c/changed.yaml"
timed "kubectl apply --server-side (1% changed)" "$kubectl" apply --server-side -f "$work/$c/changed.yaml"

# What a user would do instead of Kiln: the Namespaces first, then the rest
# split over 16 kubectl processes at once.
awk -v dir="$work/$c" 'BEGIN { RS = "---\n" } NF {
    if ($0 ~ /\nkind: Namespace\n/ || $0 ~ /^kind: Namespace\n/) f = dir "/ns.yaml"; else f = sprintf("%s/part-%02d.yaml", dir, n++ % 16)
    printf "---\n%s", $0 > f }' "$work/$c/all.yaml"
parallel16() {
  "$kubectl" apply --server-side -f "$work/$c/ns.yaml" >/dev/null
  local pids=()
  for f in "$work/$c"/part-*.yaml; do "$kubectl" apply --server-side -f "$f" >/dev/null & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
}
fresh
export -f parallel16; export kubectl work c KUBECONFIG
timed "16 × kubectl apply --server-side (cold)" bash -c parallel16; pcold=$(cat "$work/last.wall")

# The ceiling: the best cold throughput this API server gives at any
# concurrency, each run on a fresh environment.
best=$kcold
if awk -v a="$pcold" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$pcold; fi
for conc in 8 64; do
  fresh
  timed "kiln apply --concurrency $conc (cold)" "$kiln" apply --dir "$work/$k/out" --inventory "$k" --concurrency "$conc"
  wall=$(cat "$work/last.wall")
  if awk -v a="$wall" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$wall; fi
done
awk -v k="$kcold" -v c="$ccold" -v p="$pcold" -v x="$best" -v n="$N" 'BEGIN {
  printf "cold apply: kubectl / kiln = %.1fx; 16 parallel kubectl / kiln = %.2fx; kiln (--concurrency 16) runs at %.0f%% of the best throughput seen, Kiln or 16 kubectl processes (%.0f objects/s)\n", c / k, p / k, 100 * x / k, 10 * n / x }'
