"""Which weights one score covers: a registry of granularities for each layer type."""
from __future__ import annotations
import re
import torch, torch.nn as nn

__all__ = ['Granularity', 'NMGranularity', 'GRANULARITIES', 'Granularities', 'register_granularity', 'get_granularity',
           'granularity_names']


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
    """fasterai's granularities of a conv whose weight is (out, in, *k) when out_dim=0, or (in, out, *k) for transposed
    convs: each name lists the dims one score sums over (a unit is every weight sharing the other indices)."""
    o, i, k = out_dim, 1 - out_dim, tuple(range(2, 2 + n_spatial))
    s = lambda *d: tuple(sorted(d))
    dims = {'weight': (), 'shared_weight': (o,), 'channel': (i,), 'kernel': k, 'filter': s(i, *k),
            'shared_channel': s(o, i), 'shared_kernel': s(o, *k), 'layer': tuple(range(2 + n_spatial))}
    if n_spatial == 1:  # fasterai reads a Conv1d as a Linear: a column spans the outputs, a row the inputs
        dims.update(column=(o,), row=(i,))
    else:  # a column sums down the kernel's height, a row across its width
        h, w = k[-2], k[-1]
        dims.update(column=(h,), row=(w,), shared_column=s(o, h), shared_row=s(o, w), vertical_slice=s(i, h),
                    horizontal_slice=s(i, w), shared_vertical_slice=s(o, i, h), shared_horizontal_slice=s(o, i, w))
    return dims


# nn.Linear's weight is (out, in): fasterai's 'column' sums over the outputs (one unit per input), 'row' over the
# inputs (one unit per output neuron); 'filter' and 'channel' are the conv names of the same roles
GRANULARITIES: dict[type, dict[str, tuple[int, ...]]] = {
    nn.Linear: {'weight': (), 'shared_weight': (0,), 'channel': (1,), 'column': (0,), 'row': (1,), 'kernel': (),
                'filter': (1,), 'layer': (0, 1)},
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
    "The granularities of `layer_type`: those registered for it over those it inherits (None when it has none)."
    tables = [GRANULARITIES[t] for t in reversed(layer_type.__mro__) if t in GRANULARITIES]
    if not tables: return None
    merged = {}
    for t in tables: merged.update(t)
    return merged


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


def _from_fasterai(dims) -> tuple[int, ...]:
    "fasterai's dims count from a leading unit axis (0 is one weight); ours count the weight's own dims."
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"granularity dims={dims!r} must be non-negative integers (fasterai's numbering: 0 is one weight)")
    return tuple(sorted({d - 1 for d in dims if d}))


def _to_fasterai(dims: tuple[int, ...]) -> int | tuple[int, ...]:
    return 0 if not dims else (dims[0] + 1 if len(dims) == 1 else tuple(d + 1 for d in dims))


class Granularities:
    """fasterai's granularity registry, read from and written to this library's: dims are numbered as fasterai numbers
    them, from a leading unit axis (`0` is one weight, `1` the weight's first dim)."""
    @classmethod
    def _table(cls, layer_type: type) -> dict[str, int | tuple[int, ...]]:
        return {name: _to_fasterai(dims) for name, dims in (_registered(layer_type) or {}).items()}

    @classmethod
    def get_dim(cls, m: nn.Module, g: str) -> list[int]:
        "The dims (fasterai's numbering) one score of granularity `g` reduces over for module `m`."
        table = _registered(type(m))
        if table is None: raise ValueError(f"Unsupported module type: {type(m).__name__}; supported: "
                                           f"{[t.__name__ for t in GRANULARITIES]}")
        if g not in table: raise ValueError(f"granularity={g!r} is not known for {type(m).__name__}; valid: {sorted(table)}")
        d = _to_fasterai(table[g])
        return [d] if isinstance(d, int) else list(d)

    @classmethod
    def add_granularity(cls, m_type: type, g: dict) -> None:
        "Register the granularities `g` (name -> dims, fasterai's numbering) for layers of type `m_type`."
        if not isinstance(g, dict): raise TypeError(f"g={g!r} must be a dict of granularity name -> dims")
        converted = {name: _from_fasterai(dims) for name, dims in g.items()}
        for name, dims in converted.items(): register_granularity(m_type, name, dims)

    @classmethod
    def allowed_granularities(cls, m: nn.Module) -> dict[str, int | tuple[int, ...]]:
        "Every granularity module `m` accepts, name -> dims (fasterai's numbering)."
        table = _registered(type(m))
        if table is None: raise ValueError(f"Unsupported module type: {type(m).__name__}; supported: "
                                           f"{[t.__name__ for t in GRANULARITIES]}")
        return {name: _to_fasterai(dims) for name, dims in table.items()}

    @classmethod
    def available_granularities(cls) -> list[type]:
        "The module types that have granularities."
        return list(GRANULARITIES)

    @classmethod
    def available_modules(cls) -> tuple[type, ...]:
        "The module types that have granularities, as a tuple for `isinstance`."
        return tuple(GRANULARITIES)


# fasterai's tables by their names (copies, in fasterai's numbering), e.g. for `add_granularity(Conv1D, _granularities_Linear)`
Granularities._granularities_Conv2d = Granularities._table(nn.Conv2d)
Granularities._granularities_ConvT2d = Granularities._table(nn.ConvTranspose2d)
Granularities._granularities_Linear = {k: v for k, v in Granularities._table(nn.Linear).items()
                                       if k in ('weight', 'column', 'row', 'layer')}
