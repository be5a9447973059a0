#!/usr/bin/env bash
# Builds promtool from the module pinned in go.mod/go.sum into a cache keyed
# by those files, and prints the binary's path. A warm cache builds nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
cache=${KILN_ENVTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/envtest}
bin="$cache/promtool-$key/promtool"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "promtool: go is not installed" >&2; exit 2; }
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" GOSUMDB=off
  echo "promtool: building" >&2
  mkdir -p "$(dirname "$bin")"
  (cd "$here" && go build -trimpath -ldflags='-s -w' -o "$bin.partial" github.com/prometheus/prometheus/cmd/promtool) ||
    { echo "promtool: building from github.com/prometheus/prometheus failed (go $(go env GOVERSION), GOPROXY=$(go env GOPROXY))" >&2; exit 2; }
  mv "$bin.partial" "$bin"
fi
echo "$bin"
