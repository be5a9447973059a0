#!/usr/bin/env bash
# Builds helm from the module pinned in go.mod/go.sum into a cache keyed by
# those files, and prints the binary's path. A warm cache builds nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
cache=${KILN_ENVTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/envtest}
bin="$cache/helm-$key/helm"
if [ ! -x "$bin" ]; then
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" GOSUMDB=off
  echo "bench: building helm" >&2
  (cd "$here" && go build -trimpath -ldflags='-s -w' -o "$bin.partial" helm.sh/helm/v3/cmd/helm)
  mv "$bin.partial" "$bin"
fi
echo "$bin"
