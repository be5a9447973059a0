#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from the Go
# modules pinned in go.mod/go.sum, into a cache keyed by those two files, and
# prints the directory holding the binaries. A second run with the same
# go.sum reuses the cache and builds nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
cache=${KILN_ENVTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/envtest}
bin="$cache/$key/bin"
tools=(etcd kube-apiserver kube-controller-manager kubectl)

complete=1
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || complete=0; done
if [ "$complete" = 1 ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "envtest: go is not installed" >&2; exit 2; }
# The toolchain on the machine, no other; static binaries; go.mod is never
# rewritten. The committed go.sum pins every module, so the checksum database
# adds nothing and may be out of reach.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" GOSUMDB=off

mkdir -p "$bin.partial"
start=$(date +%s)
cd "$here"
build() { # output-name package
  echo "envtest: building $1" >&2
  go build -trimpath -ldflags='-s -w' -o "$bin.partial/$1" "$2" ||
    { echo "envtest: building $1 from $2 failed (go $(go env GOVERSION), GOPROXY=$(go env GOPROXY))" >&2; exit 2; }
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kubectl k8s.io/kubernetes/cmd/kubectl
rm -rf "$bin"
mv "$bin.partial" "$bin"
echo "envtest: built in $(( $(date +%s) - start ))s: $(cd "$bin" && du -h "${tools[@]}" | awk '{printf "%s %s  ", $2, $1}')" >&2
echo "$bin"
