"""Schedules: functions `f(start, end, pos) -> sparsity` for `pos` in [0, 1], each carrying its default window of
training (fasterai's `Schedule`), and plots of them."""
from __future__ import annotations
import functools, math
from fractions import Fraction
from numbers import Real
from typing import Callable, Sequence
from fastai.callback.schedule import sched_cos, sched_lin

__all__ = ['Schedule', 'one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd', 'acdc', 'sched_oneshot',
           'sched_iterative', 'sched_agp', 'sched_onecycle', 'sched_dsd', 'sched_acdc', 'schedules',
           'available_schedules', 'SCHEDULES', 'plot_schedules', 'schedule_window', 'window_target']


# ---- the shapes: f(start, end, pos), pos in [0, 1] of the schedule's window ----
def sched_oneshot(start: float, end: float, pos: float) -> float:
    "One shot: `end` wherever it is asked inside its window (the window's start is the moment of pruning)."
    return float(end)


def sched_iterative(start: float, end: float, pos: float, n_steps: int = 3) -> float:
    "`n_steps` equal steps, each taken as soon as its part of the window begins."
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be a positive integer")
    if pos >= 1: return float(end)  # exactly `end`: start + (end - start) * 1 can miss it by a rounding
    # round first so that pos*n_steps landing a hair above an integer does not take the next step early
    return start + (end - start) * math.ceil(round(pos * n_steps, 9)) / n_steps


def sched_agp(start: float, end: float, pos: float) -> float:
    "Automated Gradual Pruning: cubic, fast at first then slower (Zhu & Gupta, 2017)."
    if pos <= 0: return float(start)  # exactly `start`: end + (start - end) can miss it by a rounding
    return end + (start - end) * (1 - pos) ** 3


def sched_onecycle(start: float, end: float, pos: float, α: float = 14, β: float = 6) -> float:
    "Logistic rise `(1 + e^(β-α)) / (1 + e^(β-α·pos))` of the span, as fasterai draws it; exactly `end` at `pos=1`."
    if pos >= 1: return float(end)
    if pos <= 0: return float(start)  # fasterai's curve starts a hair above (0.25% of the span): exactly `start` here
    return start + (end - start) * (1 + math.exp(β - α)) / (1 + math.exp(β - α * pos))


def _cos(start: float, end: float, pos: float) -> float:
    "Cosine from `start` to `end` (fastai's `sched_cos`)."
    if pos >= 1: return float(end)
    return float(sched_cos(start, end, pos))


def _lin(start: float, end: float, pos: float) -> float:
    "Linear from `start` to `end` (fastai's `sched_lin`)."
    if pos >= 1: return float(end)
    return float(sched_lin(start, end, pos))


def sched_dsd(start: float, end: float, pos: float) -> float:
    "Dense-sparse-dense: cosine up to `end` by `pos=0.5`, then back down to `start` by `pos=1`."
    return _cos(start, end, 2 * pos) if pos <= 0.5 else _cos(end, start, 2 * pos - 1)


def sched_acdc(start: float, end: float, pos: float, n_cycles: int = 3, warmup: float = 0.1, final: float = 0.2) -> float:
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


def _frac(x: float) -> Fraction:
    "A window bound as the fraction it was meant to be (0.2 is 1/5, not the double nearest it)."
    return Fraction(x).limit_denominator(10 ** 9)


def _name(f) -> str:
    if isinstance(f, functools.partial): return _name(f.func)
    return getattr(f, '__name__', type(f).__name__)


class Schedule:
    """A schedule: `sched_func(start, end, pos)` run inside the window `[start_pct, end_pct]` of training (fractions
    of the fit's steps), rising from `start_val` to `end_val` of the span; callable as a plain `f(start, end, pos)`.

    Holds no state: one schedule can drive any number of callbacks at once."""
    def __init__(self, sched_func: Callable, start_pct: float = 0., end_pct: float = 1., start_val: float = 0.,
                 end_val: float = 1.):
        if not callable(sched_func): raise TypeError(f"sched_func={sched_func!r} must be a function f(start, end, pos)")
        for n, v in [('start_pct', start_pct), ('end_pct', end_pct), ('start_val', start_val), ('end_val', end_val)]:
            if isinstance(v, bool) or not isinstance(v, Real) or not 0 <= v <= 1:
                raise ValueError(f"{n}={v!r} must be a number in [0, 1] (a fraction of training or of the target)")
        if not start_pct < end_pct:
            raise ValueError(f"start_pct={start_pct!r} must be below end_pct={end_pct!r}")
        self.sched_func, self.start_pct, self.end_pct = sched_func, float(start_pct), float(end_pct)
        self.start_val, self.end_val = float(start_val), float(end_val)
        self.__name__ = _name(sched_func)
        self.__doc__ = getattr(sched_func, '__doc__', None)

    def __repr__(self):
        return (f"Schedule({self.__name__}, start_pct={self.start_pct:g}, end_pct={self.end_pct:g}"
                + (f", start_val={self.start_val:g}, end_val={self.end_val:g})" if (self.start_val, self.end_val) != (0, 1) else ')'))

    def __call__(self, start: float, end: float, pos: float, **kwargs) -> float:
        """The shape as a plain function of `pos` in a window the caller gives (a callback's epochs replace
        `start_pct`/`end_pct`), to `start_val`/`end_val` of the span: exactly `start` at `pos <= 0`."""
        if pos <= 0: return float(start)
        return self._shape(start, end, pos, **kwargs)

    def _shape(self, start: float, end: float, pos: float, **kwargs) -> float:
        "The value at `pos` of the window, `start_val` to `end_val` of the way from `start` to `end`."
        if (self.start_val, self.end_val) == (0, 1): return float(self.sched_func(start, end, float(pos), **kwargs))
        return start + (end - start) * self.sched_func(self.start_val, self.end_val, float(pos), **kwargs)

    def __reduce__(self):
        "Picklable (learn.export) wherever sched_func is; the built-in schedules unpickle as themselves."
        if SCHEDULES.get(self.__name__) is self: return self.__name__
        return (_rebuild, (self.sched_func, self.start_pct, self.end_pct, self.start_val, self.end_val, self.__name__))

    def _pos(self, pct) -> float | None:
        "Position inside the window for training fraction `pct`, or None before the window opens."
        # a float k/n equals the float of a bound (0.2, 0.5) exactly when the fractions are equal: both are rounded
        # from the same rational, so a window opens at the very step that completes its share of training
        pct = float(pct)
        if pct < self.start_pct: return None
        if pct >= self.end_pct: return 1.
        return (pct - self.start_pct) / (self.end_pct - self.start_pct)

    def at(self, start: float, end: float, pct: float, **kwargs) -> float:
        "Target sparsity once `pct` of training is done: `start` before the window, the shape inside, its end after."
        pos = self._pos(pct)
        return float(start) if pos is None else self._shape(start, end, pos, **kwargs)

    def progress(self, pct: float) -> float:
        "Fraction of the target reached once `pct` of training is done (fasterai's `progress`)."
        pos = self._pos(pct)
        if pos is None: return self.start_val
        return float(self.sched_func(self.start_val, self.end_val, float(pos)))

    def plot(self, target: float = 100, num_points: int = 1000, ax=None):
        "Draw the target over training (normalized to [0, 1]) for a final `target`; returns the axes."
        import matplotlib.pyplot as plt
        if ax is None: _, ax = plt.subplots(figsize=(8, 4))
        xs = [i / (num_points - 1) for i in range(num_points)]
        ax.plot(xs, [self.progress(x) * target for x in xs], label=self.__name__)
        ax.set(xlabel='training iterations (normalized)', ylabel='target', title=repr(self))
        ax.grid(alpha=.3)
        return ax


