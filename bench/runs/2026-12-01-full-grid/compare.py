"""The table of bench/RESULTS.md's 2026-12-01 whole-grid section from the runs here: each
figure is the lower of two runs' medians. Usage: python compare.py > table.md"""
import glob, json, os, statistics
HERE = os.path.dirname(os.path.abspath(__file__))
def load(tag):
    runs = []
    for f in sorted(glob.glob(os.path.join(HERE, f"{tag}_r*.json"))):
        d = json.load(open(f))
        runs.append(d["rows"] if isinstance(d, dict) else d)
    out = {}
    for rows in runs:
        for r in rows:
            o = out.setdefault(r["case"], {})
            for key in ("baseline", "gate", "baseline_stats", "gate_stats", "baseline_steer", "gate_steer"):
                if key in r:
                    o.setdefault(key, []).append(r[key]["median_us"])
    return {c: {k: min(v) for k, v in o.items()} for c, o in out.items()}
old, new = load("d0bedee"), load("6aeed5d")
def fmt(us):
    return f"{us/1000:.2f} ms" if us >= 10000 else (f"{us:.0f} µs" if us >= 100 else f"{us:.1f} µs" if us >= 10 else f"{us:.2f} µs")
print("| case | PyTorch | gate | ratio | gate at d0bedee | d0bedee / now | gate + stats | stats / gate | steered: PyTorch / gate |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
sp = []
for c, n in new.items():
    o = old.get(c)
    b = min(n["baseline"], o["baseline"]) if o else n["baseline"]
    r = f"| {c} | {fmt(n['baseline'])} | {fmt(n['gate'])} | {n['baseline']/n['gate']:.2f}× | "
    if o:
        r += f"{fmt(o['gate'])} | {o['gate']/n['gate']:.2f}× | "
        sp.append((c, o['gate']/n['gate']))
    else:
        r += "– | – | "
    r += f"{fmt(n['gate_stats'])} | {n['gate_stats']/n['gate']:.2f}× | {n['baseline_steer']/n['gate_steer']:.1f}× |"
    print(r)
import sys
v = sorted(x for _, x in sp)
print("d0/now: min %.2f median %.2f max %.2f n=%d" % (v[0], statistics.median(v), v[-1], len(v)), file=sys.stderr)
for c, x in sorted(sp, key=lambda t: t[1])[:8]: print("  low", c, round(x, 2), file=sys.stderr)
for c, x in sorted(sp, key=lambda t: t[1])[-8:]: print("  high", c, round(x, 2), file=sys.stderr)
