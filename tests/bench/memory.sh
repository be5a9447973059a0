#!/usr/bin/env bash
# Memory per managed object: peak RSS of a cold `kiln apply`, a no-op
# `kiln apply`, a `kiln sync --once` pass (read the rows, render, list the
# live objects, compare; nothing to write) and the same pass through a Git
# repository (its first commit, then a pass with nothing to commit) for 10,
# 1,000 and 10,000 instances
# × 10 objects (tests/bench/fleet.sh: 100, 10,000 and 100,000 objects), all on
# one test API server, and each figure's cost per object above the same
# command for 100 objects. Side by side, `kubectl apply --server-side` of the
# 10,000 objects, cold and again.
#   tests/bench/memory.sh                 (stops a running `tests/env up` environment)
#   SIZES="10 1000" tests/bench/memory.sh (leaves out the 100,000: its cold apply
#                                          took 6 to 14 minutes here)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SIZES=${SIZES:-10 1000 10000}
cargo build --release -q
kiln=$PWD/target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"; tests/env down >/dev/null 2>&1 || true' EXIT
tests/env down >/dev/null 2>&1 || true
eval "$(tests/env up 2>/dev/null)"
kubectl=$KILN_TEST_KUBECTL
export KUBECONFIG=$KILN_TEST_KUBECONFIG

rss() { # command...: its peak RSS in KB
  /usr/bin/time -f %M -o "$work/rss" "$@" >"$work/out.log" 2>"$work/err.log" || { tail -5 "$work/err.log" >&2; exit 2; }
  cat "$work/rss"
}
per_object() { # KB, KB for 100 objects, objects: bytes per object above the 100
  awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { if (n <= 100) print "-"; else printf "%.0f B\n", (a - b) * 1024 / (n - 100) }'
}
row() { # label, KB, KB for 100 objects, objects
  printf '  %-22s %7d MB   %9s per object above 100 objects\n' "$1" $(($2 / 1024)) "$(per_object "$2" "$3" "$4")"
}

for n in $SIZES; do
  objects=$((n * 10))
  dir=$work/m$n
  tests/bench/fleet.sh "$dir" "$n" "m$n"
  "$kiln" render -f "$dir/kiln.yaml" --out "$dir/out" 2>/dev/null
  cold=$(rss "$kiln" apply --dir "$dir/out" --inventory "m$n")
  noop=$(rss "$kiln" apply --dir "$dir/out" --inventory "m$n")
  pass=$(cd "$dir" && rss "$kiln" sync --once -f kiln.yaml --inventory "m$n")
  git init -q --bare "$dir/repo.git"
  git=(--git repo.git --branch main)
  commit=$(cd "$dir" && rss "$kiln" sync --once -f kiln.yaml --inventory "m$n" "${git[@]}")
  again=$(cd "$dir" && rss "$kiln" sync --once -f kiln.yaml --inventory "m$n" "${git[@]}")
  if [ "$objects" -le 100 ]; then
    base_cold=$cold; base_noop=$noop; base_pass=$pass; base_commit=$commit; base_again=$again
  fi
  echo "$objects objects:"
  row "kiln apply (cold)" "$cold" "${base_cold:?the first size must be 10}" "$objects"
  row "kiln apply (no-op)" "$noop" "$base_noop" "$objects"
  row "kiln sync --once" "$pass" "$base_pass" "$objects"
  row "  --git, first commit" "$commit" "$base_commit" "$objects"
  row "  --git, nothing new" "$again" "$base_again" "$objects"
done

# The peer: kubectl holds every object it applies.
dir=$work/k
tests/bench/fleet.sh "$dir" 1000 k
"$kiln" render -f "$dir/kiln.yaml" > "$dir/all.yaml" 2>/dev/null
cold=$(rss "$kubectl" apply --server-side -f "$dir/all.yaml")
again=$(rss "$kubectl" apply --server-side -f "$dir/all.yaml")
echo "10000 objects, kubectl apply --server-side:"
printf '  %-22s %7d MB\n' "cold" $((cold / 1024)) "again (nothing changes)" $((again / 1024))
