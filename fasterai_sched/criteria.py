"""Criteria: one score per weight (higher is kept), reduced per unit of a granularity; the named criteria, and
fasterai's call forms (`crit(module, granularity)`, `Reducer`, `Normalizer`, the criteria groups)."""
from __future__ import annotations
from typing import Callable
import torch, torch.nn as nn
import torch.nn.functional as F

__all__ = ['Criteria', 'Reducer', 'Normalizer', 'EPS', 'random', 'large_final', 'small_final', 'squared_final',
           'large_init', 'small_init', 'large_init_large_final', 'small_init_small_final', 'magnitude_increase',
           'movement', 'movmag', 'updating_magnitude_increase', 'updating_movement', 'updating_movmag', 'taylor',
           'grad_crit', 'wanda', 'magnitude_criteria', 'init_based_criteria', 'update_based_criteria',
           'activation_criteria', 'criterias', 'available_criterias', 'CRITERIA', 'DEFAULT_REDUCTION']

EPS = torch.finfo(torch.float32).eps
# how a unit's score is made from its weights' scores when the criteria does not say: the mean, as measured on the
# main job (docs/criteria_reduction.md: summing empties the small early layers first); only global context over
# units of different sizes depends on it
DEFAULT_REDUCTION = 'mean'


def _our_dims(dim) -> tuple[int, ...]:
    "fasterai numbers dims from a leading unit axis (0: each weight alone); these are the weight's own dims."
    dims = [dim] if isinstance(dim, int) else list(dim)
    return tuple(sorted({d - 1 for d in dims if d}))


class Reducer:
    "How element scores become one score per unit: `Reducer.sum(scores, dim)`, `Reducer.mean(scores, dim)` (fasterai's dims)."
    @staticmethod
    def sum(scores: torch.Tensor, dim) -> torch.Tensor:
        "Sum over the unit's weights."
        dims = _our_dims(dim)
        return scores.sum(dims, keepdim=True) if dims else scores

    @staticmethod
    def mean(scores: torch.Tensor, dim) -> torch.Tensor:
        "Mean over the unit's weights: units of different sizes compare on the same footing."
        dims = _our_dims(dim)
        return scores.mean(dims, keepdim=True) if dims else scores


class Normalizer:
    "Rescalings of one layer's unit scores, so that layers compare in global context."
    @staticmethod
    def sum(scores): return scores / scores.sum()

    @staticmethod
    def standardization(scores): return (scores - scores.min()) / (scores.max() - scores.min() + EPS)

    @staticmethod
    def mean(scores): return scores / scores.mean()

    @staticmethod
    def max(scores): return scores / scores.max()

    @staticmethod
    def gaussian(scores): return (scores - scores.mean()) / (scores.std() + EPS)


_REDUCERS = {'sum': Reducer.sum, 'mean': Reducer.mean}
_DATA_FNS = ('l2_norm', 'max', 'mean')


class _Combined:
    "fasterai's form: `transform` is applied to the weights and to the reference, then combined (a class: it pickles)."
    def __init__(self, transform, output_fn, return_init):
        self.transform, self.output_fn, self.return_init = transform, output_fn, return_init
        self.__name__ = getattr(transform, '__name__', 'criteria')
    def __call__(self, w, w0):
        if self.output_fn is not None: return self.output_fn(self.transform(w), self.transform(w0))
        return self.transform(w0 if self.return_init else w)


def _combine(transform, output_fn, return_init): return _Combined(transform, output_fn, return_init)


