"""What pruning buys: pruned channels removed for real, sparse weights stored compactly, and the gains measured."""
from __future__ import annotations
import copy, io, os, statistics, time
from pathlib import Path
import torch, torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from .structure import trace, channel_groups, _as_args
from .sparsifier import unwrap_model

__all__ = ['compact', 'pruned_channels', 'save_sparse', 'load_sparse', 'compaction_report', 'count_macs',
           'measure_latency', 'model_bytes']


def _outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    "The model's eval outputs on `example_inputs`, as a flat list of tensors."
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(): out = model(*_as_args(example_inputs))
    finally:
        for m, t in flags.items(): m.training = t
    flat, stack = [], [out]
    while stack:
        o = stack.pop(0)
        if isinstance(o, torch.Tensor): flat.append(o.detach().float())
        elif isinstance(o, dict): stack.extend(o.values())
        elif isinstance(o, (tuple, list)): stack.extend(o)
    return flat


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    "max |a - b| / max |a| over all outputs (shapes must agree)."
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)): return float('inf')
    diff = max(((x - y).abs().max().item() for x, y in zip(a, b)), default=0.)
    scale = max((x.abs().max().item() for x in a), default=0.)
    return diff / scale if scale > 0 else diff


def pruned_channels(model: nn.Module, example_inputs) -> dict[str, int]:
    "Per coupled group (named by its first layer): how many channels are zero in every producer, so `compact` removes them."
    dg = trace(unwrap_model(model), example_inputs)
    return {g.name: int(g.zero_channels().sum()) for g in channel_groups(dg)}


def compact(model: nn.Module, example_inputs, rtol: float = 1e-4) -> nn.Module:
    """A new, physically smaller model without the channels whose producers (filters, biases, BatchNorm scale and
    shift) are all zero; `model` is left untouched. Its eval outputs equal `model`'s within `rtol` (checked)."""
    src = unwrap_model(model)
    if not isinstance(src, nn.Module): raise TypeError(f"model={model!r} must be an nn.Module")
    small = copy.deepcopy(src)
    dg = trace(small, example_inputs)
    untraced = [n for n, m in small.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                and m not in dg.module2node]
    if untraced:
        raise ValueError(f"compact: layer {untraced[0]!r} is not in torch-pruning's trace of {type(src).__name__} (it does "
                         "not run in an eval forward pass, or its input is detached): removing the channels that feed it "
                         "would break it")
    plan = []
    for g in channel_groups(dg):
        dead = g.zero_channels()
        if dead.all(): dead[0] = False  # a layer keeps one (zero) channel so that every shape stays valid
        if dead.any(): plan.append((g, dead.nonzero().squeeze(1).tolist()))
    if not plan:
        raise ValueError(f"compact: {type(src).__name__} has no pruned channel to remove (no coupled group has a channel "
                         "that is zero in every filter, bias and BatchNorm that produces it); prune with "
                         "granularity='filter', coupled=True first")
    roots = {id(g): g.slices[0] for g, _ in plan}
    for g, idxs in plan:
        s = roots[id(g)]
        fn = dg.get_pruner_of_module(s.module).prune_out_channels
        dg.get_pruning_group(s.module, fn, idxs).prune()
    for p in small.parameters(): p.grad = None
    want, got = _outputs(src, example_inputs), _outputs(small, example_inputs)
    err = max_relative_difference(want, got)
    if not err <= rtol:
        raise ValueError(f"compact: the compacted {type(src).__name__} does not compute what the masked model computes "
                         f"(max relative difference {err:.2e} > rtol={rtol}); a layer between a pruned channel and its "
                         "consumers does not map zero to zero")
    return small


# ---- sparse storage ----
_FORMAT = 'fasterai_sched.sparse/1'


