"""Criteria: one score per weight (higher is kept); a granularity sums them into one score per unit."""
from __future__ import annotations
from typing import Callable
import torch
import torch.nn.functional as F

__all__ = ['Criteria', 'random', 'large_final', 'small_final', 'squared_final', 'large_init', 'small_init',
           'large_init_large_final', 'small_init_small_final', 'magnitude_increase', 'movement',
           'updating_magnitude_increase', 'updating_movement', 'updating_movmag', 'taylor', 'CRITERIA']


class Criteria:
    """Scores a weight: `f(weight)`, or `f(weight, reference)` when it compares with a reference copy.

    `reference` is 'init' (the weights when pruning was set up) or 'previous' (the weights at the last mask
    update); `needs_grad` passes the weight's gradient instead. Scores must be finite; higher is kept."""
    def __init__(self, f: Callable, reference: str | None = None, needs_grad: bool = False, seeded: bool = False,
                 name: str | None = None):
        if not callable(f): raise TypeError(f"f must be callable, got {f!r}")
        if reference not in (None, 'init', 'previous'):
            raise ValueError(f"reference={reference!r} is not allowed; use None, 'init' or 'previous'")
        self.f, self.reference, self.needs_grad, self.seeded = f, reference, needs_grad, seeded
        self.name = name or getattr(f, '__name__', 'criteria')

    def __repr__(self): return f"Criteria({self.name})"

    def __call__(self, weight: torch.Tensor, reference: torch.Tensor | None = None, grad: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        "Float32 scores shaped like `weight`."
        w = weight.detach().float()
        if self.seeded: out = self.f(w, generator)
        elif self.needs_grad:
            if grad is None: raise RuntimeError(f"criteria {self.name} needs gradients; prune after a backward pass")
            out = self.f(w, grad.detach().float())
        elif self.reference: out = self.f(w, reference.detach().float())
        else: out = self.f(w)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"criteria {self.name} returned {type(out).__name__}; it must return a tensor of scores "
                            f"shaped like the weight")
        return out.float()


def _rand(w, g): return torch.rand(w.shape, generator=g, device=w.device)
def _keep_small(x): return 1 / (1 + x)  # decreasing in x, non-negative and bounded
# module-level functions, not lambdas, so that the named criteria pickle (learn.export, torch.save) with plain pickle
def _small_final(w): return _keep_small(w.abs())
def _large_init(w, w0): return w0.abs()
def _small_init(w, w0): return _keep_small(w0.abs())
def _large_init_large_final(w, w0): return torch.minimum(w.abs(), w0.abs())
def _small_init_small_final(w, w0): return _keep_small(torch.maximum(w.abs(), w0.abs()))
def _magnitude_increase(w, w0): return F.softplus(w.abs() - w0.abs())  # the order of |w| - |w0|, non-negative
def _movement(w, w0): return (w - w0).abs()
def _movmag(w, w0): return (w * (w - w0)).abs()
def _taylor(w, g): return (w * g).abs()


random = Criteria(_rand, seeded=True, name='random')
large_final = Criteria(torch.abs, name='large_final')
small_final = Criteria(_small_final, name='small_final')
squared_final = Criteria(torch.square, name='squared_final')
large_init = Criteria(_large_init, reference='init', name='large_init')
small_init = Criteria(_small_init, reference='init', name='small_init')
large_init_large_final = Criteria(_large_init_large_final, reference='init', name='large_init_large_final')
small_init_small_final = Criteria(_small_init_small_final, reference='init', name='small_init_small_final')
magnitude_increase = Criteria(_magnitude_increase, reference='init', name='magnitude_increase')
movement = Criteria(_movement, reference='init', name='movement')
updating_magnitude_increase = Criteria(_magnitude_increase, reference='previous', name='updating_magnitude_increase')
updating_movement = Criteria(_movement, reference='previous', name='updating_movement')
updating_movmag = Criteria(_movmag, reference='previous', name='updating_movmag')
taylor = Criteria(_taylor, needs_grad=True, name='taylor')

CRITERIA = {c.name: c for c in [random, large_final, small_final, squared_final, large_init, small_init,
                                large_init_large_final, small_init_small_final, magnitude_increase, movement,
                                updating_magnitude_increase, updating_movement, updating_movmag, taylor]}