class Criteria:
    """Scores a weight: `f(weight)`, or `f(weight, reference)` when it compares with a reference copy.

    `reference` is 'init' (the weights when pruning was set up) or 'previous' (the weights at the last mask update);
    `needs_grad` passes the weight's gradient instead. fasterai's keywords work too: `needs_init` / `needs_update` with
    `output_fn(f(w), f(w0))` or `return_init`, a `reducer` (`Reducer.sum`, `Reducer.mean`, 'sum', 'mean' or your own
    `r(scores, dim)`), a `normalizer`, and `needs_data` (activation statistics, `data_fn`). Called as
    `crit(module, granularity)` it returns the unit scores. Scores must be finite; higher is kept."""
    def __init__(self, f: Callable, reference: str | None = None, needs_grad: bool = False, seeded: bool = False,
                 name: str | None = None, *, reducer=None, normalizer: Callable | None = None, needs_init: bool = False,
                 needs_update: bool = False, output_fn: Callable | None = None, return_init: bool = False,
                 scale: dict | None = None, needs_data: bool = False, data_fn: str = 'l2_norm'):
        if not callable(f): raise TypeError(f"f must be callable, got {f!r}")
        if callable(reference) and reducer is None: reference, reducer = None, reference  # fasterai: Criteria(f, reducer)
        if reference not in (None, 'init', 'previous'):
            raise ValueError(f"reference={reference!r} is not allowed; use None, 'init' or 'previous'")
        if needs_init and needs_update:
            raise ValueError("needs_init=True and needs_update=True together: the updating weights would replace the "
                             "initial ones; choose one")
        if (needs_init or needs_update) and reference is not None:
            raise ValueError(f"reference={reference!r} with needs_init/needs_update: give one of the two spellings")
        if (output_fn is not None or return_init) and not (needs_init or needs_update or reference):
            raise ValueError("output_fn and return_init compare with reference weights: they need needs_init=True or "
                             "needs_update=True")
        if isinstance(reducer, str):
            if reducer not in _REDUCERS: raise ValueError(f"reducer={reducer!r} is not known; use 'sum', 'mean' or a function")
            reducer = _REDUCERS[reducer]
        if reducer is not None and not callable(reducer): raise TypeError(f"reducer={reducer!r} must be callable")
        if normalizer is not None and not callable(normalizer): raise TypeError(f"normalizer={normalizer!r} must be callable")
        if data_fn not in _DATA_FNS: raise ValueError(f"data_fn={data_fn!r} is not known; use one of {list(_DATA_FNS)}")
        if needs_init: reference = 'init'
        elif needs_update: reference = 'previous'
        if reference and (needs_init or needs_update or output_fn is not None or return_init):
            f = _combine(f, output_fn, return_init)
        self.f, self.reference, self.needs_grad, self.seeded = f, reference, needs_grad, seeded
        self.reducer, self.normalizer, self.needs_data, self.data_fn = reducer, normalizer, needs_data, data_fn
        self.scale = scale
        self.name = name or getattr(f, '__name__', 'criteria')
        self.grad_optional = False  # grad_crit scores |w|² where no gradient was computed, as fasterai does

    @property
    def needs_init(self) -> bool: return self.reference == 'init'

    @property
    def needs_update(self) -> bool: return self.reference == 'previous'

    def __repr__(self): return f"Criteria({self.name})"

    def __call__(self, weight, reference=None, grad: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, scale: torch.Tensor | None = None, squeeze: bool = False):
        """Float32 scores shaped like `weight`; or, called as `crit(module, granularity)` (fasterai's form), the scores
        of the module's units, shaped with a 1 for each reduced dim (`squeeze=True` drops them)."""
        if isinstance(weight, nn.Module): return self.module_scores(weight, reference, squeeze=squeeze)
        w = weight.detach().float()
        if self.seeded: out = self.f(w, generator)
        elif self.needs_grad:
            if grad is None and not self.grad_optional:
                raise RuntimeError(f"criteria {self.name} needs gradients; prune after a backward pass")
            out = self.f(w, None if grad is None else grad.detach().float())
        elif self.reference: out = self.f(w, reference.detach().float())
        else: out = self.f(w)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"criteria {self.name} returned {type(out).__name__}; it must return a tensor of scores "
                            f"shaped like the weight")
        out = out.float()
        if scale is not None: out = out * _per_input(scale, weight)
        return out

    def unit_scores(self, scores: torch.Tensor, granularity) -> torch.Tensor:
        "One score per unit of `granularity` (shaped as its units), reduced as this criteria says, then normalized."
        from .granularity import NMGranularity
        if isinstance(granularity, NMGranularity): out = granularity.unit_scores(scores)
        else:
            reducer = self.reducer or _REDUCERS[DEFAULT_REDUCTION]
            dims = granularity.dims
            if reducer is Reducer.sum: out = granularity.unit_scores(scores)
            elif reducer is Reducer.mean: out = scores.mean(dims, keepdim=True) if dims else scores
            else:  # the user's reducer, called with fasterai's dims
                out = reducer(scores, [d + 1 for d in dims] or [0]).reshape(granularity.unit_shape(scores.shape))
        return out if self.normalizer is None else self.normalizer(out)

    @torch.no_grad()
    def module_scores(self, m: nn.Module, granularity, reference: torch.Tensor | None = None, squeeze: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit scores of module `m` for `granularity` (a name or a `Granularity`). A criteria comparing with reference
        weights takes them from `reference`, else from the module's `_init_weights` / `_old_weights` (fasterai's names)."""
        from .granularity import get_granularity
        g = get_granularity(granularity, type(m))
        w = m.weight
        g.check(w, type(m).__name__)
        ref = None
        if self.reference:
            ref = reference if reference is not None else getattr(
                m, '_init_weights' if self.reference == 'init' else '_old_weights', None)
            if ref is None and self.reference == 'previous': ref = getattr(m, '_init_weights', None)
            if ref is None:
                raise ValueError(f"criteria {self.name} compares with the {self.reference} weights: pass them as "
                                 f"reference=... (or let a Sparsifier keep them)")
        if self.seeded and generator is None: generator = torch.Generator(device=w.device).manual_seed(0)
        scale = self.scale.get(m) if isinstance(self.scale, dict) else None
        out = self.unit_scores(self(w, ref, w.grad, generator, scale), g)
        return out.squeeze() if squeeze else out

    @torch.no_grad()
    def calibrate(self, model: nn.Module, data, layer_type: type = nn.Conv2d, n_batches: int = 5) -> dict:
        "Collect each `layer_type` layer's per-input-channel activation statistic over `data`; kept as `self.scale`."
        self.scale = activation_scales(model, data, layer_type, n_batches, self.data_fn)
        return self.scale


def _input_dim(layer: nn.Module) -> int:
    "The weight dim that meets the layer's input channels."
    return 0 if type(layer).__name__.startswith('ConvTranspose') else 1


def _per_input(scale: torch.Tensor, weight: torch.Tensor, in_dim: int | None = None) -> torch.Tensor:
    "`scale` (one value per input channel) shaped to broadcast over `weight`."
    if in_dim is None: in_dim = 1 if weight.dim() > 1 and weight.shape[1] == scale.numel() else 0
    shape = [1] * weight.dim(); shape[in_dim] = -1
    return scale.to(weight.device, torch.float32).reshape(shape)


@torch.no_grad()
def activation_scales(model: nn.Module, data, layer_type: type = nn.Conv2d, n_batches: int = 5,
                      data_fn: str = 'l2_norm') -> dict[nn.Module, torch.Tensor]:
    """Per-input-channel statistic of what each `layer_type` layer receives over the first `n_batches` of `data` (a
    tensor, a list of batches or a DataLoader): 'l2_norm' (root mean square), 'max' or 'mean' (of |x|). Runs in eval
    mode without gradients and puts the model's mode back."""
    if data_fn not in _DATA_FNS: raise ValueError(f"data_fn={data_fn!r} is not known; use one of {list(_DATA_FNS)}")
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    if not layers: raise ValueError(f"layer_type={layer_type.__name__}: the model has no such layer to calibrate")
    acc = {m: None for m in layers}; count = {m: 0 for m in layers}

    def hook(m, args):
        x = args[0].detach().float()
        ch = x.dim() - 1 if isinstance(m, nn.Linear) else 1  # a Linear's features are last (tokens come before)
        x = x.movedim(ch, -1).reshape(-1, x.shape[ch])
        stat = x.pow(2).sum(0) if data_fn == 'l2_norm' else x.abs().amax(0) if data_fn == 'max' else x.abs().sum(0)
        if acc[m] is None: acc[m] = stat
        else: acc[m] = torch.maximum(acc[m], stat) if data_fn == 'max' else acc[m] + stat
        count[m] += x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        batches = [data] if isinstance(data, torch.Tensor) else data
        for i, b in enumerate(batches):
            if i >= n_batches: break
            xb = b[0] if isinstance(b, (tuple, list)) else b
            model(torch.as_tensor(xb).as_subclass(torch.Tensor).to(device))
    finally:
        for h in handles: h.remove()
        model.train(was_training)
    missing = [type(m).__name__ for m in layers if acc[m] is None]
    if missing: raise ValueError(f"calibration data never reached some {layer_type.__name__} layers ({len(missing)})")
    out = {}
    for m in layers:
        if data_fn == 'l2_norm': out[m] = (acc[m] / max(count[m], 1)).sqrt()
        elif data_fn == 'mean': out[m] = acc[m] / max(count[m], 1)
        else: out[m] = acc[m]
    return out


