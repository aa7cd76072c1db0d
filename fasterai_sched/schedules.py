"""Schedules: plain functions `f(start, end, pos) -> sparsity` for `pos` in [0, 1], and a plot of them."""
from __future__ import annotations
import math
from typing import Callable, Sequence
from fastai.callback.schedule import sched_cos, sched_lin

__all__ = ['one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd', 'acdc', 'SCHEDULES', 'plot_schedules']


def one_shot(start: float, end: float, pos: float) -> float:
    "All at once: `end` as soon as `pos > 0`."
    return end if pos > 0 else start


def iterative(start: float, end: float, pos: float, n_steps: int = 3) -> float:
    "`n_steps` equal steps, each taken as soon as its part of the window begins."
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be a positive integer")
    if pos >= 1: return float(end)  # exactly `end`: start + (end - start) * 1 can miss it by a rounding
    # round first so that pos*n_steps landing a hair above an integer does not take the next step early
    return start + (end - start) * math.ceil(round(pos * n_steps, 9)) / n_steps


def agp(start: float, end: float, pos: float) -> float:
    "Automated Gradual Pruning: cubic, fast at first then slower (Zhu & Gupta, 2017)."
    if pos <= 0: return float(start)  # exactly `start`: end + (start - end) can miss it by a rounding
    return end + (start - end) * (1 - pos) ** 3


def one_cycle(start: float, end: float, pos: float, α: float = 14, β: float = 6) -> float:
    "Logistic rise, rescaled so that `pos=0` gives `start` and `pos=1` gives `end`."
    if pos >= 1: return float(end)
    def s(p): return 1 / (1 + math.exp(-(α * p - β)))
    return start + (end - start) * (s(pos) - s(0)) / (s(1) - s(0))


def cos(start: float, end: float, pos: float) -> float:
    "Cosine from `start` to `end` (fastai's `sched_cos`)."
    if pos >= 1: return float(end)
    return float(sched_cos(start, end, pos))


def lin(start: float, end: float, pos: float) -> float:
    "Linear from `start` to `end` (fastai's `sched_lin`)."
    if pos >= 1: return float(end)
    return float(sched_lin(start, end, pos))


def dsd(start: float, end: float, pos: float) -> float:
    "Dense-sparse-dense: cosine up to `end` by `pos=0.5`, then back down to `start` by `pos=1`."
    return cos(start, end, 2 * pos) if pos <= 0.5 else cos(end, start, 2 * pos - 1)


SCHEDULES = {f.__name__: f for f in [one_shot, iterative, agp, one_cycle, cos, lin, dsd]}


def acdc(start: float, end: float, pos: float, n_cycles: int = 3, warmup: float = 0.1, final: float = 0.2) -> float:
    """Alternating compressed / decompressed (Peste et al. 2021): `start` for the first `warmup` of the window, then
    `n_cycles` times `end` (compressed) followed by `start` (decompressed) in equal phases, then `end` for the last
    `final` of the window (compressed fine-tuning); each phase includes its right end. Weights that come back
    restart at zero with fresh optimizer state."""
    if isinstance(n_cycles, bool) or not isinstance(n_cycles, int) or n_cycles < 1:
        raise ValueError(f"n_cycles={n_cycles!r} must be a positive integer")
    for name, v in (('warmup', warmup), ('final', final)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{name}={v!r} must be a share of the window in [0, 1)")
    if warmup + final >= 1: raise ValueError(f"warmup={warmup!r} + final={final!r} must leave room for the cycles (< 1)")
    # a phase holds its right end, so a phase that ends with an epoch holds that epoch's last step (its measured line)
    if pos <= 0 or pos <= warmup: return float(start)
    if pos >= 1 or pos > 1 - final: return float(end)
    phase = math.ceil(round((pos - warmup) / (1 - warmup - final) * 2 * n_cycles, 9)) - 1
    return float(end) if phase % 2 == 0 else float(start)


SCHEDULES['acdc'] = acdc


def _label(f) -> str:
    name = getattr(f, '__name__', None) or getattr(getattr(f, 'func', None), '__name__', 'schedule')
    kw = getattr(f, 'keywords', None)
    return name + (f"({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else '')


def plot_schedules(schedules: Callable | Sequence[Callable], sparsity: float = 90, start_sparsity: float = 0,
                   start_epoch: int = 0, n_epoch: int = 10, n_points: int = 500, ax=None):
    "Draw each schedule's target sparsity over a run of `n_epoch` epochs, pruning from `start_epoch`; returns the axes."
    import matplotlib.pyplot as plt
    if callable(schedules): schedules = [schedules]
    if not 0 <= start_epoch < n_epoch:
        raise ValueError(f"start_epoch={start_epoch!r} must be in [0, n_epoch={n_epoch})")
    if ax is None: _, ax = plt.subplots(figsize=(8, 4))
    p0 = start_epoch / n_epoch
    xs = [n_epoch * i / n_points for i in range(n_points + 1)]
    for f in schedules:
        ys = [start_sparsity if x / n_epoch <= p0 else f(start_sparsity, sparsity, (x / n_epoch - p0) / (1 - p0))
              for x in xs]
        ax.plot(xs, ys, label=_label(f))
    ax.set(xlabel='epoch', ylabel='target sparsity (%)', ylim=(-2, 102), title='Sparsity schedules')
    ax.legend(); ax.grid(alpha=.3)
    return ax
