"""The benchmark: dense training against training with `SparsifyCallback`, interleaved in one process.

`python -m fasterai_sched.bench` times fastai fits (mode 'fit': resnet18 at 32 px on scikit-learn's digits) or
training steps over one synthetic batch (mode 'step', the GPU measurement), and prints medians and the ratio to
dense. `python -m fasterai_sched.bench select --n 100000000` times the exact-count selection over N scores.
`python -m fasterai_sched.bench compact` prunes coupled channels of torchvision models, compacts them and sets the
measured CPU latency ratio (dense / compacted, batch 1 and 32) beside the MAC ratio."""
from __future__ import annotations
import argparse, contextlib, inspect, io, json, platform, statistics, sys, threading, time, warnings
from functools import partial
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.callback.core import Callback, CancelValidException
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam

__all__ = ['run_train_bench', 'run_select_bench', 'run_compact_bench', 'format_train', 'format_select', 'format_compact',
           'main']

SPARSITY = 90
# name -> (library, schedule name, context); 'steady' prunes once with one_shot, then times re-masking only
VARIANTS = {
    'dense': (None, None, None),
    'agp local': ('ours', 'agp', 'local'),
    'agp global': ('ours', 'agp', 'global'),
    'steady': ('ours', 'one_shot', 'local'),
    'agp local (f=100)': ('ours', 'agp', 'local'),
    'agp global (f=100)': ('ours', 'agp', 'global'),
    # issue 13's methods (the schedule slot holds a sweep method name, `sweep.build_callback` makes the callback)
    'agp erk': ('ours', 'agp+erk', 'local'),
    'agp lamp': ('ours', 'agp+lamp', 'global'),
    'rigl': ('ours', 'rigl+erk', 'local'),
    'acdc': ('ours', 'acdc', 'local'),
    'fasterai agp local': ('fasterai', 'agp', 'local'),
    'fasterai agp global': ('fasterai', 'agp', 'global'),
    'fasterai steady': ('fasterai', 'one_shot', 'local'),
}
DEFAULT_VARIANTS = ['dense', 'agp local', 'agp global', 'steady']
# variants with their own recompute policy: '(f=100)' is the policy before max_lag, masks every 100 steps and at
# each epoch's end, whatever the lag; the others take the callback's defaults or the command line's
POLICY = {'agp local (f=100)': {'max_lag': None, 'frequency': 100}, 'agp global (f=100)': {'max_lag': None, 'frequency': 100},
          # RigL updates every 10 steps here (about twice an epoch of digits at bs 64), as in the sweep
          'rigl': {'delta': 10}}


# ---- devices and models ----
def pick_device(name: str = 'auto') -> torch.device:
    "'auto' is CUDA when available, else CPU; asking for CUDA without it is an error."
    if name == 'auto': return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name not in ('cpu', 'cuda'): raise ValueError(f"device={name!r} is not allowed; use 'auto', 'cpu' or 'cuda'")
    if name == 'cuda' and not torch.cuda.is_available(): raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    "Wait for the device: the benchmark's clocks (never the library) synchronise."
    if device.type == 'cuda': torch.cuda.synchronize(device)


def build_model(arch: str, n_out: int, seed: int = 0) -> nn.Module:
    "A fastai vision model (torchvision body, fastai head), untrained, the same for every `seed`."
    from fastai.vision.learner import create_vision_model
    from torchvision.models import resnet18, resnet50
    archs = {'resnet18': resnet18, 'resnet50': resnet50}
    if arch not in archs: raise ValueError(f"arch={arch!r} is not allowed; use one of {list(archs)}")
    torch.manual_seed(seed)
    return create_vision_model(archs[arch], n_out, pretrained=False)


# ---- data ----
def digits_dls(size: int = 32, bs: int = 64, device: torch.device | str = 'cpu', seed: int = 0) -> DataLoaders:
    "scikit-learn's digits (8x8, 1,797 images) upscaled to `size` px and 3 channels; 80% train, 20% valid."
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(.8 * len(idx))
    train, valid = [(x[i], y[i]) for i in idx[:cut]], [(x[i], y[i]) for i in idx[cut:]]
    # num_workers=0: worker processes would time their own start-up and compete for the cores being measured
    return DataLoaders.from_dsets(train, valid, bs=bs, device=torch.device(device), num_workers=0)