def _rand(w, g): return torch.rand(w.shape, generator=g, device=w.device)
def _keep_small(x): return 1 / (1 + x)  # decreasing in x, non-negative and bounded
# module-level functions, not lambdas, so that the named criteria pickle (learn.export, torch.save) with plain pickle
def _small_final(w): return _keep_small(w.abs())
def _large_init(w, w0): return w0.abs()
def _small_init(w, w0): return _keep_small(w0.abs())
def _large_init_large_final(w, w0): return torch.minimum(w.abs(), w0.abs())
def _small_init_small_final(w, w0): return _keep_small(torch.maximum(w.abs(), w0.abs()))
def _magnitude_increase(w, w0): return F.softplus(w.abs() - w0.abs())  # the order of |w| - |w0|, non-negative
def _movement(w, w0): return (w - w0).abs()
def _movmag(w, w0): return (w * (w - w0)).abs()
def _taylor(w, g): return (w * g).abs()


def _grad_score(w, g): return (w * g) ** 2 if g is not None else w ** 2


random = Criteria(_rand, seeded=True, name='random')
large_final = Criteria(torch.abs, name='large_final')
small_final = Criteria(_small_final, name='small_final')
squared_final = Criteria(torch.square, name='squared_final')
large_init = Criteria(_large_init, reference='init', name='large_init')
small_init = Criteria(_small_init, reference='init', name='small_init')
large_init_large_final = Criteria(_large_init_large_final, reference='init', name='large_init_large_final')
small_init_small_final = Criteria(_small_init_small_final, reference='init', name='small_init_small_final')
magnitude_increase = Criteria(_magnitude_increase, reference='init', name='magnitude_increase')
movement = Criteria(_movement, reference='init', name='movement')
movmag = Criteria(_movmag, reference='init', name='movmag')
updating_magnitude_increase = Criteria(_magnitude_increase, reference='previous', name='updating_magnitude_increase')
updating_movement = Criteria(_movement, reference='previous', name='updating_movement')
updating_movmag = Criteria(_movmag, reference='previous', name='updating_movmag')
taylor = Criteria(_taylor, needs_grad=True, name='taylor')
# fasterai's first-order Taylor criterion: (w·grad)², averaged over a unit; |w|² where no gradient was computed
grad_crit = Criteria(_grad_score, needs_grad=True, name='grad_crit', reducer=Reducer.mean)
grad_crit.grad_optional = True
# Wanda (Sun et al., 2023): |w| times the norm of the input channel it multiplies, measured on calibration data
wanda = Criteria(torch.abs, needs_data=True, name='wanda')


