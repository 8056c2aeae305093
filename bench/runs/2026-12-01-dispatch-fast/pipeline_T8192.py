import sys, time, torch
sys.path.insert(0, sys.argv[1])
from moe_route import dispatch_plan, permute, unpermute
torch.set_num_threads(2)
torch.manual_seed(0)
T, k, H, E = int(sys.argv[2]), 8, 1024, 64
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
x = torch.randn(T, H); w = torch.rand(T, k)
def pipe():
    plan = dispatch_plan(ids, E)
    return unpermute(permute(x, plan), plan, w)
ts = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); pipe(); ts.append(time.perf_counter() - t0)
ts.sort()
print(f"{sys.argv[1]:10s} T={T} min {ts[0]*1e3:.2f} ms  med {ts[len(ts)//2]*1e3:.2f} ms")
