import sys, time, torch
from moe_route import topk_gate, GateStats
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
x = torch.randn(8192, 64)
st = GateStats.zeros(1, 64)
def t(fn, n=30):
    t0 = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t0) / n * 1e6
g, s = [], []
for r in range(15):
    g.append(t(lambda: topk_gate(x, 8))); s.append(t(lambda: topk_gate(x, 8, stats=st)))
g.sort(); s.sort()
print(f"threads {sys.argv[1]}: gate min {g[0]:.0f} med {g[7]:.0f}  +stats min {s[0]:.0f} med {s[7]:.0f}  ratio(min) {s[0]/g[0]:.2f} ratio(med) {s[7]/g[7]:.2f}")