def magnitude_criteria(transform_fn: Callable, **kwargs) -> Criteria:
    "A criteria scoring `transform_fn(w)` of the current weights."
    return Criteria(transform_fn, **kwargs)


def init_based_criteria(transform_fn: Callable, output_fn: Callable | None = None, return_init: bool = False,
                        **kwargs) -> Criteria:
    "A criteria comparing the weights with their initial values: `output_fn(f(w), f(w0))`, or `f(w0)` with `return_init`."
    return Criteria(transform_fn, needs_init=True, output_fn=output_fn, return_init=return_init, **kwargs)


def update_based_criteria(transform_fn: Callable, output_fn: Callable | None = None, **kwargs) -> Criteria:
    "A criteria comparing the weights with their values at the previous mask update."
    return Criteria(transform_fn, needs_update=True, output_fn=output_fn, **kwargs)


def activation_criteria(transform_fn: Callable, data_fn: str = 'l2_norm', **kwargs) -> Criteria:
    "A criteria weighting `transform_fn(w)` by the activation statistic of each input channel (calibration data)."
    return Criteria(transform_fn, needs_data=True, data_fn=data_fn, **kwargs)


CRITERIA = {c.name: c for c in [random, large_final, small_final, squared_final, large_init, small_init,
                                large_init_large_final, small_init_small_final, magnitude_increase, movement,
                                updating_magnitude_increase, updating_movement, movmag, updating_movmag, taylor,
                                grad_crit, wanda]}
criterias = tuple(CRITERIA)


def available_criterias() -> tuple[str, ...]:
    "The names of the built-in criteria (fasterai's, then this library's `taylor`, `grad_crit` and `wanda`)."
    return criterias