class _SameBatch:
    "A loader that yields one batch already on the device `n` times: the timing holds no data loading."
    def __init__(self, xb, yb, n: int): self.xb, self.yb, self.n = xb, yb, n
    def __len__(self): return self.n
    def __iter__(self): return ((self.xb, self.yb) for _ in range(self.n))


def synthetic_dls(size: int, bs: int, steps: int, n_out: int, device: torch.device) -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(bs, 3, size, size, generator=g).to(device)
    yb = torch.randint(0, n_out, (bs,), generator=g).to(device)
    return DataLoaders(_SameBatch(xb, yb, steps), _SameBatch(xb, yb, 1))


# ---- clocks ----
_EVENTS = ('before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_loss', 'before_backward',
           'after_backward', 'before_step', 'after_step', 'after_cancel_step', 'after_batch', 'after_train',
           'before_validate', 'after_validate', 'after_epoch')  # those inside an epoch


def _time_events(cb: Callback, total: list[float]) -> None:
    "Add the wall seconds `cb` spends in its own per-epoch events to `total[0]`: the direct cost of pruning."
    for name in _EVENTS:
        if getattr(type(cb), name, None) is None: continue
        def timed(f=getattr(cb, name)):
            t = time.perf_counter()
            try: return f()
            finally: total[0] += time.perf_counter() - t
        object.__setattr__(cb, name, timed)


class _Turns:
    """Fits in threads that take turns, one batch each: whatever else loads the shared cores hits every variant
    alike. Each run's clock only advances while it holds the turn."""
    def __init__(self, n: int, device: torch.device):
        self.cond, self.turn, self.left, self.device = threading.Condition(), 0, list(range(n)), device
        self.held = [(0., 0.)] * n  # (wall, CPU) seconds each run has held the turn
        self.since = (0., 0.)

    def take(self, i: int) -> None:
        with self.cond: self.cond.wait_for(lambda: self.turn == i)
        self.since = time.perf_counter(), time.process_time()

    def now(self, i: int) -> tuple[float, float]:
        "Seconds run `i` has held the turn, this one included (called while it holds it)."
        return tuple(h + t - s for h, t, s in zip(self.held[i], (time.perf_counter(), time.process_time()), self.since))

    def give(self, i: int, leave: bool = False) -> None:
        sync(self.device)
        self.held[i] = self.now(i)
        with self.cond:
            k = self.left.index(i)
            if leave: self.left.remove(i)
            if self.left: self.turn = self.left[(k if leave else k + 1) % len(self.left)]
            self.cond.notify_all()


class _PassTurn(Callback):
    "After each batch, hand the turn to the next run and wait for it to come back."
    order = 1001  # after the clock

    def __init__(self, turns: _Turns, i: int): self.turns, self.i = turns, i

    def after_batch(self):
        self.turns.give(self.i)
        self.turns.take(self.i)


class _Clock(Callback):
    """Times of each epoch (mode 'fit'), or of the training phase with and without its first step (mode 'step'):
    wall-clock seconds, CPU seconds of this process, and wall seconds spent inside the callback under test."""
    order = 1000  # after every other callback, so their work is inside the times

    def __init__(self, device, per_step: bool, clock=None):
        self.device, self.per_step, self.in_callback, self.clock = device, per_step, [0.], clock

    def _now(self) -> tuple[float, float, float]:
        sync(self.device)
        wall, cpu = self.clock() if self.clock else (time.perf_counter(), time.process_time())
        return wall, cpu, self.in_callback[0]

    def before_fit(self): self.marks, self.epochs = {}, []; self.last = self._now()

    def before_train(self):
        if self.per_step: self.marks['start'] = self._now()

    def after_batch(self):
        if self.per_step and self.training and self.iter == 0: self.marks['first'] = self._now()

    def after_train(self):
        if self.per_step: self.marks['end'] = self._now()

    def before_validate(self):
        if self.per_step: raise CancelValidException()

    def after_epoch(self):
        now = self._now()
        self.epochs.append(tuple(a - b for a, b in zip(now, self.last)))
        self.last = now


