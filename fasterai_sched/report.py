"""The per-layer sparsity table, measured from the weights themselves."""
from __future__ import annotations
from typing import NamedTuple
import torch, torch.nn as nn
from .sparsifier import Sparsifier, unwrap_model

__all__ = ['sparsity_report', 'ReportRow']


class ReportRow(NamedTuple):
    layer: str
    type: str
    params: int
    zeros: int
    sparsity: float  # percent


def _line(layer, typ, params, zeros, sparsity) -> str:
    return f"{layer:<30} {typ:<15} {params:<10,} {zeros:<10,} {sparsity:>9.2f}%"  # as DESIGN.md lays the table out


@torch.no_grad()
def sparsity_report(model: nn.Module, layer_type: type = nn.Conv2d, verbose: bool = True) -> list[ReportRow]:
    "Print each `layer_type` layer's weights, zeros and sparsity, then the overall line; return the rows, overall last."
    Sparsifier.check_args(layer_type=layer_type)
    model, seen, layers = unwrap_model(model), set(), []
    for n, m in model.named_modules():
        w = getattr(m, 'weight', None)
        if not isinstance(m, layer_type) or not isinstance(w, torch.Tensor) or id(w) in seen: continue
        if isinstance(w, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {n!r} ({type(m).__name__}) is lazy and has no weight yet: run one batch through the "
                             f"model (model(x)) before reporting on it")
        seen.add(id(w)); layers.append((n, m))  # a weight tied between layers is counted once, under its first
    if not layers: raise ValueError(f"layer_type={layer_type.__name__}: the model has no such layer to report on")
    zeros = torch.stack([(m.weight == 0).sum().to('cpu') for _, m in layers]).tolist()
    rows = [ReportRow(n, type(m).__name__, m.weight.numel(), z, 100 * z / m.weight.numel())
            for (n, m), z in zip(layers, zeros)]
    n_all, z_all = sum(r.params for r in rows), sum(r.zeros for r in rows)
    rows.append(ReportRow('Overall', 'all', n_all, z_all, 100 * z_all / n_all))
    if verbose:
        rule = '-' * 80
        print('Sparsity Report:', rule, f"{'Layer':<30} {'Type':<15} {'Params':<10} {'Zeros':<10} Sparsity", rule,
              *[_line(*r) for r in rows[:-1]], rule, _line(*rows[-1]), sep='\n')
    return rows
