"""Accuracy against sparsity: each method at each sparsity, over seeds, on scikit-learn's digits with a small CNN.

`python -m fasterai_sched --sweep 80,90,95,98` runs it. A method is a schedule (any of `SCHEDULES`, or 'rigl'),
optionally with an allocation after a '+': 'agp+erk', 'agp+lamp', 'rigl+erk'. The network is `sweep_cnn`, small
enough (23,184 pruned weights) that 98% costs accuracy; the images stay at their 8x8 pixels, in memory."""
from __future__ import annotations
import csv, math, statistics, time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from .allocation import ALLOCATIONS, allocate, lamp
from .callback import SparsifyCallback
from .criteria import CRITERIA
from .rigl import RigLCallback
from .schedules import SCHEDULES
from .sparsifier import Sparsifier, check_sparsity

__all__ = ['sweep_cnn', 'sweep_dls', 'METHOD_ALLOCATIONS', 'parse_method', 'method_name', 'own_options', 'method_options', 'build_callback', 'SweepConfig',
           'run_sweep', 'sweep_table', 'plot_sweep', 'SWEEP_METHODS', 'SWEEP', 'SWEEP_QUICK']

METHOD_ALLOCATIONS = ['uniform', *[a for a in ALLOCATIONS if a != 'uniform'], 'lamp']
SWEEP_METHODS = 'agp,agp+erk,agp+lamp,rigl+erk,acdc'
# on 2 CPU cores shared with other jobs a run of SWEEP took about 10 s, of SWEEP_QUICK about 4 s (docs/sweep.md)
SWEEP = dict(epochs=20, seeds=3, lr=1e-2, bs=64)
SWEEP_QUICK = dict(epochs=8, seeds=1, lr=1e-2, bs=64)
RIGL_DELTA = 10  # steps between RigL's updates in the sweep: 23 steps an epoch, so about two updates an epoch


def sweep_cnn(n_classes: int = 10, width: int = 16) -> nn.Module:
    "Three 3x3 convolutions (width, 2*width, 4*width channels; the last two stride 2) with BatchNorm, pooled, a linear head."
    w = width
    return nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                         nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
                         nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, n_classes))


def sweep_dls(bs: int = 64, seed: int = 0, split_seed: int = 42, device=None) -> DataLoaders:
    "scikit-learn's digits at 8x8, one channel, in memory: the same 20% held out for every `seed`, which orders the batches."
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed)).tolist()
    cut = len(idx) - int(0.2 * len(idx))
    train, valid = [(x[i], y[i]) for i in idx[:cut]], [(x[i], y[i]) for i in idx[cut:]]
    set_seed(seed, reproducible=True)
    return DataLoaders.from_dsets(train, valid, bs=bs, num_workers=0, device=torch.device(device or 'cpu'))


def parse_method(method: str) -> tuple[str, str]:
    "'agp+erk' -> ('agp', 'erk'); a name without '+' takes 'uniform'. Raises naming the method and what is allowed."
    if not isinstance(method, str): raise TypeError(f"method={method!r} must be a string such as 'agp+erk'")
    schedule, _, alloc = method.partition('+')
    alloc = alloc or 'uniform'
    if schedule not in [*SCHEDULES, 'rigl']:
        raise ValueError(f"method={method!r}: {schedule!r} is not a schedule; choose from {', '.join([*SCHEDULES, 'rigl'])}")
    if alloc not in METHOD_ALLOCATIONS:
        raise ValueError(f"method={method!r}: {alloc!r} is not an allocation; choose from {', '.join(METHOD_ALLOCATIONS)}")
    if schedule == 'rigl' and alloc == 'lamp':
        raise ValueError(f"method={method!r}: RigL keeps per-layer counts, so it takes an allocation "
                         f"({', '.join(ALLOCATIONS)}), not LAMP's global ranking")
    return schedule, alloc


def method_name(schedule: str, allocation: str = 'uniform') -> str:
    "The method a schedule name stands for with `allocation`: 'agp' with 'erk' is 'agp+erk'; a name with '+' keeps its own."
    return schedule if '+' in schedule or allocation == 'uniform' else f"{schedule}+{allocation}"


def own_options(method: str) -> bool:
    "Whether `method` prunes with its own context and criteria (LAMP, RigL), so that ones given would not be used."
    schedule, alloc = parse_method(method)
    return alloc == 'lamp' or schedule == 'rigl'


