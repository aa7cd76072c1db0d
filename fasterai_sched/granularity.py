"""Which weights one score covers: a registry of granularities for each layer type."""
from __future__ import annotations
import re
import torch, torch.nn as nn

__all__ = ['Granularity', 'NMGranularity', 'GRANULARITIES', 'register_granularity', 'get_granularity', 'granularity_names']


class Granularity:
    "A unit is the set of weights sharing every index outside `dims`; `dims=()` makes every weight a unit."
    def __init__(self, name: str, dims: tuple[int, ...]):
        self.name, self.dims = name, tuple(dims)

    def __repr__(self): return f"{type(self).__name__}({self.name!r}, dims={self.dims})"

    def check(self, weight: torch.Tensor, layer_name: str) -> None:
        "Raise if this granularity cannot cut `weight` into units."
        if any(d >= weight.dim() for d in self.dims):
            raise ValueError(f"granularity={self.name!r} reduces dims {self.dims}, but layer {layer_name!r} "
                             f"has a weight of shape {tuple(weight.shape)}")

    def unit_shape(self, weight_shape: torch.Size) -> tuple[int, ...]:
        "Shape of the unit tensor: `weight_shape` with the reduced dims set to 1 (broadcasts over the weight)."
        return tuple(1 if d in self.dims else s for d, s in enumerate(weight_shape))

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        "One score per unit, shaped `unit_shape`: the sum of the unit's element scores."
        return scores.sum(self.dims, keepdim=True) if self.dims else scores

    def weight_mask(self, unit_mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        "The mask to store for a weight with element `scores`: kept at unit shape, it broadcasts over the weight."
        return unit_mask


class NMGranularity(Granularity):
    "N:M: in every group of M consecutive weights along the input dimension, N are kept; a unit is one group."
    def __init__(self, n: int, m: int, in_dim: int = 1):
        super().__init__(f"{n}:{m}", ())
        self.n, self.m, self.in_dim = n, m, in_dim

    def check(self, weight: torch.Tensor, layer_name: str) -> None:
        if weight.dim() <= self.in_dim or weight.shape[self.in_dim] % self.m:
            raise ValueError(f"granularity={self.name!r} needs the input dimension of layer {layer_name!r} "
                             f"(shape {tuple(weight.shape)}, dim {self.in_dim}) to be a multiple of {self.m}")

    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        "View `t` as (..., M): the last dim walks one group of M inputs."
        t = t.movedim(self.in_dim, -1)
        return t.reshape(*t.shape[:-1], t.shape[-1] // self.m, self.m)

    def _ungroup(self, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        moved = list(shape); moved.append(moved.pop(self.in_dim))
        return g.reshape(moved).movedim(-1, self.in_dim)

    def unit_shape(self, weight_shape: torch.Size) -> tuple[int, ...]:
        return tuple(self._groups(torch.empty(weight_shape, device='meta')).shape[:-1])

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        "A group's score is what applying the pattern would remove: the sum of its M-N lowest scores."
        return self._groups(scores).topk(self.m - self.n, dim=-1, largest=False).values.sum(-1)

    def weight_mask(self, unit_mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        "Full mask: groups whose unit is pruned keep only their N best weights."
        g = self._groups(scores)
        keep_n = torch.zeros_like(g, dtype=torch.bool)
        keep_n.scatter_(-1, g.argsort(dim=-1, descending=True, stable=True)[..., :self.n], True)  # ties: lower index kept
        return self._ungroup(unit_mask.unsqueeze(-1) | keep_n, scores.shape).contiguous()


def _conv_dims(n_spatial: int, out_dim: int) -> dict[str, tuple[int, ...]]:
    "Granularities of a conv whose weight is (out, in, *k) when out_dim=0, or (in, out, *k) for transposed convs."
    in_dim, k = 1 - out_dim, tuple(range(2, 2 + n_spatial))
    return {'weight': (), 'kernel': k, 'filter': (in_dim,) + k, 'channel': (out_dim,) + k}


GRANULARITIES: dict[type, dict[str, tuple[int, ...]]] = {
    nn.Linear: {'weight': (), 'kernel': (), 'filter': (1,), 'channel': (0,), 'row': (1,), 'column': (0,)},
    nn.Conv1d: _conv_dims(1, 0), nn.Conv2d: _conv_dims(2, 0), nn.Conv3d: _conv_dims(3, 0),
    nn.ConvTranspose1d: _conv_dims(1, 1), nn.ConvTranspose2d: _conv_dims(2, 1), nn.ConvTranspose3d: _conv_dims(3, 1),
}
_IN_DIM = {nn.ConvTranspose1d: 0, nn.ConvTranspose2d: 0, nn.ConvTranspose3d: 0}
_NM = re.compile(r"^(\d+):(\d+)$")


def register_granularity(layer_type: type, name: str, dims: tuple[int, ...]) -> None:
    "Teach the registry a granularity for `layer_type` (a new layer type included): one score sums over `dims`."
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(name, str) or _NM.match(name):
        raise ValueError(f"name must be a string that is not an 'N:M' pattern, got {name!r}")
    GRANULARITIES.setdefault(layer_type, {})[name] = tuple(int(d) for d in dims)


def _registered(layer_type: type) -> dict[str, tuple[int, ...]] | None:
    for t in layer_type.__mro__:
        if t in GRANULARITIES: return GRANULARITIES[t]
    return None


def granularity_names(layer_type: type) -> list[str]:
    "The granularity names `layer_type` accepts (besides 'N:M' patterns)."
    return list(_registered(layer_type) or {})


def get_granularity(name: str | Granularity, layer_type: type) -> Granularity:
    "The `Granularity` called `name` for `layer_type`; raises listing the valid names."
    if isinstance(name, Granularity): return name
    table = _registered(layer_type)
    if table is None:
        raise ValueError(f"layer_type={layer_type.__name__} has no registered granularity; register one with "
                         f"register_granularity or use one of {[t.__name__ for t in GRANULARITIES]}")
    if not isinstance(name, str):
        raise TypeError(f"granularity must be a string, got {name!r}")
    nm = _NM.match(name)
    if nm:
        n, m = int(nm[1]), int(nm[2])
        if not 0 < n < m: raise ValueError(f"granularity={name!r}: an 'N:M' pattern needs 0 < N < M")
        return NMGranularity(n, m, _IN_DIM.get(layer_type, 1))
    if name not in table:
        raise ValueError(f"granularity={name!r} is not known for {layer_type.__name__}; "
                         f"valid: {sorted(table)} or an 'N:M' pattern such as '2:4'")
    return Granularity(name, table[name])
