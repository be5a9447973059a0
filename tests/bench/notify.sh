#!/usr/bin/env bash
# Row change → object updated in the cluster, for a PostgreSQL source that
# notifies (spec.notify) and for the same source polled at 30s, side by
# side in one run: two `kiln sync` processes against the test
# environment, each with its own table of 50 tenants; each of 50 changes
# updates one tenant in both tables at once. Prints p50, p99 and max.
#   tests/bench/notify.sh     (uses a running `tests/env up`, or starts one)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release -q
started=
if [[ -z ${KILN_TEST_KUBECONFIG:-} || -z ${KILN_TEST_POSTGRES_URL:-} ]]; then
  eval "$(tests/env up 2>/dev/null)"
  started=1
fi
trap '[[ -z $started ]] || tests/env down >/dev/null 2>&1 || true' EXIT
python3 tests/bench/notify.py "$PWD/target/release/kiln"