def _rebuild(sched_func, start_pct, end_pct, start_val, end_val, name) -> Schedule:
    s = Schedule(sched_func, start_pct, end_pct, start_val, end_val)
    s.__name__ = name
    return s


one_shot = Schedule(sched_oneshot, start_pct=0.5)
iterative = Schedule(sched_iterative, start_pct=0.2)
agp = Schedule(sched_agp, start_pct=0.2)
one_cycle = Schedule(sched_onecycle)
cos = Schedule(_cos)
lin = Schedule(_lin)
dsd = Schedule(sched_dsd)
acdc = Schedule(sched_acdc)  # issue 13: over the whole fit by default, as in the paper
one_shot.__name__, one_cycle.__name__, cos.__name__, lin.__name__ = 'one_shot', 'one_cycle', 'cos', 'lin'
iterative.__name__, agp.__name__, dsd.__name__, acdc.__name__ = 'iterative', 'agp', 'dsd', 'acdc'

SCHEDULES = {f.__name__: f for f in [one_shot, iterative, agp, one_cycle, cos, lin, dsd]}
schedules = tuple(SCHEDULES)  # fasterai's list, as fasterai names it
SCHEDULES['acdc'] = acdc  # issue 13: in the library's registry (the main job's --schedules), not in fasterai's list


def available_schedules() -> list[str]:
    "The names of the built-in schedules."
    return list(schedules)


# ---- windows: what the callback uses when start_epoch / end_epoch are not given ----
def _unwrap(f):
    "The Schedule inside `f` (itself, or a partial of it), with the partial's keywords; (None, {}) for a plain function."
    if isinstance(f, Schedule): return f, {}
    if isinstance(f, functools.partial) and isinstance(f.func, Schedule) and not f.args: return f.func, dict(f.keywords)
    return None, {}


def _check_list(schedule: Sequence) -> list:
    items = list(schedule)
    if not items or not all(isinstance(s, Schedule) for s in items):
        raise TypeError(f"schedule={schedule!r}: a list of schedules must hold Schedule objects, such as "
                        "[Schedule(sched_agp, 0, 0.5, 0, 0.5), Schedule(sched_lin, 0.5, 1, 0.5, 1)]")
    for a, b in zip(items, items[1:]):
        if _frac(a.end_pct) != _frac(b.start_pct):
            raise ValueError(f"schedule: the windows of a list must follow each other; {a!r} ends at {a.end_pct:g} "
                             f"but {b!r} starts at {b.start_pct:g}")
    return items


def schedule_window(schedule) -> tuple[float, float]:
    "The fractions of training `(start_pct, end_pct)` a schedule prunes in by default; (0, 1) for a plain function."
    if isinstance(schedule, (list, tuple)):
        items = _check_list(schedule)
        return items[0].start_pct, items[-1].end_pct
    s, _ = _unwrap(schedule)
    return (0., 1.) if s is None else (s.start_pct, s.end_pct)


def window_target(schedule, start: float, end: float, pct: float) -> float:
    "Target sparsity once `pct` of training is done, each schedule in its own window; a list runs its windows in turn."
    if isinstance(schedule, (list, tuple)):
        items = _check_list(schedule)
        current = items[0]
        for s in items:
            if float(pct) >= s.start_pct: current = s
        return current.at(start, end, pct)
    s, kw = _unwrap(schedule)
    if s is not None: return s.at(start, end, pct, **kw)
    if pct <= 0: return float(start)
    return schedule(start, end, min(1., float(pct)))


def _label(f) -> str:
    name = _name(f) if not isinstance(f, Schedule) else f.__name__
    if isinstance(f, functools.partial) and isinstance(f.func, Schedule): name = f.func.__name__
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