# ---- the callbacks under test ----
def fasterai_available() -> tuple[bool, str]:
    "Whether fasterai (the optional extra `bench`) can be imported, and why not."
    try:
        import fasterai.sparse.all  # noqa: F401
        return True, ''
    except Exception as e:  # any failure to import means the comparison is skipped
        return False, f"{type(e).__name__}: {e}"


def make_callback(variant: str, frequency=None, max_lag=None, model: nn.Module | None = None):
    """The callback `variant` names (None for dense); `frequency`, `max_lag`: the recompute policy, if not the default;
    `model`: the learner's model, which an allocation (ERK) reads its layers from."""
    lib, sched, context = VARIANTS[variant]
    if lib is None: return None
    if lib == 'ours' and sched not in ('agp', 'one_shot'):
        from .sweep import build_callback
        if model is None: raise ValueError(f"variant {variant!r} needs the model (its per-layer targets come from its layers)")
        kw = POLICY.get(variant, {k: v for k, v in [('frequency', frequency), ('max_lag', max_lag)] if v is not None})
        return build_callback(sched, SPARSITY, model, verbose=False, **kw)
    if lib == 'ours':
        from .callback import SparsifyCallback
        from .criteria import large_final
        from .schedules import agp, one_shot
        kw = {k: v for k, v in [('frequency', frequency), ('max_lag', max_lag)] if v is not None}
        kw = POLICY.get(variant, kw)
        return SparsifyCallback(sparsity=SPARSITY, granularity='weight', context=context, criteria=large_final,
                                schedule={'agp': agp, 'one_shot': one_shot}[sched], start_epoch=0, verbose=False, **kw)
    from fasterai.sparse.all import SparsifyCallback as FasteraiCallback
    from fasterai.core.criteria import large_final as f_large_final
    from fasterai.core.schedule import Schedule, sched_agp, sched_oneshot
    # a fresh schedule per run (fasterai's hold state), pruning from the first step as ours does
    schedule = Schedule({'agp': sched_agp, 'one_shot': sched_oneshot}[sched], start_pct=0.)
    return FasteraiCallback(SPARSITY, 'weight', context, f_large_final, schedule)


def _measured_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    return 100. * sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _prepare(variant: str, cfg: dict, device: torch.device, clock=None) -> tuple:
    "A learner for `variant`, with its clock and the callback under test (None for dense)."
    per_step = cfg['mode'] == 'step'
    if per_step: dls = synthetic_dls(cfg['size'], cfg['bs'], cfg['steps'], 10, device)
    else: dls = digits_dls(cfg['size'], cfg['bs'], device)
    learn = Learner(dls, build_model(cfg['arch'], 10).to(device), loss_func=CrossEntropyLossFlat(), opt_func=Adam)
    timer, cb = _Clock(device, per_step, clock), make_callback(variant, cfg.get('frequency'), cfg.get('max_lag'), learn.model)
    if cb is not None: _time_events(cb, timer.in_callback)
    return learn, timer, cb


def _fit(learn, timer, cb, cfg: dict, extra=()) -> None:
    with learn.no_bar(), learn.no_logging():
        learn.fit(1 if cfg['mode'] == 'step' else cfg['epochs'], 1e-3,
                  cbs=[timer, *([cb] if cb is not None else []), *extra])


def _result(learn, timer, cb, cfg: dict) -> dict:
    "Per-unit times (wall, CPU, inside the callback), final sparsity and the bytes the sparsifier holds."
    times = {}
    for i, clk in enumerate(['', 'cpu_', 'callback_']):
        if cfg['mode'] == 'step':
            m, n = timer.marks, cfg['steps']
            times[clk + 'all'] = (m['end'][i] - m['start'][i]) / n
            times[clk + 'after_first'] = (m['end'][i] - m['first'][i]) / (n - 1)
        else:
            e = [t[i] for t in timer.epochs]
            times[clk + 'all'], times[clk + 'after_first'] = statistics.fmean(e), statistics.fmean(e[1:])
    sp = getattr(cb, 'sparsifier', None)
    mem = sp.memory_bytes() if hasattr(sp, 'memory_bytes') else None
    return {'times': times, 'sparsity': _measured_sparsity(learn.model), 'memory_bytes': mem}


