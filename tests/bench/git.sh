#!/usr/bin/env bash
# The Git benchmark: N tenants (default 10,000) × the demo's 8 resources from
# SQLite, committed by `kiln render --git`, side by side in one run with the
# git CLI doing the same work (files written, `git add -A`, `git commit`) and
# with `git fast-import` of the same tree as the physical reference.
# Steps: the first commit, a commit after 1% of the rows changed, a no-op.
# Prints wall seconds and repository growth; best of RUNS (default 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
N=${N:-10000}
RUNS=${RUNS:-3}
cargo build --release -q
kiln=$PWD/target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@example.com
export GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@example.com

tests/bench/tenants.sh "$N" "$work/before"
BUMP=1 tests/bench/tenants.sh "$N" "$work/after"
config() { # which seed: a config directory whose SQLite database exists
  local dir="$work/config-$1"
  mkdir -p "$dir"
  cp -r fixtures/demo/templates fixtures/demo/blueprint.yaml "$dir/"
  sed -e "s|sqlite://tenants.db|sqlite://$dir/tenants.db|" -e "s|seedFile: seed.sql|seedFile: $work/$1/seed.sql|" \
    fixtures/demo/source.yaml > "$dir/source.yaml"
  "$kiln" validate -f "$dir" --sample 1 >/dev/null
  echo "$dir"
}
before=$(config before)
after=$(config after)

now() { date +%s.%N; }
best() { sort -g | head -1; }
kb() { du -sk "$1/objects" | cut -f1; }
declare -A result

for run in $(seq "$RUNS"); do
  rm -rf "$work/k.git" "$work/g" "$work/f.git"
  git init -q --bare "$work/k.git"
  git init -q -b main "$work/g"
  git -C "$work/g" config gc.auto 0   # no background gc while others are timed
  git init -q --bare "$work/f.git"

  # First commit.
  t=$(now); "$kiln" render -f "$before" --git "$work/k.git" --branch main 2>/dev/null; result[kiln_first]+="$(echo "$(now) - $t" | bc) "
  t=$(now); "$kiln" render -f "$before" --out "$work/g" 2>/dev/null
  (cd "$work/g" && git add -A && git commit -qm first); result[git_first]+="$(echo "$(now) - $t" | bc) "
  # The same commit as a fast-import stream, built untimed.
  git -C "$work/g" fast-export main > "$work/stream"
  t=$(now); git -C "$work/f.git" fast-import --quiet < "$work/stream"; result[fast_first]+="$(echo "$(now) - $t" | bc) "
  k0=$(kb "$work/k.git"); g0=$(kb "$work/g/.git")

  # 1% of the rows changed. Kiln's render alone, in memory, to tell the
  # commit's share of the whole.
  t=$(now); "$kiln" render -f "$after" >/dev/null; result[render_only]+="$(echo "$(now) - $t" | bc) "
  t=$(now); KILN_LOG=kiln=debug "$kiln" render -f "$after" --git "$work/k.git" --branch main 2>"$work/log"; result[kiln_change]+="$(echo "$(now) - $t" | bc) "
  result[kiln_change_commit]+="$(sed -n 's/.*git_ms=\([0-9.]*\).*/\1/p' "$work/log") "
  t=$(now); "$kiln" render -f "$after" --out "$work/g" 2>/dev/null; w=$(echo "$(now) - $t" | bc)
  t=$(now); (cd "$work/g" && git add -A && git commit -qm change); c=$(echo "$(now) - $t" | bc)
  result[git_change]+="$(echo "$w + $c" | bc) "; result[git_change_commit]+="$c "
  k1=$(kb "$work/k.git"); g1=$(kb "$work/g/.git")

  # Nothing changed.
  t=$(now); "$kiln" render -f "$after" --git "$work/k.git" --branch main 2>/dev/null; result[kiln_noop]+="$(echo "$(now) - $t" | bc) "
  t=$(now); "$kiln" render -f "$after" --out "$work/g" 2>/dev/null
  (cd "$work/g" && git add -A && { git diff --cached --quiet || git commit -qm noop; }); result[git_noop]+="$(echo "$(now) - $t" | bc) "
done

commits=$(git -C "$work/k.git" rev-list --count main)
tree_k=$(git -C "$work/k.git" rev-parse 'main^{tree}'); tree_g=$(git -C "$work/g" rev-parse 'main^{tree}')
change=$(git -C "$work/k.git" diff --stat main~1 main | tail -1)
# What the change costs compressed: the new objects of the 1% commit, packed alone.
packed=$(git -C "$work/k.git" rev-list --objects main~1..main | git -C "$work/k.git" pack-objects --stdout -q | wc -c)
pick() { tr ' ' '\n' <<< "${result[$1]}" | grep . | best; }
echo "tenants: $N; objects: $(git -C "$work/k.git" ls-tree -r main | wc -l) files; kiln commits: $commits (a no-op makes none)"
echo "same tree from kiln and the git CLI: $([ "$tree_k" = "$tree_g" ] && echo yes || echo "no ($tree_k vs $tree_g)")"
printf '%-34s %10s %12s %14s\n' "" "kiln" "git CLI" "fast-import"
printf '%-34s %9.3fs %11.3fs %13.3fs\n' "first commit (render included)" "$(pick kiln_first)" "$(pick git_first)" "$(pick fast_first)"
printf '%-34s %9.3fs %11.3fs\n' "1% changed (render included)" "$(pick kiln_change)" "$(pick git_change)"
kiln_commit=$(echo "$(pick kiln_change_commit) / 1000" | bc -l)
printf '%-34s %9.3fs %11.3fs\n' "1% changed, the commit alone" "$kiln_commit" "$(pick git_change_commit)"
printf '%-34s %9.3fs %11.3fs\n' "no-op (render included)" "$(pick kiln_noop)" "$(pick git_noop)"
echo "kiln's render alone (in memory): $(pick render_only)s; the commit alone is the time kiln spends in Git after rendering, git add+commit after the files are written"
awk -v k="$(pick kiln_first)" -v f="$(pick fast_first)" -v kc="$kiln_commit" -v gc="$(pick git_change_commit)" 'BEGIN {
  printf "first commit, kiln / fast-import: %.2fx\n1%% commit alone, git add+commit / kiln: %.1fx\n", k / f, gc / kc }'
awk -v k="$(pick kiln_change)" -v g="$(pick git_change)" 'BEGIN {
  printf "1%% change, render included, git CLI path / kiln: %.1fx\n", g / k }'
echo "1% change: $change"
echo "repository growth for the 1% commit: kiln $((k1 - k0)) KB on disk, git CLI $((g1 - g0)) KB; the same objects packed: $((packed / 1024)) KB"
