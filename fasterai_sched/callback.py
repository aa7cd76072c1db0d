"""SparsifyCallback: fastai events -> training progress -> target sparsity -> Sparsifier."""
from __future__ import annotations
import math
from fractions import Fraction
from numbers import Real
from pathlib import Path
import json, sys, uuid, warnings
from typing import Callable
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder
from fastai.learner import Learner, SkipToEpoch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import rank_distrib
from fastcore.basics import store_attr
import contextlib, random
import numpy as np
from .criteria import Criteria, large_final
from .granularity import get_granularity
from .schedules import one_shot, schedule_window, window_target
from .sparsifier import Sparsifier, check_sparsity, n_to_prune, prunable_layers, unwrap_model, warn_if_fraction
from .report import sparsity_report
from .compact import compact as compact_model

__all__ = ['SparsifyCallback']

_UNSET = object()
MAX_LAG = 0.05  # default share of the schedule's span the masks may be off the target by (docs/performance.md)


def _pick(name: str, value, alias: str, alias_value, default):
    "One of two spellings of an argument; both given is an error."
    if value is not _UNSET and alias_value is not _UNSET:
        raise TypeError(f"pass either {name} or {alias}, not both ({name}={value!r}, {alias}={alias_value!r})")
    if value is not _UNSET: return value
    return default if alias_value is _UNSET else alias_value


def _check_int(name: str, value, low: int = 0, allow_none: bool = False):
    if value is None and allow_none: return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}" + (" or None" if allow_none else ""))
    return value


def _check_options(model, lth, reset_end, save_tickets, verbose, seed, rewind_epoch, start_epoch, start_sparsity, nm=False):
    "Raise on a flag that is not a bool, or on an option that would be ignored in this combination."
    for name, value in [('lth', lth), ('reset_end', reset_end), ('save_tickets', save_tickets), ('verbose', verbose),
                        ('nm', nm)]:
        if not isinstance(value, bool): raise TypeError(f"{name}={value!r} must be True or False")
    if isinstance(seed, bool) or not isinstance(seed, int): raise TypeError(f"seed={seed!r} must be an integer")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model={model!r} must be None (the learner's model) or an nn.Module")
    if rewind_epoch and not (lth or reset_end):
        raise ValueError(f"rewind_epoch={rewind_epoch} has no effect without lth=True or reset_end=True")
    if start_epoch is None: return  # the schedule's own window: checked in before_fit, where the fit's length is known
    first = start_epoch if start_sparsity == 0 else 0  # the epoch of the first mask change
    if lth and rewind_epoch > first:
        raise ValueError(f"with lth=True, rewind_epoch={rewind_epoch} must be <= {first}, the epoch pruning starts "
                         f"(start_epoch={start_epoch}, start_sparsity={start_sparsity}): earlier masks could not be rewound")


def _check_structure(coupled, compact, granularity, model):
    "Raise on a bad `coupled` or `compact` flag, or one that cannot apply to the other arguments."
    for name, value in [('coupled', coupled), ('compact', compact)]:
        if not isinstance(value, bool): raise TypeError(f"{name}={value!r} must be True or False")
    if coupled and getattr(granularity, 'name', granularity) != 'filter':
        raise ValueError(f"coupled=True prunes whole output channels: it needs granularity='filter', got granularity={granularity!r}")
    if compact and not coupled:
        raise ValueError("compact=True needs coupled=True: only channels pruned in coupled groups can be removed")
    if compact and model is not None:
        raise ValueError("compact=True replaces learn.model after the fit: it needs model=None (the learner's model)")


@contextlib.contextmanager
def _random_states_kept(dl):
    "Draw from `dl` without changing any random state: python's, numpy's, torch's (CUDA too) and the loader's own."
    py, npy, dl_rng = random.getstate(), np.random.get_state(), getattr(dl, 'rng', None)
    dl_state = dl_rng.getstate() if dl_rng is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices): yield
    finally:
        random.setstate(py); np.random.set_state(npy)
        if dl_rng is not None: dl.rng = dl_rng; dl_rng.setstate(dl_state)


def _nm_granularity(nm, granularity):
    "fasterai's `nm=True` switch: the '2:4' granularity (pruning a group keeps its 2 best weights of 4)."
    if not nm: return granularity
    if granularity not in ('weight', '2:4'):
        raise ValueError(f"nm=True means granularity='2:4'; it cannot be combined with granularity={granularity!r}")
    return '2:4'