def _one_run(variant: str, cfg: dict, device: torch.device) -> dict:
    "One fit of `variant` on its own."
    run = _prepare(variant, cfg, device)
    _fit(*run, cfg)
    return _result(*run, cfg)


def _runs_taking_turns(variants: list[str], cfg: dict, device: torch.device) -> list[dict]:
    "One fit of each variant, all at once in threads that take turns batch by batch."
    turns = _Turns(len(variants), device)
    runs = [_prepare(v, cfg, device, partial(turns.now, i)) for i, v in enumerate(variants)]
    errors = []
    def go(i):
        turns.take(i)
        try: _fit(*runs[i], cfg, extra=[_PassTurn(turns, i)])
        except BaseException as e: errors.append(e)
        finally: turns.give(i, leave=True)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(runs))]
    for t in threads: t.start()
    for t in threads: t.join()
    if errors: raise errors[0]
    return [_result(*run, cfg) for run in runs]


def run_train_bench(mode: str = 'fit', arch: str = 'resnet18', size: int = 32, bs: int = 64, device: str = 'auto',
                    steps: int = 30, epochs: int = 3, repeats: int = 3, variants: list[str] | None = None,
                    frequency: int | None = None, warmup: bool = True, log=None,
                    interleave: str | None = None, max_lag: float | None = None) -> dict:
    """Time `variants` against dense. Each repeat fits every variant once, in a rotated order: one after the other
    (interleave='run', the default on CUDA), or all at once taking turns batch by batch (interleave='batch', the
    default on CPU, where other jobs on the same cores would otherwise decide the ratios)."""
    dev = pick_device(device)
    interleave = interleave or ('run' if dev.type == 'cuda' else 'batch')
    if interleave not in ('run', 'batch'):
        raise ValueError(f"interleave={interleave!r} is not allowed; use 'run' or 'batch'")
    if mode not in ('fit', 'step'): raise ValueError(f"mode={mode!r} is not allowed; use 'fit' or 'step'")
    if mode == 'step' and steps < 2: raise ValueError(f"steps={steps} must be at least 2 in mode 'step'")
    if mode == 'fit' and epochs < 2: raise ValueError(f"epochs={epochs} must be at least 2 in mode 'fit'")
    variants = list(variants or DEFAULT_VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown: raise ValueError(f"variants {unknown} are not known; valid: {list(VARIANTS)}")
    if 'dense' not in variants: variants.insert(0, 'dense')
    ok, why = fasterai_available()
    notes = []
    if not ok:
        skipped = [v for v in variants if VARIANTS[v][0] == 'fasterai']
        variants = [v for v in variants if VARIANTS[v][0] != 'fasterai']
        notes.append(f"fasterai not installed (pip install -e '.[bench]'): its callback is not compared ({why})"
                     + (f"; skipped {skipped}" if skipped else ''))
    cfg = dict(mode=mode, arch=arch, size=size, bs=bs, steps=steps, epochs=epochs, frequency=frequency, max_lag=max_lag)
    from .callback import SparsifyCallback
    defaults = inspect.signature(SparsifyCallback).parameters
    used = {'frequency': frequency or defaults['frequency'].default,
            'max_lag': defaults['max_lag'].default if max_lag is None else max_lag}
    if warmup:  # the first fit in a process pays for allocations and kernel selection: throw it away
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            _one_run('dense', {**cfg, 'epochs': 2} if mode == 'fit' else {**cfg, 'steps': min(steps, 5)}, dev)
    runs = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            if interleave == 'batch': results = _runs_taking_turns(order, cfg, dev)
            else: results = [_one_run(v, cfg, dev) for v in order]
        for v, res in zip(order, results):
            runs[v].append(res)
            if log: log(json.dumps({'repeat': r + 1, 'of': repeats, 'variant': v, **res}))
    return {'config': {**cfg, 'interleave': interleave, 'policy': used, 'device': str(dev),
                       'device_name': device_name(dev), 'repeats': repeats, 'torch': torch.__version__,
                       'threads': torch.get_num_threads(), 'sparsity': SPARSITY},
            'rows': _rows(runs), 'notes': notes}


def _rows(runs: dict) -> list[dict]:
    """Per variant and clock (wall, CPU): the median time and the median over repeats of its ratio to the dense run
    of the same repeat; the median share of the time spent inside the callback. Steady rows time what follows the
    one-shot pruning step, and a row 'dense, after first' holds the dense runs' same span."""
    rows = []
    for v, rs in runs.items():
        rows.append(_row(v, rs, runs['dense'], 'after_first' if VARIANTS[v][1] == 'one_shot' else 'all'))
        if v == 'dense' and any(VARIANTS[u][1] == 'one_shot' for u in runs):
            rows.append(_row('dense, after first', rs, rs, 'after_first'))
    return rows


def _row(name: str, rs: list[dict], dense: list[dict], key: str) -> dict:
    row = {'variant': name, 'timed': 'after the pruning step' if key == 'after_first' else 'all'}
    for clk in ['', 'cpu_']:
        ratios = [r['times'][clk + key] / d['times'][clk + key] for r, d in zip(rs, dense)]
        row.update({clk + 'seconds': statistics.median(r['times'][clk + key] for r in rs),
                    clk + 'ratio': statistics.median(ratios), clk + 'ratios': ratios})
    shares = [r['times']['callback_' + key] / r['times'][key] for r in rs]
    return {**row, 'callback_share': statistics.median(shares), 'callback_shares': shares,
            'sparsity': rs[-1]['sparsity'], 'memory_bytes': rs[-1]['memory_bytes']}


def device_name(dev: torch.device) -> str:
    if dev.type == 'cuda': return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_train(res: dict) -> str:
    "The plain table: medians, and medians of the per-repeat ratios to dense (also in CPU time on a CPU device)."
    c = res['config']
    unit = 'step' if c['mode'] == 'step' else 'epoch'
    cpu = c['device'] == 'cpu'
    what = (f"{c['steps']} steps on one synthetic batch" if c['mode'] == 'step'
            else f"fastai fit of {c['epochs']} epochs on digits")
    lines = [f"{c['arch']} at {c['size']} px, batch {c['bs']}, {what}; {c['device_name']}, torch {c['torch']}",
             f"median of {c['repeats']} repeats, variants interleaved {'batch by batch' if c['interleave'] == 'batch' else 'fit by fit'}; "
             f"sparsity {c['sparsity']}% (weight, large_final); masks recomputed when the target moved more than "
             f"max_lag={c['policy']['max_lag']:g} of its span"
             + (f", every {c['policy']['frequency']} steps" if c['policy']['frequency'] else '') + " and at each epoch's end"
             + ("; '(f=100)': every 100 steps and at each epoch's end, no lag bound (the old default)"
                if any('(f=100)' in r['variant'] for r in res['rows']) else '')]
    head = f"{'variant':<22}{'s/' + unit:>10}{'x dense':>9}"
    if cpu: head += f"{'cpu s/' + unit:>14}{'x dense':>9}{'in callback':>13}"
    head += f"{'sparsity':>10}{'mask bytes':>13}{'copy bytes':>12}"
    lines += [head, '-' * len(head)]
    for r in res['rows']:
        mem = r['memory_bytes'] or {}
        line = f"{r['variant']:<22}{r['seconds']:>10.3f}{r['ratio']:>9.3f}"
        if cpu: line += f"{r['cpu_seconds']:>14.3f}{r['cpu_ratio']:>9.3f}{100 * r['callback_share']:>12.2f}%"
        lines.append(line + f"{r['sparsity']:>9.2f}%{mem.get('masks', 0):>13,}{mem.get('weight_copies', 0):>12,}")
    if any(r['timed'] != 'all' for r in res['rows']):
        lines.append(f"steady: the {unit}s after the one-shot pruning step, against the same {unit}s of the dense runs "
                     "('dense, after first')")
    if cpu: lines.append(f"in callback: share of the {unit} spent in SparsifyCallback's own events (wall clock)")
    lines += res['notes']
    return '\n'.join(lines)


# ---- selection micro-benchmark ----
def run_select_bench(n: int = 100_000_000, device: str = 'auto', repeats: int = 5, sparsity: float = SPARSITY,
                     reference: bool | None = None) -> dict:
    "Median time to pick the exact `sparsity`% lowest of `n` random scores: the threshold, and the full mask."
    from .selection import _kth_smallest, lowest_k
    from .sparsifier import n_to_prune
    dev = pick_device(device)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0)).to(dev)
    k = max(1, n_to_prune(sparsity, n))
    cases = {'threshold (_kth_smallest)': lambda: _kth_smallest(scores, k),
             'exact mask (lowest_k)': lambda: lowest_k(scores, k)}
    if dev.type == 'cpu' if reference is None else reference:  # kthvalue: the plain way, too slow on CUDA
        cases['reference (torch.kthvalue)'] = lambda: scores.kthvalue(k).values
    rows = []
    for name, f in cases.items():
        f(); sync(dev)  # warm-up
        ts = []
        for _ in range(repeats):
            t = time.perf_counter(); f(); sync(dev); ts.append(time.perf_counter() - t)
        rows.append({'method': name, 'ms': 1e3 * statistics.median(ts), 'all_ms': [1e3 * t for t in ts]})
    return {'config': {'n': n, 'k': k, 'device': str(dev), 'device_name': device_name(dev), 'repeats': repeats,
                       'torch': torch.__version__}, 'rows': rows}