def save_sparse(model: nn.Module, path) -> int:
    """Save `model`'s state dict with each floating tensor that is at least half zeros as a bitmask of its nonzeros
    plus the kept values; returns the file's size in bytes. `load_sparse` gives back bit-identical tensors."""
    state = unwrap_model(model).state_dict()
    packed = {}
    for k, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.numel() >= 64:
            nz = t != 0
            if int(nz.sum()) * 2 <= t.numel():
                flat = nz.flatten()
                bits = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8).to(torch.uint8)
                bits = (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
                packed[k] = {'shape': tuple(t.shape), 'dtype': str(t.dtype), 'bits': bits, 'values': t.flatten()[flat].clone()}
                continue
        packed[k] = t.clone()
    buf = io.BytesIO()
    torch.save({'format': _FORMAT, 'class': type(unwrap_model(model)).__name__, 'state': packed}, buf)
    Path(path).write_bytes(buf.getvalue())
    return os.path.getsize(path)


def _unpack(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor): return v
    n = 1
    for s in v['shape']: n *= s
    bits = ((v['bits'].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:n].bool()
    out = torch.zeros(n, dtype=v['values'].dtype)
    out[bits] = v['values']
    return out.view(v['shape'])


def load_sparse(path, model: nn.Module | None = None):
    "The state dict `save_sparse` wrote (dense tensors); given `model`, it is loaded into it (strict) and returned."
    saved = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(saved, dict) or saved.get('format') != _FORMAT:
        raise ValueError(f"path={str(path)!r} is not a file written by save_sparse")
    state = {k: _unpack(v) for k, v in saved['state'].items()}
    if model is None: return state
    unwrap_model(model).load_state_dict(state)
    return model


# ---- what it buys ----
def count_macs(model: nn.Module, example_inputs) -> int:
    "Multiply-accumulates of one eval forward pass, counted by torch's `FlopCounterMode` (flops / 2)."
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter: model(*_as_args(example_inputs))
    finally:
        for m, t in flags.items(): m.training = t
    return counter.get_total_flops() // 2


def model_bytes(model: nn.Module) -> int:
    "Size in bytes of the model's state dict saved with `torch.save`."
    buf = io.BytesIO()
    torch.save(unwrap_model(model).state_dict(), buf)
    return buf.getbuffer().nbytes


def measure_latency(models: dict[str, nn.Module], example_inputs, runs: int = 10, warmup: int = 3) -> dict[str, float]:
    """Median seconds per eval forward pass of each model, measured under `torch.inference_mode` after `warmup` passes,
    the models taking turns run by run so that any load on the machine falls on all of them."""
    args = _as_args(example_inputs)
    flags = {name: {m: m.training for m in model.modules()} for name, model in models.items()}
    times = {name: [] for name in models}
    try:
        for model in models.values(): model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                for model in models.values(): model(*args)
            for _ in range(runs):
                for name, model in models.items():
                    t0 = time.perf_counter(); model(*args); times[name].append(time.perf_counter() - t0)
    finally:
        for name, fl in flags.items():
            for m, t in fl.items(): m.training = t
    return {name: statistics.median(ts) for name, ts in times.items()}


def compaction_report(dense: nn.Module, small: nn.Module, example_inputs, batch_sizes=(1, 32), runs: int = 10,
                      verbose: bool = True) -> dict:
    """Params, MACs (torch's `FlopCounterMode`), file size and measured CPU latency at each batch size (models on
    another device are measured from a CPU copy), for the dense and the compacted model, and their ratios
    (dense / small); printed as a table unless `verbose=False`. Only the first input of `example_inputs` is used."""
    on_cpu = lambda m: m if all(p.device.type == 'cpu' for p in m.parameters()) else copy.deepcopy(m).cpu()
    dense, small = on_cpu(unwrap_model(dense)), on_cpu(unwrap_model(small))
    x = _as_args(example_inputs)[0].detach().cpu()
    rows = {'params': [sum(p.numel() for p in m.parameters()) for m in (dense, small)],
            'MACs': [count_macs(m, x[:1]) for m in (dense, small)],
            'file bytes': [model_bytes(m) for m in (dense, small)]}
    for bs in batch_sizes:
        xb = x[:1].expand(bs, *x.shape[1:]).contiguous()
        t = measure_latency({'dense': dense, 'small': small}, xb, runs=runs)
        rows[f'latency bs={bs} (ms)'] = [t['dense'] * 1e3, t['small'] * 1e3]
    report = {k: {'dense': a, 'small': b, 'ratio': a / b if b else float('inf')} for k, (a, b) in rows.items()}
    if verbose: print(format_report(report, threads=torch.get_num_threads()))
    return report


def format_report(report: dict, threads: int | None = None) -> str:
    "The table `compaction_report` prints."
    fmt = lambda k, v: f"{v:,.2f}" if 'latency' in k else f"{int(v):,}"
    lines = [f"{'':<22}{'dense':>16}{'compacted':>16}{'ratio':>9}", '-' * 63]
    for k, r in report.items():
        lines.append(f"{k:<22}{fmt(k, r['dense']):>16}{fmt(k, r['small']):>16}{r['ratio']:>8.2f}x")
    if threads: lines.append(f"(CPU latency: median of interleaved runs, {threads} torch threads)")
    return '\n'.join(lines)
