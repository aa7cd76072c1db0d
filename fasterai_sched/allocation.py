"""Per-layer targets for a global budget: uniform, uniform with a dense first layer, Erdős–Rényi-Kernel (ERK).

Each allocation returns `{layer name: percent}` for `SparsifyCallback(sparsity=..., context='local')` or
`Sparsifier.prune`. The per-layer counts it asks for add up exactly to the count the budget asks of all layers
together, `floor(budget/100 * N)` of the `N` weights (units), as global context would prune; LAMP, the other
non-uniform choice, is a criteria for global context (`criteria.lamp`)."""
from __future__ import annotations
import math
from fractions import Fraction
import torch, torch.nn as nn
from .granularity import get_granularity
from .criteria import Criteria
from .sparsifier import Sparsifier, check_sparsity, n_to_prune, unwrap_model

__all__ = ['ALLOCATIONS', 'allocate', 'uniform', 'uniform_dense_first', 'erk', 'layer_shapes', 'lamp']


def layer_shapes(model: nn.Module, layer_type: type = nn.Conv2d) -> dict[str, tuple[int, ...]]:
    "The weight shape of each `layer_type` layer of `model`, in definition order (the layers a `Sparsifier` prunes)."
    Sparsifier.check_args(layer_type=layer_type)
    model = unwrap_model(model)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, layer_type) and isinstance(getattr(m, 'weight', None), torch.Tensor)}
    if not shapes: raise ValueError(f"layer_type={layer_type.__name__}: the model has no such layer with a weight")
    return shapes


def _percent_for(k: int, n: int) -> float:
    "The float percent nearest 100k/n whose `n_to_prune` is exactly k (a float below 100k/n would floor to k-1)."
    s = float(Fraction(100 * k, n))
    while n_to_prune(s, n) < k: s = math.nextafter(s, math.inf)
    while n_to_prune(s, n) > k: s = math.nextafter(s, -math.inf)
    return s


def _share(total: int, weights: dict[str, float], caps: dict[str, int]) -> dict[str, int]:
    """Split `total` units over layers in proportion to `weights`, none above its cap, the sum exactly `total`
    (largest remainders first, ties to the earlier layer). A layer that would pass its cap is set at it."""
    out, free = {}, dict(weights)
    while True:
        left = total - sum(out.values())
        wsum = sum(free.values())
        ideal = {n: Fraction(left) * Fraction(w) / Fraction(wsum) if wsum else Fraction(0) for n, w in free.items()}
        over = [n for n in free if ideal[n] > caps[n]]
        if not over: break
        for n in over: out[n] = caps[n]; del free[n]
    counts = {n: math.floor(v) for n, v in ideal.items()}
    rest = left - sum(counts.values())
    order = sorted(free, key=lambda n: (-(ideal[n] - counts[n]), list(free).index(n)))
    for n in order:
        if rest <= 0: break
        if counts[n] < caps[n]: counts[n] += 1; rest -= 1
    out.update(counts)
    return {n: out[n] for n in weights}


def _targets(shapes: dict, n_units: dict[str, int], pruned: dict[str, int]) -> dict[str, float]:
    return {n: _percent_for(pruned[n], n_units[n]) for n in shapes}


def _budget(shapes: dict, sparsity: float, n_units: dict[str, int] | None) -> tuple[dict[str, int], int]:
    if not isinstance(shapes, dict) or not shapes:
        raise ValueError(f"shapes={shapes!r} must be a non-empty dict of layer name -> weight shape")
    sparsity = check_sparsity(sparsity)
    n_units = n_units or {n: math.prod(s) for n, s in shapes.items()}
    return n_units, n_to_prune(sparsity, sum(n_units.values()))


def uniform(shapes: dict[str, tuple[int, ...]], sparsity: float, n_units: dict[str, int] | None = None) -> dict[str, float]:
    "Every layer at `sparsity`, give or take one unit so that the counts add up to the budget's exactly."
    n_units, total = _budget(shapes, sparsity, n_units)
    return _targets(shapes, n_units, _share(total, {n: float(u) for n, u in n_units.items()}, n_units))


def uniform_dense_first(shapes: dict[str, tuple[int, ...]], sparsity: float,
                        n_units: dict[str, int] | None = None) -> dict[str, float]:
    "The first layer dense, the others share the whole budget uniformly (raises when they cannot hold it)."
    n_units, total = _budget(shapes, sparsity, n_units)
    first, rest = next(iter(shapes)), {n: u for n, u in n_units.items() if n != next(iter(shapes))}
    if total > sum(rest.values()):
        raise ValueError(f"sparsity={sparsity!r} cannot be met with the first layer {first!r} dense: the other layers "
                         f"hold {sum(rest.values())} of {sum(n_units.values())} units, fewer than the {total} to prune")
    counts = _share(total, {n: float(u) for n, u in rest.items()}, rest)
    return _targets(shapes, n_units, {first: 0, **counts})


def erk(shapes: dict[str, tuple[int, ...]], sparsity: float, n_units: dict[str, int] | None = None,
        power: float = 1.) -> dict[str, float]:
    """Erdős–Rényi-Kernel (Evci et al. 2020): a layer's density is proportional to (sum of its weight's dims) /
    (their product), raised to `power`; layers that would be denser than dense stay dense, the rest share the budget."""
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        raise ValueError(f"power={power!r} must be a positive number (1 is ERK)")
    n_units, total = _budget(shapes, sparsity, n_units)
    kept_total = sum(n_units.values()) - total
    # kept units in proportion to n * density_scale; pruned = n - kept
    scale = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    kept = _share(kept_total, {n: n_units[n] * scale[n] for n in shapes}, n_units)
    return _targets(shapes, n_units, {n: n_units[n] - kept[n] for n in shapes})


ALLOCATIONS = {'uniform': uniform, 'dense_first': uniform_dense_first, 'erk': erk}


def allocate(model: nn.Module, sparsity: float, allocation: str = 'erk', layer_type: type = nn.Conv2d,
             granularity: str = 'weight') -> dict[str, float]:
    """Per-layer targets of `model`'s `layer_type` layers for the global budget `sparsity`, by `allocation`
    ('uniform', 'dense_first' or 'erk'): pass them as `SparsifyCallback(sparsity=..., context='local')`."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not known; valid: {list(ALLOCATIONS)} "
                         f"(LAMP is criteria=lamp with context='global')")
    shapes = layer_shapes(model, layer_type)
    g = {n: get_granularity(granularity, layer_type) for n in shapes}
    n_units = {n: math.prod(g[n].unit_shape(torch.Size(s))) for n, s in shapes.items()}
    return ALLOCATIONS[allocation](shapes, sparsity, n_units)


def _lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al. 2021): a weight's square over the sum of the squares of the layer's weights that are not
    smaller, so that the layer's largest weight scores 1 in every layer; equal weights rank by index.
    One sort of the layer per call: the cost of LAMP over magnitude at each mask recompute."""
    ranked, order = w.flatten().float().square().sort(stable=True)
    tail = ranked.double().flip(0).cumsum(0).flip(0)  # sum over this weight and every one ranked after it
    scores = torch.empty_like(ranked)
    scores[order] = (ranked / tail.clamp_min(torch.finfo(tail.dtype).tiny)).float()  # 0 where the tail is all zero
    return scores.view_as(w)


lamp = Criteria(_lamp_scores, name='lamp')