def method_options(method: str, context: str | None = None, criteria=None) -> tuple[str, object]:
    """The context and criteria `method` prunes with: 'uniform' takes the ones given (local, large_final when None);
    an allocation (erk, dense_first) and RigL are local, LAMP is global and ranks by `lamp`. Raises when one given
    would not be used, naming it and what the method needs."""
    schedule, alloc = parse_method(method)
    if context is not None: Sparsifier.check_args(context)
    crit = None if criteria is None else Sparsifier.check_args(criteria=lamp if criteria == 'lamp' else criteria)
    if alloc == 'uniform' and schedule != 'rigl': return context or 'local', crit or CRITERIA['large_final']
    need_context, need_crit = ('global', lamp) if alloc == 'lamp' else ('local', CRITERIA['large_final'])
    why = ("LAMP ranks all layers' weights together by LAMP scores" if alloc == 'lamp' else
           "RigL drops each layer's smallest weights and grows by gradient" if schedule == 'rigl' else
           f"the {alloc} allocation gives each layer its own target")
    if context not in (None, need_context):
        raise ValueError(f"context={context!r} does not apply to method={method!r}: {why} (context={need_context!r}); "
                         "leave context unset")
    if own_options(method) and crit is not None and crit.name != need_crit.name:
        raise ValueError(f"criteria={crit.name!r} does not apply to method={method!r}: {why}; leave criteria unset")
    return need_context, crit or need_crit


def build_callback(method: str, sparsity: float, model: nn.Module, criteria=None, granularity: str = 'weight',
                   context: str | None = None, verbose: bool = True, **kw) -> SparsifyCallback:
    """The callback `method` names at `sparsity` for `model`: 'uniform' is the plain callback with `context` and
    `criteria` (local, large_final when unset); 'erk' and 'dense_first' give per-layer targets (local); 'lamp' ranks
    all layers together by LAMP scores (global); 'rigl' is `RigLCallback` (its own window: the whole fit). `kw` goes
    to the callback (`start_epoch`, `end_epoch`, `max_lag`, `frequency`; RigL's `delta`, `drop_fraction`, `stop`).
    An option the method would not use is an error (`method_options`)."""
    schedule, alloc = parse_method(method)
    check_sparsity(sparsity)
    context, crit = method_options(method, context, criteria)
    if schedule == 'rigl':
        window = [(k, v) for k in ('start_epoch', 'end_epoch') if (v := kw.pop(k, None)) is not None]
        if window: raise ValueError(f"{window[0][0]}={window[0][1]!r} does not apply to method={method!r}: RigL updates "
                                    "its connectivity over the whole fit (stop sets when it ends)")
        if granularity != 'weight': raise ValueError(f"granularity={granularity!r}: RigL moves single weights ('weight')")
        target = sparsity if alloc == 'uniform' else allocate(model, sparsity, alloc)
        return RigLCallback(target, verbose=verbose, **kw)
    if alloc in ('uniform', 'lamp'): target = sparsity
    else: target = allocate(model, sparsity, alloc, granularity=granularity)
    return SparsifyCallback(sparsity=target, granularity=granularity, context=context, criteria=crit,
                            schedule=SCHEDULES[schedule], verbose=verbose, **kw)


def _window(schedule: str, epochs: int) -> tuple[int, int | None]:
    "Pruning window: the GMP family prunes from a sixth of the fit to a third before its end; AC/DC and RigL use all of it."
    if schedule in ('acdc', 'rigl'): return 0, None
    start = min(epochs - 1, int(epochs / 6 + 0.5))
    return start, max(start + 1, epochs - int(epochs / 3 + 0.5))


@dataclass
class SweepConfig:
    sparsities: list[float]
    methods: list[str]
    epochs: int = SWEEP['epochs']
    seeds: int = SWEEP['seeds']
    seed: int = 0
    lr: float = SWEEP['lr']
    bs: int = SWEEP['bs']
    device: str = 'cpu'
    out: Path = Path('fasterai_sched_out')
    results: list[dict] = field(default_factory=list)


class _Quiet(Callback):
    "Nothing printed per epoch: the sweep prints one line per run."
    order = 100
    def before_fit(self): self.old, self.learn.logger = self.learn.logger, lambda *a: None
    def after_fit(self): self.learn.logger = self.old