class SparsifyCallback(Callback):
    """Prune `layer_type` layers during `fit` following `schedule`, from `start_sparsity` to `sparsity` percent.

    Masks follow the target: after every step the masked sparsity is within `max_lag` of the schedule's span
    (`start_sparsity` to `sparsity`) of the target, on few steps or many. A recompute takes the target of the latest
    step of the epoch that keeps every target until then within that band (the masks lead the target, then trail
    it), and the next comes when the target leaves the band; also at each epoch's last step (a catch-up of at most
    `max_lag`, so the epoch lines are exact) and, with `frequency`, every `frequency` steps. `max_lag=None` drops the
    band: masks change only at those points and where pruning starts or ends. Only when the unit counts change;
    between recomputes a step only re-applies the masks.

    `coupled=True` (granularity 'filter') prunes channels in the coupled groups traced from one batch of `learn.dls`;
    `compact=True` then hands back `learn.model` without the pruned channels, with a new optimizer."""
    order = 70  # after MixedPrecision has unscaled the gradients; prints after the progress table's row
    # the weight copies a resumed fit needs go to learn.path/learn.model_dir/{state_fname}_{run}.pth, one file per run,
    # with {state_fname}_{run}.json saying which weights each epoch ended with; None writes nothing (and cannot resume them)
    state_fname = 'sparsify_state'

    def __init__(self, sparsity=_UNSET, granularity: str = 'weight', context: str = 'local',
                 criteria: Criteria = large_final, schedule: Callable = _UNSET, start_sparsity: float = 0,
                 start_epoch: int | None = None, end_epoch: int | None = None, lth: bool = False, rewind_epoch: int = 0,
                 reset_end: bool = False, save_tickets: bool = False, model: nn.Module | None = None,
                 round_to: int | None = None, layer_type: type = nn.Conv2d, verbose: bool = True,
                 max_lag: float | None = MAX_LAG, frequency: int | None = None, seed: int = 0, end_sparsity=_UNSET,
                 sched_func=_UNSET, nm: bool = False, coupled: bool = False, compact: bool = False):
        sparsity = _pick('sparsity', sparsity, 'end_sparsity', end_sparsity, _UNSET)
        if sparsity is _UNSET: raise TypeError("SparsifyCallback needs sparsity (or end_sparsity), a percent such as 90")
        schedule = _pick('schedule', schedule, 'sched_func', sched_func, one_shot)
        # any numbers.Real (Fraction, numpy scalars) is kept as a float: it formats and computes as the user meant
        if isinstance(sparsity, (list, tuple)):  # fasterai's per-layer list, in the order of the model's layers
            if context != 'local': raise ValueError(f"sparsity as a list needs context='local', got context={context!r}")
            sparsity = [check_sparsity(v, f"sparsity[{i}]") for i, v in enumerate(sparsity)]
        elif isinstance(sparsity, dict):
            if context != 'local': raise ValueError(f"sparsity as a dict needs context='local', got context={context!r}")
            sparsity = {k: check_sparsity(v, f"sparsity[{k!r}]") for k, v in sparsity.items()}
        else: sparsity = check_sparsity(sparsity)
        given_start, start_sparsity = start_sparsity, check_sparsity(start_sparsity, 'start_sparsity')
        if isinstance(schedule, (list, tuple)): schedule_window(schedule)  # raises on a list that does not compose
        elif not callable(schedule): raise TypeError(f"schedule={schedule!r} must be a function f(start, end, pos)")
        granularity = _nm_granularity(nm, granularity)
        # fail on a bad criteria, layer_type or round_to now, not once training has started
        Sparsifier.check_args(context, criteria, layer_type, round_to)
        get_granularity(granularity, layer_type)  # raises on an unknown name, listing the valid ones
        _check_int('start_epoch', start_epoch, allow_none=True); _check_int('end_epoch', end_epoch, 1, allow_none=True)
        _check_int('rewind_epoch', rewind_epoch); _check_int('frequency', frequency, 1, allow_none=True)
        if max_lag is not None and (isinstance(max_lag, bool) or not isinstance(max_lag, Real) or not 0 <= max_lag <= 1):
            raise ValueError(f"max_lag={max_lag!r} must be a share of the schedule's span in [0, 1] (0.05 keeps the "
                             f"masks within 5% of start_sparsity -> sparsity of the target) or None (no such bound)")
        if end_epoch is not None and end_epoch <= (start_epoch or 0):
            raise ValueError(f"end_epoch={end_epoch} must be after start_epoch={start_epoch or 0}")
        # given epochs win; with neither, the schedule's own window of training applies (fasterai's defaults)
        own_window = start_epoch is None and end_epoch is None
        _check_options(model, lth, reset_end, save_tickets, verbose, seed, rewind_epoch,
                       None if own_window else (start_epoch or 0), given_start, nm)
        _check_structure(coupled, compact, granularity, model)
        pairs = (sparsity.items() if isinstance(sparsity, dict) else enumerate(sparsity) if isinstance(sparsity, list)
                 else None)
        for name, value in ([(f"sparsity[{k!r}]", v) for k, v in pairs] if pairs is not None else [('sparsity', sparsity)]):
            warn_if_fraction(value, name)
        store_attr('sparsity,granularity,context,criteria,schedule,start_sparsity,start_epoch,end_epoch,lth,'
                   'rewind_epoch,reset_end,save_tickets,round_to,layer_type,verbose,max_lag,frequency,seed,nm,'
                   'coupled,compact')
        if compact:  # known now: a run that ends dense would fail after its whole fit, with nothing to remove
            ends = [window_target(schedule, start_sparsity, v, 1.) for v in
                    (sparsity.values() if isinstance(sparsity, dict) else sparsity if isinstance(sparsity, list) else [sparsity])]
            if not any(ends):
                raise ValueError(f"compact=True: this schedule ends at 0% (sparsity={sparsity!r}, schedule="
                                 f"{getattr(schedule, '__name__', schedule)!r}), so no channel would be left to remove")
        self.target_model, self.sparsifier, self.history, self._steps_in_epoch = model, None, [], 0
        self._own_window, self.current_sparsity = own_window, start_sparsity
        self.active, self._pending, self._saw_epoch, self._unmasked, self._run, self._prints = False, False, False, False, None, {}
        self._nested = 0

    # ---- helpers ----
    def _print(self, *args):
        if self.verbose and rank_distrib() == 0: print(*args)

    def _end_value(self) -> float:
        if isinstance(self.sparsity, list): return max(self.sparsity, default=0)
        return self._overall(self.sparsity)

    def _overall(self, target) -> float:
        "A target as one percent: per-layer targets (an allocation) give the share of all pruned layers' weights they ask for."
        if not isinstance(target, dict): return target
        sp = self.sparsifier
        if sp is None: return max(target.values(), default=0)
        sizes = {n: m.weight.numel() for n, m in sp.layers.items()}
        return round(sum(target.get(n, 0) * k for n, k in sizes.items()) / sum(sizes.values()), 4)

    def _target(self, step: int):
        "Target sparsity after `step` training steps of this fit (a number, or a dict per layer)."
        if self._own_window:  # the schedule's window, as a fraction of all the fit's steps
            pct = step / (self.n_iter_fit * self._n_epoch)
            if isinstance(self.sparsity, dict):
                return {n: self._scheduled(self.start_sparsity, s, pct, True) for n, s in self.sparsity.items()}
            return self._scheduled(self.start_sparsity, self.sparsity, pct, True)
        k0, k1 = self._start_epoch * self.n_iter_fit, self._end_epoch * self.n_iter_fit
        if step <= k0:  # before the window: start_sparsity, whatever the schedule would say
            return {n: self.start_sparsity for n in self.sparsity} if isinstance(self.sparsity, dict) else self.start_sparsity
        pos = min(1., (step - k0) / (k1 - k0))
        if isinstance(self.sparsity, dict):
            return {n: self._scheduled(self.start_sparsity, s, pos) for n, s in self.sparsity.items()}
        return self._scheduled(self.start_sparsity, self.sparsity, pos)

    def _scheduled(self, start, end, pos, own_window: bool = False) -> float:
        "The schedule's value at `pos` of the epoch window, or at `pos` of training in the schedule's own window."
        try:
            if own_window: value = window_target(self.schedule, start, end, pos)
            elif isinstance(self.schedule, (list, tuple)): value = window_target(self.schedule, start, end, pos)
            else: value = self.schedule(start, end, pos)
        except TypeError as e:
            raise TypeError(f"schedule={getattr(self.schedule, '__name__', self.schedule)!r} failed when called as "
                            f"f(start, end, pos): {e}") from e
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 100:
            raise ValueError(f"schedule={getattr(self.schedule, '__name__', self.schedule)!r} returned {value!r} at "
                             f"pos={pos:.4f}; a schedule must return a percentage in [0, 100]")
        return float(value)

    def _counts(self, target) -> tuple:
        "The unit counts `target` asks for: masks only change when these do."
        sp = self.sparsifier
        if isinstance(target, dict): return tuple(n_to_prune(target.get(n, 0), u) for n, u in sp.n_units.items())
        if self.context == 'global': return (n_to_prune(target, sum(sp.n_units.values())),)
        return tuple(n_to_prune(target, u) for u in sp.n_units.values())

    def _save_dir(self) -> Path:
        return Path(self.learn.path) / self.learn.model_dir

    # ---- fastai events ----
    def _in_validation(self) -> bool:
        """Events of an inference pass: fastai's `validate`, `get_preds`, `predict` and `show_results` send them holding
        `learn.lock`; `summary` and `tta` do not, and are recognised inside our fit by `_nested`."""
        if getattr(self, '_nested', 0): return True
        lock = getattr(self.learn, 'lock', None)
        return lock is not None and lock.locked()

    @staticmethod
    def _sent_by_fit() -> bool:
        "Whether this event was sent by `Learner.fit` itself (not by `summary` or `tta`, which also send `before_fit`)."
        f = sys._getframe(1)
        while f is not None and f.f_code is not Learner.__call__.__code__: f = f.f_back
        sender = f and f.f_back
        return bool(sender and sender.f_code is Learner._with_events.__code__ and sender.f_back
                    and sender.f_back.f_code is Learner.fit.__code__)

    def before_fit(self):
        """A pruning run starts here when `Learner.fit` sent the event. fastai also sends it in `validate`, `get_preds`,
        `summary` and `tta`, where nothing of ours happens; a fit that reaches us by another path starts the run at its
        first training phase (`before_train`), which only a training fit has."""
        if self._in_validation(): return  # inside our training fit too (a logger's validate): nothing of ours changes
        by_fit = self._sent_by_fit()
        if self.active and not by_fit:  # summary or tta from a callback of our running fit
            self._nested += 1; return
        self.active, self._saw_epoch, self._unmasked, self._nested = False, False, False, 0
        # lr_find's mock training is no fit of ours: it neither prunes nor prints
        self._pending = not any(isinstance(cb, LRFinder) for cb in self.learn.cbs)
        if self._pending and by_fit and self.learn.n_epoch > 0:
            self._pending = False
            self._start_run()

    def before_epoch(self):
        if not self._in_validation(): self._saw_epoch = True

    def before_train(self):
        if self._in_validation(): return
        if self._pending:
            self._pending = False
            self._start_run()
        if self.active: self._rewind_point()

    def _start_run(self):
        "Set up a pruning run for this training fit: check the epochs, build the masks, print the header."
        model = unwrap_model(self.target_model or self.learn.model)
        # a fit where every pruned weight is frozen (fine_tune's first phase) trains nothing to prune; its epoch
        # count says nothing of the unfrozen fit's, so the epoch arguments are checked there
        pruned = list(prunable_layers(model, self.layer_type).values())  # raises on computed and lazy weights
        if pruned and not any(m.weight.requires_grad for m in pruned):
            self._print("Pruned layers are frozen in this fit: pruning waits for an unfrozen one")
            return
        n_epoch = self._n_epoch = self.learn.n_epoch
        self._start_epoch = self.start_epoch or 0
        if self._start_epoch >= n_epoch:
            raise ValueError(f"start_epoch={self.start_epoch} is past the end of this fit of {n_epoch} epochs "
                             f"(allowed: 0 to {n_epoch - 1})")
        if self._own_window: self._check_rewind_in_window(n_epoch)
        self._end_epoch = self.end_epoch or n_epoch
        if self._end_epoch > n_epoch:
            raise ValueError(f"end_epoch={self.end_epoch} is past the end of this fit of {n_epoch} epochs")
        if (self.lth or self.reset_end) and self.rewind_epoch >= n_epoch:
            raise ValueError(f"rewind_epoch={self.rewind_epoch} is past the end of this fit of {n_epoch} epochs "
                             f"(allowed: 0 to {n_epoch - 1})")
        self._resume_at = self._resume_epoch()
        # each fit is a new pruning run, as with a fresh callback; only a resumed fit keeps this one's weight copies
        fresh = self.sparsifier is None or self.sparsifier.model is not model or not self._resume_at
        if fresh:
            # activation criteria (wanda) calibrate on the learner's first training batches
            data = self.learn.dls.train if getattr(self.criteria, 'needs_data', False) else None
            self.sparsifier = Sparsifier(model, self.granularity, self.context, self.criteria, self.layer_type,
                                         self.round_to, self.seed, nm=self.nm, data=data, coupled=self.coupled,
                                         example_inputs=self._example_inputs)
        else: self.sparsifier.to()
        sp = self.sparsifier
        if isinstance(self.sparsity, list): self.sparsity = sp._per_layer(self.sparsity)
        # masks always come from the zeros of the weights as they are now (a checkpoint may have been loaded); in a new
        # run, zeros it finds (a zero-initialised layer) were never pruned by it, so they are never re-initialised
        if not fresh or any((m.weight == 0).any() for m in sp.layers.values()):
            sp.masks_from_weights(pruned=bool(self._resume_at))
        frozen = [n for n, m in sp.layers.items() if not m.weight.requires_grad]
        if sp.criteria.needs_grad and frozen:
            raise ValueError(f"criteria {sp.criteria.name} scores weights by their gradients, but layer {frozen[0]!r} is "
                             f"frozen (requires_grad=False) and gets none: unfreeze it, or choose another criteria")
        if isinstance(self.sparsity, dict): sp._targets_per_layer(self.sparsity)  # layer names checked before training
        finite = torch.stack([m.weight.isfinite().all() for m in sp.layers.values()]).tolist()
        bad = [n for n, ok in zip(sp.layers, finite) if not ok]
        if bad: raise ValueError(f"layer {bad[0]!r} has NaN or Inf weights: they cannot be ranked for pruning")
        # a criteria's NaN or Inf scores raise now, before training changes any weight (pruning may start late in the fit)
        if not (sp.criteria.needs_grad or getattr(sp.criteria, 'needs_data', False)): sp.scores()
        for i in range(101): self._target_probe(i / 100)
        self.n_iter_fit = len(self.learn.dls.train)
        self._current = self._counts_now()
        self._mask_target = None  # the masks' target is not known until this fit's first recompute
        self._steps_in_epoch, self.history = 0, []
        self._keep_or_read_state(fresh)
        self._mark_weights()
        self.active, self._trained = True, False
        self._print(f"Pruning of {self.granularity} until a sparsity of {self._fmt(self._end_value())}%")

    def _check_rewind_in_window(self, n_epoch: int):
        "With the schedule's own window, lth's rewind epoch must not come after the epoch where masks first change."
        if not self.lth or not self.rewind_epoch: return
        n_iter = len(self.learn.dls.train)
        total = n_epoch * n_iter
        p0 = schedule_window(self.schedule)[0] if self.start_sparsity == 0 else 0
        first = max(1, math.ceil(Fraction(p0).limit_denominator(10 ** 9) * total))  # the first step inside the window
        end = self._end_value()
        if first < total and window_target(self.schedule, self.start_sparsity, end, first / total) == self.start_sparsity:
            first += 1  # the window opens at the schedule's start value: the masks change one step later
        first_epoch = (first - 1) // n_iter
        if self.rewind_epoch > first_epoch:
            raise ValueError(f"with lth=True, rewind_epoch={self.rewind_epoch} must be <= {first_epoch}, the epoch in "
                             f"which {getattr(self.schedule, '__name__', 'the schedule')}'s window (from {p0:g} of "
                             f"training) starts pruning in this fit of {n_epoch} epochs: earlier masks could not be rewound")

    def _target_probe(self, pos: float):
        if isinstance(self.sparsity, dict):
            for s in self.sparsity.values(): self._scheduled(self.start_sparsity, s, pos)
        else: self._scheduled(self.start_sparsity, self.sparsity, pos)

    @staticmethod
    def _fmt(x: float) -> str: return f"{float(x):g}"

    # ---- resume: weight copies that the model's zeros cannot rebuild ----
    def _resume_epoch(self) -> int:
        "The epoch this fit resumes at: fastai's `fit(n, start_epoch=k)` adds a `SkipToEpoch(k)`; else 0."
        return max([getattr(cb, '_skip_to', 0) for cb in self.learn.cbs if isinstance(cb, SkipToEpoch)], default=0)

    def _state_path(self, run: str, ext: str = '.pth') -> Path:
        return self._save_dir() / f"{Path(str(self.state_fname)).stem}_{run}{ext}"

    def _holds_copies(self) -> bool:
        sp = self.sparsifier
        return bool(sp.rewind_weights) or sp.criteria.reference == 'init'

    def _fingerprint(self) -> list:
        "Two float64 sums per pruned layer (of the weights and of their squares): which weights the model holds now."
        ws = [m.weight.detach().double() for m in self.sparsifier.layers.values()]
        return torch.stack([torch.stack([w.sum(), w.square().sum()]) for w in ws]).tolist()

    @staticmethod
    def _same_weights(a, b) -> bool:
        "Fingerprints of the same weights, summed on any device (float64 sums of float32 weights agree to 1e-9)."
        if a is None or b is None or len(a) != len(b): return False
        return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for u, v in zip(a, b) for x, y in zip(u, v))

    def _ends_epoch(self, prints: dict, epoch: int, now=None) -> bool:
        "Whether the model holds weights a run ended `epoch` with (its fingerprints `prints`)."
        now = self._fingerprint() if now is None else now
        return any(self._same_weights(p, now) for p in prints.get(str(epoch), []))

    def _fingerprint_epoch(self):
        "At an epoch's end, note the weights it ended with, so a checkpoint of this epoch finds this run's copies."
        if not self._holds_copies(): return
        prints, now = self._prints.setdefault(str(self.epoch), []), self._fingerprint()
        # a resumed fit may take another path than the original from the same epoch: both ends are the run's
        if not any(self._same_weights(p, now) for p in prints): prints.append(now)
        if getattr(self, '_state_written', False): self._write_index()

    def _write_index(self):
        "The run's small index beside its weight copies: layers, the copies it holds, the weights at each epoch's end."
        if rank_distrib() != 0 or self.state_fname is None: return
        sp = self.sparsifier
        index = {'run': self._run, 'layers': {n: list(m.weight.shape) for n, m in sp.layers.items()},
                 'rewind_epoch': self.rewind_epoch if sp.rewind_weights else None, 'epochs': self._prints}
        self._atomic_write(self._state_path(self._run, '.json'), lambda f: f.write_text(json.dumps(index)))

    def _atomic_write(self, path: Path, write):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + '.tmp')
            write(tmp); tmp.replace(path)  # a crash while writing leaves the previous file whole
        except OSError as e:
            warnings.warn(f"SparsifyCallback could not write {path} ({e}); a fit resumed from a later epoch will not find "
                          f"this run's weight copies")

    def _write_state(self):
        "Write the rewind and 'init' reference weights of this run beside the learner's checkpoints, when they are taken."
        sp = self.sparsifier
        if rank_distrib() != 0 or self.state_fname is None: return
        if not (sp.rewind_weights or sp.criteria.reference == 'init'): return
        cpu = lambda d: {n: t.detach().cpu() for n, t in d.items()}
        state = {'run': self._run, 'layers': {n: tuple(m.weight.shape) for n, m in sp.layers.items()},
                 'rewind_epoch': self.rewind_epoch if sp.rewind_weights else None, 'rewind': cpu(sp.rewind_weights),
                 'reference': cpu(sp.reference) if sp.criteria.reference == 'init' else {}}
        self._atomic_write(self._state_path(self._run), lambda f: torch.save(state, f))
        self._state_written = True
        self._write_index()

    def _keep_or_read_state(self, fresh: bool):
        """A new run gets its own name and writes its 'init' weights; a fit resuming past the epoch the copies were taken
        keeps the copies it holds when the loaded weights are its run's, else reads back those of the run they are."""
        sp = self.sparsifier
        if not self._resume_at:
            self._run, self._prints, self._state_written = uuid.uuid4().hex[:8], {}, False
            if sp.criteria.reference == 'init': self._write_state()
            return
        need = []
        if (self.lth or self.reset_end) and self._resume_at > self.rewind_epoch and not sp.rewind_weights: need.append('rewind')
        if fresh and sp.criteria.reference == 'init': need.append('reference')
        if not fresh and self._holds_copies() and not self._ends_epoch(self._prints, self._resume_at - 1):
            # the loaded checkpoint is not of the run whose copies this callback holds
            need = (['rewind'] if sp.rewind_weights else []) + (['reference'] if sp.criteria.reference == 'init' else [])
        if need: self._read_state(need)
        elif fresh or self._run is None: self._run, self._prints, self._state_written = uuid.uuid4().hex[:8], {}, False

    @staticmethod
    def _read_index(f: Path) -> dict | None:
        try: return json.loads(f.read_text())
        except (OSError, ValueError): return None  # unreadable: it cannot vouch for any run

    def _read_state(self, need: list[str]):
        "Find the run the loaded weights belong to among the state files of this folder, and read its copies back."
        sp, d = self.sparsifier, self._save_dir()
        what, k = ' and '.join(need), self._resume_at
        stem = Path(str(self.state_fname)).stem
        intro = (f"this fit resumes at epoch {k} and needs the {what} weights of the original run, which SparsifyCallback "
                 f"writes beside the learner's models")
        if self.state_fname is None: raise FileNotFoundError(f"{intro}: state_fname is None, so none was written")
        indexes = sorted(d.glob(f"{stem}_*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
        if not indexes: raise FileNotFoundError(f"{intro}: {d / stem}_*.pth is missing")
        shapes = {n: list(m.weight.shape) for n, m in sp.layers.items()}
        runs = [r for r in map(self._read_index, indexes) if r is not None]
        runs = [r for r in runs if r.get('layers') == shapes]
        if not runs:
            raise ValueError(f"{d / stem}_*.pth: the {len(indexes)} state file(s) there were written for other layers than "
                             f"this model's {self.layer_type.__name__} layers")
        now = self._fingerprint()
        mine = [r for r in runs if self._ends_epoch(r['epochs'], k - 1, now)]
        if not mine:
            raise ValueError(f"{intro}, but none of the {len(runs)} state file(s) in {d} is of the run the loaded weights "
                             f"come from: load the checkpoint saved at the end of epoch {k - 1} of a run whose "
                             f"{stem}_<run>.pth is in that folder (another run's copies are never read)")
        run = mine[0]
        path = self._state_path(run['run'])
        if not path.exists(): raise FileNotFoundError(f"{intro}: {path} is missing")
        state = torch.load(path, map_location='cpu', weights_only=True)
        missing = [x for x in need if not state.get(x)]
        if missing: raise ValueError(f"{path} holds no {' or '.join(missing)} weights; this resumed fit needs them")
        if 'rewind' in need and state['rewind_epoch'] != self.rewind_epoch:
            raise ValueError(f"{path} holds rewind weights of epoch {state['rewind_epoch']}, not of "
                             f"rewind_epoch={self.rewind_epoch}")
        on_device = lambda dd: {n: dd[n].to(m.weight.device) for n, m in sp.layers.items()}
        if 'rewind' in need: sp.rewind_weights = on_device(state['rewind'])
        if 'reference' in need: sp.reference = on_device(state['reference'])
        # the resumed fit goes on with that run: its later epochs are noted in the same index
        self._run, self._prints, self._state_written = run['run'], {e: list(p) for e, p in run['epochs'].items()}, True
        self._print(f"Resuming at epoch {k}: read back the {what} weights from {path}")

    def _counts_now(self) -> tuple:
        sp = self.sparsifier
        if self.context == 'global' and not isinstance(self.sparsity, dict): return (sum(sp.n_pruned.values()),)
        return tuple(sp.n_pruned.values())

    def _rewind_point(self):
        "At the start of `rewind_epoch`'s training, keep the weights for rewinding."
        if ((self.lth or self.reset_end) and self.epoch == self.rewind_epoch and self.epoch >= self._resume_at
                and not self.sparsifier.rewind_weights):
            self.sparsifier.save_rewind()
            self._write_state()
            self._print(f"Saving Weights at epoch {self.epoch}")

    def before_step(self):
        if not (self.active and self.training): return
        step = self.epoch * self.n_iter_fit + self.iter + 1
        self._stepped, self._unmasked = step, True  # the optimizer step that follows is unmasked until after_step
        target = self._target(step)
        self.current_sparsity = target
        counts = self._counts(target)
        # every `frequency` steps the units are ranked anew, even at the same counts (none pruned: nothing to rank)
        rerank = self.frequency is not None and step % self.frequency == 0 and any(counts)
        if (counts != self._current or rerank) and self._due(step, counts, target):
            ahead = self._lead(step, target)
            self._update_masks(ahead, self._counts(ahead), rerank)
        self._record(step, target)

    def after_cancel_step(self):
        "A step cancelled before ours (MixedPrecision skips one whose float16 gradients overflowed) still counts."
        self._catch_up()

    def after_cancel_batch(self):
        "A batch cancelled before our `before_step` (GradientAccumulation's steps without an update) still counts."
        self._catch_up()

    def _catch_up(self):
        "Run this training step's mask update if another callback cancelled the step before ours."
        if not (self.active and self.training) or self._in_validation(): return
        if getattr(self, '_stepped', None) == self.epoch * self.n_iter_fit + self.iter + 1: return  # ours ran
        # missing or overflowed gradients would give a gradient criteria no or Inf scores: the next step catches up
        if self.sparsifier.criteria.needs_grad and not self._grads_finite(): return
        self.before_step()

    def _grads_finite(self) -> bool:
        gs = [m.weight.grad for m in self.sparsifier.layers.values()]
        if any(g is None for g in gs): return False
        return bool(torch.stack([g.isfinite().all() for g in gs]).all())

    def _settle(self):
        "Mask an optimizer step whose `after_step` of ours a cancelling callback skipped."
        if self._unmasked and self.active:
            self.sparsifier.apply()
            self._unmasked = False
            self._mark_weights()

    def _mark_weights(self):
        "Remember the pruned weights' version counters: another callback loading weights (best.pth) changes them."
        self._versions = [m.weight._version for m in self.sparsifier.layers.values()]

    def _weights_replaced(self) -> bool:
        return [m.weight._version for m in self.sparsifier.layers.values()] != getattr(self, '_versions', None)

    def _due(self, step: int, counts: tuple, target) -> bool:
        """Recompute? At an epoch's last step (exact epoch lines), each `frequency` steps, and when the target has left
        the band of `max_lag` around the masks' target; with `max_lag=None`, when pruning starts or ends instead."""
        if self.iter == self.n_iter_fit - 1: return True
        if self.frequency is not None and step % self.frequency == 0: return True
        if self.max_lag is None: return not any(self._current) or not any(counts)
        return self._mask_target is None or self._lag(target, self._mask_target) > self.max_lag

    def _spans(self, target) -> list[tuple[float, float]]:
        "(value, span of the schedule) of each part of a target: one for a number, one per layer for a dict."
        if isinstance(target, dict): return [(target[n], abs(self.sparsity[n] - self.start_sparsity)) for n in target]
        return [(target, abs(self.sparsity - self.start_sparsity))]

    @staticmethod
    def _share(gap: float, span: float) -> float:
        "A gap between two targets as a share of the schedule's span (a target that should not move: any gap is 1)."
        return gap / span if span else float(gap != 0)

    def _lag(self, target, other) -> float:
        "How far apart two targets are, as a share of the schedule's span (the largest over layers for a dict)."
        return max((self._share(abs(a - b), s) for (a, s), (b, _) in zip(self._spans(target), self._spans(other))),
                   default=0.)

    def _lead(self, step: int, target):
        """The target the masks take at a recompute after `step`. Over the steps from here on (to this epoch's last)
        while the targets stay within a band of twice `max_lag` of the span, the value within `max_lag` of all of them
        that lies furthest the way they move: the masks lead the target, then trail it, never by more than `max_lag`,
        and the target crosses the whole band before the next recompute. The epoch's last target when the band
        reaches it (exact epoch lines), so a target that settles is held exactly."""
        if self.max_lag is None: return target
        parts = self._spans(target)
        spans, lo, hi = [s for _, s in parts], [v for v, _ in parts], [v for v, _ in parts]
        last, t, to_end = (self.epoch + 1) * self.n_iter_fit, target, True
        for u in range(step + 1, last + 1):
            tu = self._target(u)
            vs = [v for v, _ in self._spans(tu)]
            lo2, hi2 = [min(a, v) for a, v in zip(lo, vs)], [max(a, v) for a, v in zip(hi, vs)]
            if any(self._share(h - l, s) > 2 * self.max_lag for h, l, s in zip(hi2, lo2, spans)): to_end = False; break
            lo, hi, t = lo2, hi2, tu
        ends = self._spans(t)
        if to_end and all(self._share(h - v, s) <= self.max_lag >= self._share(v - l, s)
                          for h, l, (v, s) in zip(hi, lo, ends)): return t
        up = [e >= v for (e, _), (v, _) in zip(ends, parts)]  # the way the target moves over the band
        lead = [min(l + self.max_lag * s, h) if u else max(h - self.max_lag * s, l) for l, h, s, u in zip(lo, hi, spans, up)]
        return dict(zip(target, lead)) if isinstance(target, dict) else lead[0]

    def _update_masks(self, target, counts, rerank: bool = False):
        "New masks for `target`; at the counts the masks already hold, only to rank the units anew (`frequency`)."
        changed = counts != self._current
        if not (changed or rerank): self._mask_target = target; return  # the masks already hold this target
        sp = self.sparsifier
        opt = self.learn.opt  # an OptimWrapper keeps the torch optimizer's per-weight state in .opt
        sp.prune(target, optimizer=opt.opt if isinstance(opt, OptimWrapper) else opt)
        self._current, self._mask_target = counts, target
        if not changed: return  # a new ranking at the same sparsity: no rewind, no ticket
        if self.lth and sp.rewind_weights:
            sp.rewind()
            self._print(f"Resetting Weights to their epoch {self.rewind_epoch} values")
        if self.save_tickets:
            self._print("Saving Intermediate Ticket")
            self._save_ticket(target)

    def _save_ticket(self, target, final: bool = False):
        "Save the model's weights (with lth, the rewound ticket), its sparsity in the file name."
        if rank_distrib() != 0: return
        d = self._save_dir(); d.mkdir(parents=True, exist_ok=True)
        value = target if not isinstance(target, dict) else max(target.values(), default=0)
        name = f"ticket_{'final_' if final else ''}sparsity_{value:06.2f}.pth"
        torch.save(self.sparsifier.model.state_dict(), d / name)

    def after_step(self):
        if not (self.active and self.training): return
        self.sparsifier.apply()
        self._unmasked = False

    def after_batch(self):
        if not (self.active and self.training) or self._in_validation(): return
        self._settle()
        self._steps_in_epoch += 1  # training batches, stepped or not (GradientAccumulation)
        self._trained = True

    def after_cancel_train(self): self._settle()
    def after_cancel_epoch(self): self._settle()
    def after_cancel_fit(self):
        "Before any callback's `after_fit` (SaveModelCallback may load its best there): mask, and end the cut epoch."
        self._settle()
        # an epoch ended by a CancelFitException raised in after_epoch before ours (EarlyStoppingCallback) gets its line
        if self.active and self._steps_in_epoch: self.after_epoch()

    def _record(self, step, target):
        value = self._overall(target)
        self.history.append({'epoch': self.epoch + (self.iter + 1) / self.n_iter_fit, 'target': value,
                             'actual': self.sparsifier.masked_sparsity()})

    def after_epoch(self):
        if not self.active or self._steps_in_epoch == 0 or self._in_validation(): return
        self._settle()
        self._steps_in_epoch = 0
        self.epoch_sparsity = self.sparsifier.sparsity()
        if self.history: self.history[-1]['actual'] = self.epoch_sparsity
        self._print(f"Sparsity at the end of epoch {self.epoch}: {self.epoch_sparsity:.2f}%")
        self._fingerprint_epoch()
        self._mark_weights()

    def after_fit(self):
        if getattr(self, '_nested', 0): self._nested -= 1; return
        if self._in_validation(): return
        if self._pending and not self._saw_epoch and getattr(self.learn, 'n_epoch', None) == 0:
            warnings.warn("SparsifyCallback: fit(0) trains no epoch, so nothing was pruned")
        self._pending = False
        if not self.active: return  # no training fit of ours (validate, lr_find, a fit cancelled before it trained)
        self.active = False  # every step is masked by now: after_step, or the after_cancel_* event of a cancel
        if not self._trained: return  # cancelled before its first batch: nothing was trained or pruned
        sp = self.sparsifier
        # another callback put other weights in the model (SaveModelCallback's best epoch): that model is the result,
        # so the masks follow its zeros rather than being applied on top of it
        if self._weights_replaced(): sp.masks_from_weights()
        if self.reset_end and sp.rewind_weights: sp.rewind()
        self.final_sparsity = sp.sparsity()
        if self.save_tickets:
            self._print("Saving Final Ticket")
            self._save_ticket(self.final_sparsity, final=True)
        self._print(f"Final Sparsity: {self.final_sparsity:.2f}%")
        if self.verbose and rank_distrib() == 0: sparsity_report(sp.model, self.layer_type)
        if self.compact: self._compact()

    # ---- structure ----
    def _example_inputs(self):
        "The inputs of one batch (its first two samples), for tracing; the random states and the data order are kept."
        dls = self.learn.dls
        dl = dls.valid if dls.valid is not None and len(dls.valid) else dls.train
        with _random_states_kept(dl): b = dl.one_batch()
        xs = tuple(x[:2].as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x for x in b[:dls.n_inp])
        return xs[0] if len(xs) == 1 else xs

    def _compact(self):
        "Hand the learner a model without the pruned channels (same outputs), with a new optimizer."
        old = unwrap_model(self.learn.model)
        n_before = sum(p.numel() for p in old.parameters())
        small = compact_model(old, self._example_inputs())
        self.learn.model = small
        self.learn.create_opt()
        self._print(f"Compacted: {n_before:,} parameters -> {sum(p.numel() for p in small.parameters()):,}")

    def __getstate__(self) -> dict:
        "An export (`learn.export`) carries the callback's arguments, none of a run's masks, weight copies or records."
        state = self.__dict__.copy()
        state.update(sparsifier=None, history=[], active=False, _pending=False, _unmasked=False, _run=None, _prints={},
                     _nested=0)
        for k in ('_versions', '_current', '_stepped', 'n_iter_fit', '_end_epoch', '_resume_at', 'epoch_sparsity',
                  '_mask_target', '_trained', '_state_written'):
            state.pop(k, None)
        return state

    # ---- after training ----
    def plot(self, ax=None):
        "Target and actual sparsity over the last fit, per training step; returns the axes."
        import matplotlib.pyplot as plt
        if not self.history: raise RuntimeError("plot() needs a finished fit: no sparsity was recorded yet")
        if ax is None: _, ax = plt.subplots(figsize=(8, 4))
        xs = [h['epoch'] for h in self.history]
        ax.plot(xs, [h['target'] for h in self.history], label='target', lw=2, alpha=.6)
        ax.step(xs, [h['actual'] for h in self.history], where='post', label='actual (masks)', ls='--')
        ax.set(xlabel='epoch', ylabel='sparsity (%)', ylim=(-2, 102), title=f"{getattr(self.schedule, '__name__', 'schedule')} "
               f"{self.granularity} {self.context}")
        ax.legend(); ax.grid(alpha=.3)
        return ax
