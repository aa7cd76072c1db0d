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
        return out.float()


def _rand(w, g): return torch.rand(w.shape, generator=g, device=w.device)
def _keep_small(x): return 1 / (1 + x)  # decreasing in x, non-negative and bounded


random = Criteria(_rand, seeded=True, name='random')
large_final = Criteria(torch.abs, name='large_final')
small_final = Criteria(lambda w: _keep_small(w.abs()), name='small_final')
squared_final = Criteria(torch.square, name='squared_final')
large_init = Criteria(lambda w, w0: w0.abs(), reference='init', name='large_init')
small_init = Criteria(lambda w, w0: _keep_small(w0.abs()), reference='init', name='small_init')
large_init_large_final = Criteria(lambda w, w0: torch.minimum(w.abs(), w0.abs()), reference='init',
                                  name='large_init_large_final')
small_init_small_final = Criteria(lambda w, w0: _keep_small(torch.maximum(w.abs(), w0.abs())), reference='init',
                                  name='small_init_small_final')
# softplus keeps the order of |w| - |w0| while making the score non-negative
magnitude_increase = Criteria(lambda w, w0: F.softplus(w.abs() - w0.abs()), reference='init', name='magnitude_increase')
movement = Criteria(lambda w, w0: (w - w0).abs(), reference='init', name='movement')
updating_magnitude_increase = Criteria(magnitude_increase.f, reference='previous', name='updating_magnitude_increase')
updating_movement = Criteria(movement.f, reference='previous', name='updating_movement')
updating_movmag = Criteria(lambda w, w0: (w * (w - w0)).abs(), reference='previous', name='updating_movmag')
taylor = Criteria(lambda w, g: (w * g).abs(), needs_grad=True, name='taylor')

CRITERIA = {c.name: c for c in [random, large_final, small_final, squared_final, large_init, small_init,
                                large_init_large_final, small_init_small_final, magnitude_increase, movement,
                                updating_magnitude_increase, updating_movement, updating_movmag, taylor]}
