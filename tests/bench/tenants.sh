#!/usr/bin/env bash
# Writes N tenants (default 10,000) twice into DIR: seed.sql for kiln's SQLite
# source and values.yaml for the helm chart. With BUMP=1, every 100th tenant
# gets one more replica: the "1% of the rows changed" step of the benchmarks.
set -euo pipefail
n=${1:-10000}
dir=${2:?usage: tenants.sh N DIR}
mkdir -p "$dir"
awk -v n="$n" -v bump="${BUMP:-0}" -v sql="$dir/seed.sql" -v values="$dir/values.yaml" 'BEGIN {
  split("free pro enterprise", plans, " ")
  print "CREATE TABLE tenants (id INTEGER PRIMARY KEY, slug TEXT, name TEXT, plan TEXT, replicas INTEGER, domain TEXT, active BOOLEAN, features JSON, created_at TEXT);\nBEGIN;" > sql
  print "tenants:" > values
  for (i = 1; i <= n; i++) {
    slug = sprintf("t%05d", i); plan = plans[i % 3 + 1]; replicas = i % 3 + 1
    if (bump && i % 100 == 0) replicas++
    active = (i % 9 == 0) ? 0 : 1; sso = (plan == "enterprise") ? "true" : "false"
    features = sprintf("{\"sso\": %s, \"beta\": %s}", sso, (i % 4 == 0) ? "true" : "false")
    printf "INSERT INTO tenants VALUES (%d, \047%s\047, \047Tenant %d\047, \047%s\047, %d, \047%s.example.com\047, %d, \047%s\047, \0472024-01-01T00:00:00Z\047);\n", i, slug, i, plan, replicas, slug, active, features > sql
    printf "- {slug: %s, name: \"Tenant %d\", plan: %s, replicas: %d, domain: %s.example.com, active: %s, features: \047%s\047}\n", slug, i, plan, replicas, slug, (active ? "true" : "false"), features > values
  }
  print "COMMIT;" > sql
}'
