# Driven by tests/bench/notify.sh: needs KILN_TEST_KUBECONFIG,
# KILN_TEST_KUBECTL and KILN_TEST_POSTGRES_URL, and psql on PATH.
import os, random, subprocess, sys, tempfile, threading, time

kiln = sys.argv[1]
kubectl = os.environ["KILN_TEST_KUBECTL"]
kubeconfig = os.environ["KILN_TEST_KUBECONFIG"]
admin = os.environ["KILN_TEST_POSTGRES_URL"]
N = int(os.environ.get("CHANGES", "50"))
run = f"bench{os.getpid()}"
work = tempfile.mkdtemp()


def psql(url, sql):
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql],
                   check=True, stdout=subprocess.DEVNULL)


psql(admin, f"CREATE DATABASE {run}")
url = admin.rsplit("/", 1)[0] + "/" + run
rows = ", ".join(f"('t{i}', 'v0')" for i in range(N))
psql(url, f"""
CREATE TABLE notified (id text PRIMARY KEY, value text NOT NULL);
CREATE TABLE polled (id text PRIMARY KEY, value text NOT NULL);
INSERT INTO notified VALUES {rows};
INSERT INTO polled VALUES {rows};
CREATE FUNCTION kiln_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$;
CREATE TRIGGER notified_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON notified
  FOR EACH STATEMENT EXECUTE FUNCTION kiln_notify('notified_changed');
""")


def config(table, notify):
    d = os.path.join(work, table)
    os.makedirs(d)
    extra = "  notify: {channel: notified_changed}\n" if notify else ""
    with open(os.path.join(d, "kiln.yaml"), "w") as f:
        f.write(f"""apiVersion: kiln.dev/v1alpha1
kind: Source
metadata: {{name: rows}}
spec:
  url: "{url}"
  query: SELECT id, value FROM {table}
  key: id
  interval: 30s
{extra}---
apiVersion: kiln.dev/v1alpha1
kind: Blueprint
metadata: {{name: bench}}
spec:
  source: rows
  namespace: {run}-{table}
  resources:
  - id: value
    template: |
      apiVersion: v1
      kind: ConfigMap
      metadata: {{name: "{{{{ key }}}}"}}
      data: {{value: "{{{{ row.value }}}}"}}
""")
    return d


seen = {}  # (namespace, name, value) -> first time seen
lock = threading.Lock()


def watch(ns):
    p = subprocess.Popen([kubectl, "--kubeconfig", kubeconfig, "get", "configmaps", "-n", ns,
                          "--watch", "-o", "jsonpath={.metadata.name} {.data.value}{\"\\n\"}"],
                         stdout=subprocess.PIPE, text=True, bufsize=1)
    for line in p.stdout:
        t = time.time()
        parts = line.split()
        if len(parts) == 2:
            with lock:
                seen.setdefault((ns, parts[0], parts[1]), t)
    return p


syncs = []
for table, notify in (("notified", True), ("polled", False)):
    ns = f"{run}-{table}"
    subprocess.run([kubectl, "--kubeconfig", kubeconfig, "create", "namespace", ns],
                   check=True, stdout=subprocess.DEVNULL)
    d = config(table, notify)
    syncs.append(subprocess.Popen([kiln, "sync", "-f", d, "--kubeconfig", kubeconfig,
                                   "--inventory", f"{run}-{table}"],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, table + ".log"), "w")))
    threading.Thread(target=watch, args=(ns,), daemon=True).start()


def wait_for(keys, deadline):
    while time.time() < deadline:
        with lock:
            if all(k in seen for k in keys):
                return True
        time.sleep(0.01)
    return False


first = [(f"{run}-{t}", f"t{i}", "v0") for t in ("notified", "polled") for i in range(N)]
assert wait_for(first, time.time() + 120), "the first pass did not finish"
time.sleep(2)
changed = {}
random.seed(7)
for i in range(N):
    t0 = time.time()
    psql(url, f"UPDATE notified SET value = 'v1' WHERE id = 't{i}'; UPDATE polled SET value = 'v1' WHERE id = 't{i}';")
    changed[i] = t0
    time.sleep(random.uniform(0.5, 1.5))
keys = [(f"{run}-{t}", f"t{i}", "v1") for t in ("notified", "polled") for i in range(N)]
wait_for(keys, time.time() + 40)
for p in syncs:
    p.terminate()
    p.wait()


def stats(table):
    lat = sorted(seen.get((f"{run}-{table}", f"t{i}", "v1"), float("inf")) - changed[i] for i in range(N))
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return pick(0.5), pick(0.99), lat[-1]


print(f"{N} changes, row change -> ConfigMap updated (seconds):")
print("                         p50     p99     max")
for table, label in (("notified", "notify (LISTEN)"), ("polled", "polled every 30s")):
    p50, p99, mx = stats(table)
    print(f"  {label:20} {p50:7.3f} {p99:7.3f} {mx:7.3f}")
for table in ("notified", "polled"):
    subprocess.run([kubectl, "--kubeconfig", kubeconfig, "delete", "namespace", f"{run}-{table}", "--wait=false"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
