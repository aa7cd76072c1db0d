"""RigL (Evci et al. 2020): sparse from the first step, connectivity that moves by drop-and-grow at a constant count."""
from __future__ import annotations
import math
from numbers import Real
import torch, torch.nn as nn
from fastai.optimizer import OptimWrapper
from .callback import SparsifyCallback
from .criteria import large_final
from .schedules import one_shot
from .selection import lowest_k
from .sparsifier import _from_rank0

__all__ = ['RigLCallback', 'drop_fraction_at']


def drop_fraction_at(step: int, total: int, drop_fraction: float = 0.3) -> float:
    "The share of each layer's kept weights moved at `step` of `total` update-eligible steps: cosine from `drop_fraction` to 0."
    if step >= total: return 0.
    return drop_fraction / 2 * (1 + math.cos(math.pi * step / total))


class RigLCallback(SparsifyCallback):
    """Dynamic sparse training: the layers are pruned to `sparsity` (a percent, or a dict layer name -> percent such as
    `allocate(model, 90, 'erk')`) at the first step by magnitude; then every `delta` steps, until `stop` of the fit's
    steps, each layer drops the `f` lowest-magnitude share of its kept weights and grows as many pruned ones with the
    largest gradient, `f` decaying by cosine from `drop_fraction`. Counts never change; grown weights start at zero
    with fresh optimizer state. The gradient of a pruned weight is the dense gradient: pruned weights are zeros in a
    dense tensor, so every backward pass computes it and an update costs only two selections per layer."""
    def __init__(self, sparsity, delta: int = 100, drop_fraction: float = 0.3, stop: float = 0.75,
                 layer_type: type = nn.Conv2d, model: nn.Module | None = None, verbose: bool = True, seed: int = 0):
        if isinstance(delta, bool) or not isinstance(delta, int) or delta < 1:
            raise ValueError(f"delta={delta!r} must be a positive integer (steps between connectivity updates)")
        for name, v in (('drop_fraction', drop_fraction), ('stop', stop)):
            if isinstance(v, bool) or not isinstance(v, Real) or not 0 < v <= 1:
                raise ValueError(f"{name}={v!r} must be a number in (0, 1]")
        super().__init__(sparsity=sparsity, granularity='weight', context='local', criteria=large_final,
                         schedule=one_shot, start_epoch=0, layer_type=layer_type, model=model, verbose=verbose, seed=seed)
        self.delta, self.drop_fraction, self.stop = delta, float(drop_fraction), float(stop)
        self.updates: list[tuple[int, int]] = []

    def before_fit(self):
        super().before_fit()
        if not self.active: return
        self.updates = []
        total = self.learn.n_epoch * self.n_iter_fit
        self._stop_step = int(self.stop * total)
        if self.delta >= self._stop_step:  # before any step: a RigL that never moves a weight is static pruning
            raise ValueError(f"delta={self.delta} leaves no connectivity update in this fit: updates come every "
                             f"{self.delta} steps before stop={self.stop:g} of its {total} steps (step {self._stop_step}); "
                             "use a smaller delta or a larger stop")

    def before_step(self):
        super().before_step()
        if not (self.active and self.training): return
        step = self._stepped
        if step % self.delta == 0 and step < self._stop_step and self.sparsifier.masks: self.drop_and_grow(step)

    @torch.no_grad()
    def drop_and_grow(self, step: int) -> int:
        "Move connections as RigL does at `step`; returns how many moved (0 when a gradient is missing or not finite)."
        sp = self.sparsifier
        grads = {n: m.weight.grad for n, m in sp.layers.items()}
        if any(g is None for g in grads.values()) or not self._grads_finite(): return 0
        frac, new, moved = drop_fraction_at(step, self._stop_step, self.drop_fraction), {}, 0
        for n, m in sp.layers.items():
            keep = sp.masks[n].expand_as(m.weight).flatten()
            n_keep = int(keep.count_nonzero())
            g = grads[n].detach().flatten()
            # a weight grown with a zero gradient would stay at zero, so the measured count would drift: grow only
            # where the gradient moves the weight (it does for at least as many as were pruned before this update)
            k = min(math.floor(frac * n_keep), int((~keep & (g != 0)).count_nonzero()))
            if k == 0 or n_keep == keep.numel(): new[n] = sp.masks[n]; continue
            inf = torch.tensor(math.inf, device=keep.device)
            dropped = lowest_k(torch.where(keep, m.weight.detach().abs().flatten().float(), inf), k)
            kept = keep & ~dropped
            # largest gradient first; dropped weights compete too (a weight dropped and grown keeps its value)
            grown = lowest_k(torch.where(kept, inf, -g.abs().float()), k)
            new[n] = (kept | grown).view_as(m.weight)
            moved += int((new[n] & ~sp.masks[n]).count_nonzero())
        new, = _from_rank0(new)
        opt = self.learn.opt
        sp._set_masks(new, optimizer=opt.opt if isinstance(opt, OptimWrapper) else opt)
        self.updates.append((step, moved))
        return moved

    def plot(self, ax=None):
        "Target and actual sparsity over the last fit, per training step; returns the axes."
        ax = super().plot(ax)
        ax.set_title(f"RigL, drop-and-grow every {self.delta} steps")
        return ax
