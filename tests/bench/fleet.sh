#!/usr/bin/env bash
# Writes DIR/kiln.yaml and DIR/rows.yaml: N instances (rows t1..tN) × 10
# objects (a Namespace PREFIX-<key>, 3 ConfigMaps, 3 Services, 3
# Deployments with 0 replicas, each depending on its ConfigMap), the fleet
# of the apply and memory benchmarks.
#   tests/bench/fleet.sh DIR N PREFIX
set -euo pipefail
dir=${1:?usage: fleet.sh DIR N PREFIX}
N=${2:?usage: fleet.sh DIR N PREFIX}
prefix=${3:?usage: fleet.sh DIR N PREFIX}
mkdir -p "$dir"
seq 1 "$N" | awk '{ printf "- {id: t%d, greeting: hello}\n", $1 }' > "$dir/rows.yaml"
cat > "$dir/kiln.yaml" <<YAML
apiVersion: kiln.dev/v1alpha1
kind: Source
metadata: {name: rows}
spec: {url: "file:rows.yaml", key: id}
---
apiVersion: kiln.dev/v1alpha1
kind: Blueprint
metadata: {name: bench}
spec:
  source: rows
  namespace: "$prefix-{{ key }}"
  resources:
  - id: namespace
    template: |
      apiVersion: v1
      kind: Namespace
      metadata: {name: "$prefix-{{ key }}"}
YAML
for i in 1 2 3; do cat >> "$dir/kiln.yaml" <<YAML
  - id: config-$i
    dependsOn: [namespace]
    template: |
      apiVersion: v1
      kind: ConfigMap
      metadata: {name: config-$i}
      data: {greeting: "{{ row.greeting }}", index: "$i"}
  - id: service-$i
    dependsOn: [namespace]
    template: |
      apiVersion: v1
      kind: Service
      metadata: {name: web-$i}
      spec: {ports: [{port: 80, targetPort: 8080}], selector: {app: web-$i}}
  - id: app-$i
    dependsOn: [config-$i]
    template: |
      apiVersion: apps/v1
      kind: Deployment
      metadata: {name: web-$i}
      spec:
        replicas: 0
        selector: {matchLabels: {app: web-$i}}
        template:
          metadata: {labels: {app: web-$i}}
          spec: {containers: [{name: web, image: "nginx:1.27"}]}
YAML
done