def format_select(res: dict) -> str:
    c = res['config']
    lines = [f"selection of the {c['k']:,} lowest of {c['n']:,} scores; {c['device_name']}, torch {c['torch']}; "
             f"median of {c['repeats']}", f"{'method':<30}{'ms':>12}", '-' * 42]
    lines += [f"{r['method']:<30}{r['ms']:>12.3f}" for r in res['rows']]
    return '\n'.join(lines)


# ---- compaction: what removing pruned channels buys ----
def _round_tos(spec: str) -> list[int | None]:
    "'none,8,16' -> [None, 8, 16]."
    out = []
    for v in spec.split(','):
        v = v.strip().lower()
        if not v: continue
        if v == 'none': out.append(None); continue
        if not v.isdigit() or int(v) < 1: raise SystemExit(f"--round-to={spec!r}: each value must be 'none' or a positive integer")
        out.append(int(v))
    return out or [None]


def _batch_sizes(spec: str) -> list[int]:
    "'1,32' -> [1, 32]."
    try: out = [int(v) for v in spec.split(',') if v.strip()]
    except ValueError: out = []
    if not out or min(out) < 1: raise SystemExit(f"--batch-sizes={spec!r} must be positive integers, such as 1,32")
    return out


def run_compact_bench(archs=('resnet18', 'resnet50'), size: int = 224, sparsity: float = 50, round_tos=(None,),
                      batch_sizes=(1, 32), runs: int = 10, warmup: int = 2, log=None) -> dict:
    """For each torchvision `arch` (untrained, 1000 classes): prune `sparsity`% of each coupled channel group (local,
    large_final; per `round_to`), compact, check the outputs, count MACs and measure CPU latency, the dense model and
    every compacted variant taking turns run by run (median of `runs`)."""
    import torchvision.models as tvm
    from .compact import compact, count_macs, measure_latency, max_relative_difference, _outputs
    from .sparsifier import Sparsifier
    rows = []
    for arch in archs:
        if not hasattr(tvm, arch): raise SystemExit(f"--archs: {arch!r} is not a torchvision model")
        torch.manual_seed(0)
        dense = getattr(tvm, arch)().eval()
        x = torch.randn(2, 3, size, size)
        smalls = {}
        for r in round_tos:
            masked = __import__('copy').deepcopy(dense)
            Sparsifier(masked, 'filter', 'local', 'large_final', round_to=r, coupled=True, example_inputs=x).prune(sparsity)
            small = compact(masked, x).eval()
            err = max_relative_difference(_outputs(masked, x), _outputs(small, x))
            smalls[r] = (small, err)
            del masked
        macs_dense, macs = count_macs(dense, x[:1]), {r: count_macs(s, x[:1]) for r, (s, _) in smalls.items()}
        lat = {}
        for bs in batch_sizes:
            xb = torch.randn(bs, 3, size, size)
            models = {'dense': dense, **{f'round_to={r}': s for r, (s, _) in smalls.items()}}
            lat[bs] = measure_latency(models, xb, runs=runs, warmup=warmup)
            if log: log(json.dumps({'arch': arch, 'bs': bs, 'ms': {k: 1e3 * v for k, v in lat[bs].items()}}))
        n_dense = sum(p.numel() for p in dense.parameters())
        for r, (small, err) in smalls.items():
            row = {'arch': arch, 'round_to': r, 'params': sum(p.numel() for p in small.parameters()), 'params_dense': n_dense,
                   'macs': macs[r], 'macs_dense': macs_dense, 'max_rel_diff': err}
            row['mac_ratio'] = row['macs_dense'] / row['macs']
            for bs in batch_sizes:
                row[f'ms_dense_bs{bs}'] = 1e3 * lat[bs]['dense']
                row[f'ms_small_bs{bs}'] = 1e3 * lat[bs][f'round_to={r}']
                row[f'speedup_bs{bs}'] = lat[bs]['dense'] / lat[bs][f'round_to={r}']
            rows.append(row)
    return {'config': {'size': size, 'sparsity': sparsity, 'batch_sizes': list(batch_sizes), 'runs': runs,
                       'threads': torch.get_num_threads(), 'device': device_name(torch.device('cpu')),
                       'torch': torch.__version__}, 'rows': rows}