def run_one(method: str | None, sparsity: float, seed: int, cfg: SweepConfig) -> dict:
    "One fit of `cfg.epochs` (dense when `method` is None): the final validation accuracy and measured sparsity."
    dls = sweep_dls(cfg.bs, seed, device=cfg.device)
    set_seed(seed, reproducible=True)
    learn = Learner(dls, sweep_cnn().to(cfg.device), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    cbs = [_Quiet()]
    if method is not None:
        schedule = parse_method(method)[0]
        start, end = _window(schedule, cfg.epochs)
        kw = dict(delta=RIGL_DELTA) if schedule == 'rigl' else dict(start_epoch=start, end_epoch=end)
        cbs.insert(0, build_callback(method, sparsity, learn.model, verbose=False, **kw))
    t = time.perf_counter()
    with learn.no_bar(): learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=cbs)
    convs = [m.weight for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    measured = 100 * sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    acc = 100 * float(learn.recorder.values[-1][learn.recorder.metric_names.index('accuracy') - 1])
    return dict(method=method or 'dense', sparsity=sparsity if method else 0., seed=seed, accuracy=acc,
                measured=measured, seconds=time.perf_counter() - t)


def run_sweep(cfg: SweepConfig, log=print) -> list[dict]:
    "Dense once per seed, then every method at every sparsity for every seed; one line per run through `log`."
    for s in cfg.sparsities: check_sparsity(s)
    for m in cfg.methods: parse_method(m)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    plan = [(None, 0., s) for s in seeds] + [(m, sp, s) for m in cfg.methods for sp in cfg.sparsities for s in seeds]
    for i, (m, sp, s) in enumerate(plan, 1):
        r = run_one(m, sp, s, cfg)
        cfg.results.append(r)
        log(f"[{i}/{len(plan)}] {r['method']:<12} {sp:>5g}%  seed {s}: accuracy {r['accuracy']:6.2f}%  "
            f"measured sparsity {r['measured']:6.2f}%  {r['seconds']:.1f} s")
    return cfg.results


def _stats(results: list[dict], method: str, sparsity: float) -> tuple[float, float, int]:
    accs = [r['accuracy'] for r in results if r['method'] == method and (method == 'dense' or r['sparsity'] == sparsity)]
    if not accs: return math.nan, math.nan, 0
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.), len(accs)


def sweep_table(results: list[dict], sparsities: Sequence[float], methods: Sequence[str]) -> str:
    "Markdown: one row per method, one column per sparsity, 'mean ± standard deviation' of the final accuracy over seeds."
    head = '| method | ' + ' | '.join(f"{s:g}%" for s in sparsities) + ' |'
    rows = [head, '|' + ' --- |' * (len(sparsities) + 1)]
    d, sd, n = _stats(results, 'dense', 0)
    rows.append(f"| dense (0%) | " + ' | '.join([f"{d:.2f} ± {sd:.2f}"] * len(sparsities)) + ' |')
    for m in methods:
        cells = []
        for s in sparsities:
            mean, std, k = _stats(results, m, s)
            cells.append(f"{mean:.2f} ± {std:.2f}" if k else '—')
        rows.append(f"| {m} | " + ' | '.join(cells) + ' |')
    return '\n'.join(rows) + f"\n\n(final validation accuracy in %, mean ± standard deviation over {n} seed{'s' * (n != 1)})"


def plot_sweep(results: list[dict], sparsities: Sequence[float], methods: Sequence[str], path: Path) -> None:
    "Accuracy against sparsity, one line per method with its spread over seeds, dense as a dashed reference."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.2), layout='constrained')
    ax = fig.subplots()
    d, _, _ = _stats(results, 'dense', 0)
    ax.axhline(d, color='black', ls='--', lw=1, label='dense')
    xs = list(range(len(sparsities)))
    for i, m in enumerate(methods):
        stats = [_stats(results, m, s) for s in sparsities]
        ax.errorbar([x + (i - len(methods) / 2) * 0.04 for x in xs], [s[0] for s in stats], yerr=[s[1] for s in stats],
                    marker='o', ms=4, capsize=3, label=m)
    ax.set(xticks=xs, xticklabels=[f"{s:g}%" for s in sparsities], xlabel='sparsity of the convolutions',
           ylabel='final validation accuracy (%)', title='accuracy vs sparsity (digits, sweep_cnn)')
    ax.legend(fontsize=8); ax.grid(alpha=.3)
    fig.savefig(path, dpi=90)


def write_sweep_csv(results: list[dict], path: Path) -> None:
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, ['method', 'sparsity', 'seed', 'accuracy', 'measured', 'seconds'])
        w.writeheader()
        for r in results: w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def main_sweep(cfg: SweepConfig) -> int:
    "Run the sweep, print the table, write sweep.csv and sweep.png in `cfg.out`."
    cfg.out.mkdir(parents=True, exist_ok=True)
    n = cfg.seeds * (1 + len(cfg.methods) * len(cfg.sparsities))
    print(f"sweep: sweep_cnn on scikit-learn's digits (8x8, 1,438 train / 359 valid), {cfg.epochs} epochs "
          f"(fit_one_cycle, lr {cfg.lr:g}, bs {cfg.bs}) per run; methods {', '.join(cfg.methods)} at "
          f"{', '.join(f'{s:g}%' for s in cfg.sparsities)}; seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}: {n} runs",
          flush=True)
    t = time.perf_counter()
    results = run_sweep(cfg, log=lambda s: print(s, flush=True))
    write_sweep_csv(results, cfg.out / 'sweep.csv')
    plot_sweep(results, cfg.sparsities, cfg.methods, cfg.out / 'sweep.png')
    print('\n' + sweep_table(results, cfg.sparsities, cfg.methods))
    print(f"\ntotal time {time.perf_counter() - t:.0f} s; sweep.csv and sweep.png in {cfg.out}/", flush=True)
    return 0
