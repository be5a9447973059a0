# How long `kiln watch` takes from a template's save to its diff on the
# demo: python3 tests/bench/watch.py target/release/kiln
import os, shutil, subprocess, sys, tempfile, threading, time
binary = sys.argv[1]
work = os.path.join(tempfile.mkdtemp(), "demo")
shutil.copytree(os.path.join(os.path.dirname(__file__), "../../fixtures/demo"), work)
p = subprocess.Popen([binary, "watch", "-f", work], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
lines=[]
def read_err():
    for l in p.stderr: lines.append(("err", time.time(), l))
def read_out():
    for l in p.stdout: lines.append(("out", time.time(), l))
threading.Thread(target=read_err, daemon=True).start()
threading.Thread(target=read_out, daemon=True).start()
while not any("rendered" in l for _,_,l in lines): time.sleep(0.01)
path=os.path.join(work, "templates/config.yaml.j2")
results=[]
for i in range(5):
    text=open(path).read()
    n=len(lines)
    t0=time.time()
    open(path,"w").write(text.replace("TENANT_NAME", f"TENANT_NAME{i}") if i==0 else text.replace(f"TENANT_NAME{i-1}", f"TENANT_NAME{i}"))
    while not any(k=="err" and "files differ" in l for k,_,l in lines[n:]): time.sleep(0.005)
    first_out=[t for k,t,l in lines[n:] if k=="out"][0]
    results.append(first_out-t0)
    time.sleep(0.3)
p.kill()
print("save-to-diff seconds:", " ".join(f"{r:.3f}" for r in results))