def format_compact(res: dict) -> str:
    c = res['config']
    bss = c['batch_sizes']
    head = f"{'arch':<14}{'round_to':>9}{'params':>14}{'MACs ratio':>11}" + ''.join(
        f"{f'dense ms bs{b}':>14}{f'small ms bs{b}':>14}{f'speedup bs{b}':>13}" for b in bss) + f"{'max rel diff':>13}"
    lines = [f"{c['sparsity']:g}% of each coupled channel group pruned and removed; {c['size']} px; {c['device']}; median of {c['runs']} interleaved runs; torch {c['torch']}", head, '-' * len(head)]
    for r in res['rows']:
        lines.append(f"{r['arch']:<14}{str(r['round_to']):>9}{r['params']:>14,}{r['mac_ratio']:>10.2f}x" + ''.join(
            f"{r[f'ms_dense_bs{b}']:>14.1f}{r[f'ms_small_bs{b}']:>14.1f}{r[f'speedup_bs{b}']:>12.2f}x" for b in bss)
            + f"{r['max_rel_diff']:>13.1e}")
    return '\n'.join(lines)


# ---- command line ----
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m fasterai_sched.bench', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', nargs='?', default='train', choices=['train', 'select', 'compact'],
                   help="'train' (default): dense vs sparsified training; 'select': the selection micro-benchmark; "
                        "'compact': dense vs compacted inference latency against the MAC ratio")
    p.add_argument('--mode', choices=['fit', 'step'], default=None,
                   help="'fit': fastai fits on digits, per-epoch times (default on CPU); 'step': synthetic batches, "
                        "per-step times (default on CUDA)")
    p.add_argument('--arch', choices=['resnet18', 'resnet50'], default=None,
                   help="default: resnet18 in mode 'fit', resnet50 in mode 'step'")
    p.add_argument('--size', type=int, default=None, help="image size in px (default: 32 in 'fit', 224 in 'step')")
    p.add_argument('--bs', type=int, default=64, help='batch size (default 64)')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--steps', type=int, default=30, help="training steps per run in mode 'step' (default 30)")
    p.add_argument('--epochs', type=int, default=3, help="epochs per fit in mode 'fit' (default 3)")
    p.add_argument('--repeats', type=int, default=3, help='interleaved repeats; the table holds medians (default 3)')
    p.add_argument('--variants', default=None,
                   help=f"comma-separated, from {list(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)}, "
                        "plus fasterai's when it is installed)")
    p.add_argument('--frequency', type=int, default=None, help="SparsifyCallback's frequency (default: its own)")
    p.add_argument('--max-lag', type=float, default=None, help="SparsifyCallback's max_lag (default: its own)")
    p.add_argument('--interleave', choices=['batch', 'run'], default=None,
                   help="'batch': the variants' fits run at once, taking turns batch by batch (default on CPU); "
                        "'run': one fit after the other (default on CUDA)")
    p.add_argument('--no-warmup', action='store_true', help='skip the discarded first dense run')
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads (default: torch's own); 1 avoids stalls when other jobs share the cores")
    p.add_argument('--n', type=int, default=100_000_000, help="'select': number of scores (default 100,000,000)")
    p.add_argument('--archs', default='resnet18,resnet50', help="'compact': torchvision models (default resnet18,resnet50)")
    p.add_argument('--sparsity', type=float, default=None, help="'compact': percent of each coupled group's channels (default 50)")
    p.add_argument('--round-to', default='none', help="'compact': comma-separated round_to values, 'none' for none (default none)")
    p.add_argument('--batch-sizes', default='1,32', help="'compact': comma-separated batch sizes (default 1,32)")
    p.add_argument('--runs', type=int, default=10, help="'compact': timed runs per model and batch size (default 10)")
    p.add_argument('--json', action='store_true', help='print JSON instead of the table')
    p.add_argument('-v', '--verbose', action='store_true', help='log each run to stderr, one JSON line per run')
    return p


# the options each command reads; given to another command, an option is an error rather than ignored
_READS = {'train': {'mode', 'arch', 'size', 'bs', 'device', 'steps', 'epochs', 'repeats', 'variants', 'frequency',
                    'max_lag', 'interleave', 'no_warmup'},
          'select': {'n', 'device', 'repeats'},
          'compact': {'archs', 'size', 'sparsity', 'round_to', 'batch_sizes', 'runs'}}


def _check(args: argparse.Namespace, mode: str | None = None, variants=()) -> None:
    "Raise (SystemExit, naming the option) for a value out of range or an option this command would not read."
    defaults = vars(_parser().parse_args([args.what]))
    reads = _READS[args.what] | {'what', 'threads', 'json', 'verbose'}
    if mode: reads -= {'steps' if mode == 'fit' else 'epochs'}
    unread = [k for k, v in vars(args).items() if k not in reads and v != defaults[k]]
    if unread:
        k = unread[0]
        where = f"'{args.what}'" + (f" in mode '{mode}'" if mode else '')
        raise SystemExit(f"--{k.replace('_', '-')}={getattr(args, k)!r} does not apply to {where}; it reads "
                         + ', '.join(f"--{o.replace('_', '-')}" for o in sorted(reads - {'what'})))
    for k in ('threads', 'n', 'repeats', 'runs', 'bs', 'steps', 'epochs', 'size'):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise SystemExit(f"--{k}={getattr(args, k)} must be at least 1")
    if args.sparsity is not None and not 0 <= args.sparsity < 100:
        raise SystemExit(f"--sparsity={args.sparsity:g} must be a percent in [0, 100)")
    own = [v for v in variants if v in POLICY]
    for k in ('frequency', 'max_lag'):
        if getattr(args, k) is not None and own:
            raise SystemExit(f"--{k.replace('_', '-')}={getattr(args, k)!r} does not apply to variant {own[0]!r}, "
                             f"which has its own policy {POLICY[own[0]]}")


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    _check(args)
    if args.threads is not None: torch.set_num_threads(args.threads)
    if args.what == 'select':
        res = run_select_bench(args.n, args.device, args.repeats)
        print(json.dumps(res, indent=1) if args.json else format_select(res))
        return res
    if args.what == 'compact':
        log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
        res = run_compact_bench([a.strip() for a in args.archs.split(',') if a.strip()], args.size or 224, 50 if args.sparsity is None else args.sparsity,
                                _round_tos(args.round_to), _batch_sizes(args.batch_sizes), runs=args.runs, log=log)
        print(json.dumps(res, indent=1) if args.json else format_compact(res))
        return res
    dev = pick_device(args.device)
    mode = args.mode or ('step' if dev.type == 'cuda' else 'fit')
    arch = args.arch or ('resnet50' if mode == 'step' else 'resnet18')
    size = args.size or (224 if mode == 'step' else 32)
    if args.variants: variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    else: variants = DEFAULT_VARIANTS + ['fasterai agp local', 'fasterai agp global', 'fasterai steady']
    _check(args, mode, variants)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
    res = run_train_bench(mode, arch, size, args.bs, args.device, args.steps, args.epochs, args.repeats, variants,
                          args.frequency, not args.no_warmup, log, args.interleave, args.max_lag)
    print(json.dumps(res, indent=1) if args.json else format_train(res))
    return res


if __name__ == '__main__': main()
