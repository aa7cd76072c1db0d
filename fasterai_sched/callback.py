"""SparsifyCallback: fastai events -> training progress -> target sparsity -> Sparsifier."""
from __future__ import annotations
from numbers import Real
from pathlib import Path
import warnings
from typing import Callable
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import SkipToEpoch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import rank_distrib
from fastcore.basics import store_attr
from .criteria import Criteria, large_final
from .granularity import get_granularity
from .schedules import one_shot
from .sparsifier import Sparsifier, check_sparsity, n_to_prune, unwrap_model
from .report import sparsity_report

__all__ = ['SparsifyCallback']

_UNSET = object()
MAX_LAG = 0.02  # default share of the schedule's span the masks may trail the target by (docs/performance.md)


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


def _check_options(model, lth, reset_end, save_tickets, verbose, seed, rewind_epoch, start_epoch, start_sparsity):
    "Raise on a flag that is not a bool, or on an option that would be ignored in this combination."
    for name, value in [('lth', lth), ('reset_end', reset_end), ('save_tickets', save_tickets), ('verbose', verbose)]:
        if not isinstance(value, bool): raise TypeError(f"{name}={value!r} must be True or False")
    if isinstance(seed, bool) or not isinstance(seed, int): raise TypeError(f"seed={seed!r} must be an integer")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model={model!r} must be None (the learner's model) or an nn.Module")
    if save_tickets and not lth: raise ValueError("save_tickets=True needs lth=True: a ticket is the rewound weights")
    if rewind_epoch and not (lth or reset_end):
        raise ValueError(f"rewind_epoch={rewind_epoch} has no effect without lth=True or reset_end=True")
    first = start_epoch if start_sparsity == 0 else 0  # the epoch of the first mask change
    if lth and rewind_epoch > first:
        raise ValueError(f"with lth=True, rewind_epoch={rewind_epoch} must be <= {first}, the epoch pruning starts "
                         f"(start_epoch={start_epoch}, start_sparsity={start_sparsity}): earlier masks could not be rewound")


class SparsifyCallback(Callback):
    """Prune `layer_type` layers during `fit` following `schedule`, from `start_sparsity` to `sparsity` percent.

    Masks follow the target: they are recomputed as soon as the target has moved more than `max_lag` of the
    schedule's span (`start_sparsity` to `sparsity`) since the last recompute, so the measured sparsity never trails
    the target by more than that, on few steps or many; also when pruning starts or ends, when the target stops
    moving, at each epoch's last step (a catch-up of at most `max_lag`, so the epoch lines are exact) and, with
    `frequency`, every `frequency` steps. Only when the target's unit count changed; between recomputes a step only
    re-applies the masks."""
    order = 70  # after MixedPrecision has unscaled the gradients; prints after the progress table's row
    # the weight copies a resumed fit needs, in learn.path/learn.model_dir; None writes nothing (and cannot resume them)
    state_fname = 'sparsify_state.pth'

    def __init__(self, sparsity=_UNSET, granularity: str = 'weight', context: str = 'local',
                 criteria: Criteria = large_final, schedule: Callable = _UNSET, start_sparsity: float = 0,
                 start_epoch: int = 0, end_epoch: int | None = None, lth: bool = False, rewind_epoch: int = 0,
                 reset_end: bool = False, save_tickets: bool = False, model: nn.Module | None = None,
                 round_to: int | None = None, layer_type: type = nn.Conv2d, verbose: bool = True,
                 max_lag: float = MAX_LAG, frequency: int | None = None, seed: int = 0, end_sparsity=_UNSET,
                 sched_func=_UNSET):
        sparsity = _pick('sparsity', sparsity, 'end_sparsity', end_sparsity, _UNSET)
        if sparsity is _UNSET: raise TypeError("SparsifyCallback needs sparsity (or end_sparsity), a percent such as 90")
        schedule = _pick('schedule', schedule, 'sched_func', sched_func, one_shot)
        if isinstance(sparsity, dict):
            if context != 'local': raise ValueError(f"sparsity as a dict needs context='local', got context={context!r}")
            for k, v in sparsity.items(): check_sparsity(v, f"sparsity[{k!r}]")
        else: check_sparsity(sparsity)
        check_sparsity(start_sparsity, 'start_sparsity')
        if not callable(schedule): raise TypeError(f"schedule={schedule!r} must be a function f(start, end, pos)")
        # fail on a bad criteria, layer_type or round_to now, not once training has started
        Sparsifier.check_args(context, criteria, layer_type, round_to)
        get_granularity(granularity, layer_type)  # raises on an unknown name, listing the valid ones
        _check_int('start_epoch', start_epoch); _check_int('end_epoch', end_epoch, 1, allow_none=True)
        _check_int('rewind_epoch', rewind_epoch); _check_int('frequency', frequency, 1, allow_none=True)
        if isinstance(max_lag, bool) or not isinstance(max_lag, Real) or not 0 <= max_lag <= 1:
            raise ValueError(f"max_lag={max_lag!r} must be a share of the schedule's span in [0, 1] (0.02 lets the "
                             f"masks trail the target by at most 2% of start_sparsity -> sparsity)")
        if end_epoch is not None and end_epoch <= start_epoch:
            raise ValueError(f"end_epoch={end_epoch} must be after start_epoch={start_epoch}")
        _check_options(model, lth, reset_end, save_tickets, verbose, seed, rewind_epoch, start_epoch, start_sparsity)
        store_attr('sparsity,granularity,context,criteria,schedule,start_sparsity,start_epoch,end_epoch,lth,'
                   'rewind_epoch,reset_end,save_tickets,round_to,layer_type,verbose,max_lag,frequency,seed')
        self.target_model, self.sparsifier, self.history, self._steps_in_epoch = model, None, [], 0

    # ---- helpers ----
    def _print(self, *args):
        if self.verbose and rank_distrib() == 0: print(*args)

    def _end_value(self) -> float:
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
        k0, k1 = self.start_epoch * self.n_iter_fit, self._end_epoch * self.n_iter_fit
        if step <= k0: pos = 0.
        else: pos = min(1., (step - k0) / (k1 - k0))
        if isinstance(self.sparsity, dict):
            return {n: self._scheduled(self.start_sparsity, s, pos) for n, s in self.sparsity.items()}
        return self._scheduled(self.start_sparsity, self.sparsity, pos)

    def _scheduled(self, start, end, pos) -> float:
        try: value = self.schedule(start, end, pos)
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
    def before_fit(self):
        self.active = True
        model = unwrap_model(self.target_model or self.learn.model)
        # a fit where every pruned weight is frozen (fine_tune's first phase) trains nothing to prune; its epoch
        # count says nothing of the unfrozen fit's, so the epoch arguments are checked there
        pruned = [m for m in model.modules()
                  if isinstance(m, self.layer_type) and isinstance(getattr(m, 'weight', None), torch.Tensor)]
        if pruned and not any(m.weight.requires_grad for m in pruned):
            self.active = False
            self._print("Pruned layers are frozen in this fit: pruning waits for an unfrozen one")
            return
        n_epoch = self.learn.n_epoch
        if self.start_epoch >= n_epoch:
            raise ValueError(f"start_epoch={self.start_epoch} is past the end of this fit of {n_epoch} epochs "
                             f"(allowed: 0 to {n_epoch - 1})")
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
            self.sparsifier = Sparsifier(model, self.granularity, self.context, self.criteria, self.layer_type,
                                         self.round_to, self.seed)
        else: self.sparsifier.to()
        sp = self.sparsifier
        # masks always come from the zeros of the weights as they are now (a checkpoint may have been loaded)
        if not fresh or any((m.weight == 0).any() for m in sp.layers.values()): sp.masks_from_weights()
        if isinstance(self.sparsity, dict): sp._targets_per_layer(self.sparsity)  # layer names checked before training
        finite = torch.stack([m.weight.isfinite().all() for m in sp.layers.values()]).tolist()
        bad = [n for n, ok in zip(sp.layers, finite) if not ok]
        if bad: raise ValueError(f"layer {bad[0]!r} has NaN or Inf weights: they cannot be ranked for pruning")
        for i in range(101): self._target_probe(i / 100)
        self.n_iter_fit = len(self.learn.dls.train)
        self._current = self._counts_now()
        self._mask_target = self._target(self._resume_at * self.n_iter_fit)  # what the masks held at this fit's start
        self._steps_in_epoch, self.history = 0, []
        self._keep_or_read_state(fresh)
        self._print(f"Pruning of {self.granularity} until a sparsity of {self._fmt(self._end_value())}%")

    def _target_probe(self, pos: float):
        if isinstance(self.sparsity, dict):
            for s in self.sparsity.values(): self._scheduled(self.start_sparsity, s, pos)
        else: self._scheduled(self.start_sparsity, self.sparsity, pos)

    @staticmethod
    def _fmt(x: float) -> str: return f"{x:g}"

    # ---- resume: weight copies that the model's zeros cannot rebuild ----
    def _resume_epoch(self) -> int:
        "The epoch this fit resumes at: fastai's `fit(n, start_epoch=k)` adds a `SkipToEpoch(k)`; else 0."
        return max([getattr(cb, '_skip_to', 0) for cb in self.learn.cbs if isinstance(cb, SkipToEpoch)], default=0)

    def _state_path(self) -> Path: return self._save_dir() / str(self.state_fname)

    def _write_state(self):
        "Write the rewind and 'init' reference weights beside the learner's checkpoints, when they are taken."
        sp = self.sparsifier
        if rank_distrib() != 0 or self.state_fname is None: return
        if not (sp.rewind_weights or sp.criteria.reference == 'init'): return
        cpu = lambda d: {n: t.detach().cpu() for n, t in d.items()}
        state = {'layers': {n: tuple(m.weight.shape) for n, m in sp.layers.items()},
                 'rewind_epoch': self.rewind_epoch if sp.rewind_weights else None, 'rewind': cpu(sp.rewind_weights),
                 'reference': cpu(sp.reference) if sp.criteria.reference == 'init' else {}}
        path = self._state_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + '.tmp')
            torch.save(state, tmp); tmp.replace(path)  # a crash while writing leaves the previous file whole
        except OSError as e:
            warnings.warn(f"SparsifyCallback could not write {path} ({e}); a fit resumed from a later epoch will not find "
                          f"these weights")

    def _keep_or_read_state(self, fresh: bool):
        "Write the 'init' weights of a new run; a fit resuming past the epoch the copies were taken reads them back."
        sp = self.sparsifier
        if not self._resume_at:
            if sp.criteria.reference == 'init': self._write_state()
            return
        need = []
        if (self.lth or self.reset_end) and self._resume_at > self.rewind_epoch and not sp.rewind_weights: need.append('rewind')
        if fresh and sp.criteria.reference == 'init': need.append('reference')
        if need: self._read_state(need)

    def _read_state(self, need: list[str]):
        sp, path = self.sparsifier, self._state_path()
        what = ' and '.join(need)
        if self.state_fname is None or not path.exists():
            where = "state_fname is None, so none was written" if self.state_fname is None else f"{path} is missing"
            raise FileNotFoundError(f"this fit resumes at epoch {self._resume_at} and needs the {what} weights of the "
                                    f"original run, which SparsifyCallback writes beside the learner's models: {where}")
        state = torch.load(path, map_location='cpu', weights_only=True)
        shapes = {n: tuple(m.weight.shape) for n, m in sp.layers.items()}
        if state.get('layers') != shapes:
            raise ValueError(f"{path} was written for other layers than this model's {self.layer_type.__name__} layers")
        missing = [k for k in need if not state.get(k)]
        if missing: raise ValueError(f"{path} holds no {' or '.join(missing)} weights; this resumed fit needs them")
        if 'rewind' in need and state['rewind_epoch'] != self.rewind_epoch:
            raise ValueError(f"{path} holds rewind weights of epoch {state['rewind_epoch']}, not of "
                             f"rewind_epoch={self.rewind_epoch}")
        on_device = lambda d: {n: d[n].to(m.weight.device) for n, m in sp.layers.items()}
        if 'rewind' in need: sp.rewind_weights = on_device(state['rewind'])
        if 'reference' in need: sp.reference = on_device(state['reference'])
        self._print(f"Resuming at epoch {self._resume_at}: read back the {what} weights from {path}")

    def _counts_now(self) -> tuple:
        sp = self.sparsifier
        if self.context == 'global' and not isinstance(self.sparsity, dict): return (sum(sp.n_pruned.values()),)
        return tuple(sp.n_pruned.values())

    def before_epoch(self):
        if not self.active: return
        if ((self.lth or self.reset_end) and self.epoch == self.rewind_epoch and self.epoch >= self._resume_at
                and not self.sparsifier.rewind_weights):
            self.sparsifier.save_rewind()
            self._write_state()
            self._print(f"Saving Weights at epoch {self.epoch}")

    def before_step(self):
        if not (self.active and self.training): return
        step = self.epoch * self.n_iter_fit + self.iter + 1
        self._stepped = step
        target = self._target(step)
        counts = self._counts(target)
        if counts != self._current and self._due(step, counts, target):
            self._update_masks(target, counts)
        self._record(step, target)

    def after_cancel_step(self):
        "A step cancelled before ours (MixedPrecision skips one whose float16 gradients overflowed) still counts."
        if not (self.active and self.training): return
        if getattr(self, '_stepped', None) == self.epoch * self.n_iter_fit + self.iter + 1: return  # ours ran
        # overflowed gradients would give a gradient criteria Inf scores: the next step catches up instead
        if self.sparsifier.criteria.needs_grad and not self._grads_finite(): return
        self.before_step()

    def _grads_finite(self) -> bool:
        gs = [m.weight.grad for m in self.sparsifier.layers.values() if m.weight.grad is not None]
        return not gs or bool(torch.stack([g.isfinite().all() for g in gs]).all())

    def _due(self, step: int, counts: tuple, target) -> bool:
        """Recompute? When the target has moved more than `max_lag` of its span since the last recompute, when pruning
        starts or ends, when the target stops moving, at an epoch's last step (exact epoch lines), each `frequency` steps."""
        if self.iter == self.n_iter_fit - 1 or not any(self._current) or not any(counts): return True
        if self.frequency is not None and step % self.frequency == 0: return True
        if self._lag(target, self._mask_target) > self.max_lag: return True
        return self._lag(target, self._target(step + 1)) == 0  # the target settles here: no lag left behind

    def _lag(self, target, other) -> float:
        "How far apart two targets are, as a share of the schedule's span (the largest over layers for a dict)."
        def share(a, b, end): return abs(a - b) / span if (span := abs(end - self.start_sparsity)) else float(a != b)
        if isinstance(target, dict): return max((share(target[n], other[n], self.sparsity[n]) for n in target), default=0.)
        return share(target, other, self.sparsity)

    def _update_masks(self, target, counts):
        sp = self.sparsifier
        opt = self.learn.opt  # an OptimWrapper keeps the torch optimizer's per-weight state in .opt
        sp.prune(target, optimizer=opt.opt if isinstance(opt, OptimWrapper) else opt)
        self._current, self._mask_target = counts, target
        if self.lth and sp.rewind_weights:
            sp.rewind()
            if self.save_tickets: self._save_ticket(target)

    def _save_ticket(self, target):
        d = self._save_dir(); d.mkdir(parents=True, exist_ok=True)
        value = target if not isinstance(target, dict) else max(target.values(), default=0)
        if rank_distrib() == 0: torch.save(self.sparsifier.model.state_dict(), d / f"ticket_sparsity_{value:06.2f}.pth")

    def after_step(self):
        if self.active and self.training: self.sparsifier.apply()
        self._steps_in_epoch += 1

    def _record(self, step, target):
        value = self._overall(target)
        self.history.append({'epoch': self.epoch + (self.iter + 1) / self.n_iter_fit, 'target': value,
                             'actual': self.sparsifier.masked_sparsity()})

    def after_epoch(self):
        if not self.active or self._steps_in_epoch == 0: return
        self._steps_in_epoch = 0
        self.epoch_sparsity = self.sparsifier.sparsity()
        if self.history: self.history[-1]['actual'] = self.epoch_sparsity
        self._print(f"Sparsity at the end of epoch {self.epoch}: {self.epoch_sparsity:.2f}%")

    def after_fit(self):
        if not self.active: return
        sp = self.sparsifier
        sp.apply()  # a fit cancelled between the optimizer step and after_step would leave that step unmasked
        if self.reset_end and sp.rewind_weights: sp.rewind()
        self.final_sparsity = sp.sparsity()
        self._print(f"Final Sparsity: {self.final_sparsity:.2f}%")
        if self.verbose and rank_distrib() == 0: sparsity_report(sp.model, self.layer_type)

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
