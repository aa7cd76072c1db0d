"""Re-masking alone on CUDA, timed with CUDA events: `Sparsifier.apply()` over a model pruned to 90%, against one
plain dense training step (forward, backward, Adam) of the same model. Usage: python scripts/gpu_apply_cost.py ARCH SIZE"""
import sys, statistics, torch, torch.nn.functional as F
from fasterai_sched import Sparsifier
from fasterai_sched.bench import build_model

arch, size, bs = sys.argv[1], int(sys.argv[2]), 64
model = build_model(arch, 10).cuda()
opt = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.randn(bs, 3, size, size, device='cuda'), torch.randint(0, 10, (bs,), device='cuda')


def step():
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()


def timed(f, n):
    "Median over 5 rounds of the mean milliseconds of `n` calls, by CUDA events."
    out = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n): f()
        b.record(); torch.cuda.synchronize(); out.append(a.elapsed_time(b) / n)
    return statistics.median(out)


for _ in range(10): step()
sp = Sparsifier(model, 'weight', 'global'); sp.prune(90)
dense = timed(step, 30)
masked = timed(lambda: (step(), sp.apply()), 30)
alone = timed(sp.apply, 200)
print(f"{arch} {size}px bs{bs} on {torch.cuda.get_device_name()}: dense step {dense:.3f} ms; step + apply {masked:.3f} ms "
      f"({masked / dense:.4f}x); apply alone {alone:.4f} ms ({1 + alone / dense:.4f}x of a dense step); "
      f"{len(sp.masks)} masked tensors, {sum(m.numel() for m in sp.masks.values()):,} mask bytes")
