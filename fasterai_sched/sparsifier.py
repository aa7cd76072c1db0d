"""Sparsifier: scores -> exact-count selection (local or global) -> boolean masks -> applied to the weights."""
from __future__ import annotations
import math, warnings
from fractions import Fraction
from numbers import Real
import numpy as np
import torch, torch.nn as nn
import torch.distributed as dist
from .granularity import Granularity, NMGranularity, get_granularity
from .criteria import Criteria, CRITERIA, large_final
from .selection import lowest_k, lowest_k_held, count_true
from .structure import trace, channel_groups, following_norms, modules_run, _depthwise

__all__ = ['Sparsifier', 'lowest_k', 'n_to_prune', 'check_sparsity', 'unwrap_model', 'warn_if_fraction', 'prunable_layers']


def unwrap_model(model: nn.Module) -> nn.Module:
    "The model inside DistributedDataParallel, DataParallel or `torch.compile` wrappers (it shares their parameters)."
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)): model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module): model = model._orig_mod  # torch.compile's
        else: return model


def _computed_weight(m: nn.Module) -> str | None:
    "How `m.weight` is computed from other tensors (a parametrization, a pruning or norm hook), or None if it is stored."
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(m, 'weight'):
        kinds = ', '.join(type(p).__name__ for p in m.parametrizations.weight)
        return f"a parametrization ({kinds}); torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') stores it"
    if 'weight' in m._parameters or 'weight' in m._buffers: return None
    if hasattr(m, 'weight_mask') and hasattr(m, 'weight_orig'):
        return "torch.nn.utils.prune (weight_orig * weight_mask); torch.nn.utils.prune.remove(layer, 'weight') stores it"
    if hasattr(m, 'weight_g') and hasattr(m, 'weight_v'):
        return "weight_norm's hook (weight_g, weight_v); torch.nn.utils.remove_weight_norm(layer) stores it"
    if hasattr(m, 'weight_orig'):
        return "spectral_norm's hook (weight_orig); torch.nn.utils.remove_spectral_norm(layer) stores it"
    if 'weight' not in m.__dict__ and not hasattr(type(m), 'weight'): return None  # no weight at all
    return "a hook or property"


def prunable_layers(model: nn.Module, layer_type: type) -> dict[str, nn.Module]:
    """The `layer_type` layers of `model` with a weight, by name; a weight shared by several layers (tied) is listed once,
    under its first layer. Raises on a lazy layer not yet initialised and on a weight computed from other tensors."""
    layers, seen = {}, set()
    for n, m in unwrap_model(model).named_modules():
        if not isinstance(m, layer_type): continue
        how = _computed_weight(m)  # before reading m.weight: computing it may have effects (spectral_norm's power iteration)
        if how is not None:
            raise ValueError(f"layer {n!r} ({type(m).__name__}) computes its weight from other tensors through {how}: "
                             f"zeroing the computed weight would prune nothing. Store the weight as a parameter first")
        w = getattr(m, 'weight', None)
        if not isinstance(w, torch.Tensor): continue
        if isinstance(w, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {n!r} ({type(m).__name__}) is lazy and has no weight yet: run one batch through the "
                             f"model (model(x)) before pruning, so that its shape is known")
        if id(w) in seen: continue  # tied: pruned once, with its first layer
        seen.add(id(w)); layers[n] = m
    return layers


def check_sparsity(value, name: str = 'sparsity') -> float:
    "`value` as a float percent in [0, 100], or a clear error naming `name`."
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}={value!r} must be a number, a percentage in [0, 100]")
    if not 0 <= value <= 100:  # NaN fails this too
        raise ValueError(f"{name}={value!r} is outside [0, 100]; sparsity is a percentage (90 means 90%)")
    return float(value)


def warn_if_fraction(value, name: str = 'sparsity') -> None:
    "Warn when a sparsity is in (0, 1): here it is a percent, where fasterai 0.4.1 reads a fraction."
    if isinstance(value, Real) and not isinstance(value, bool) and 0 < value < 1:
        warnings.warn(f"{name}={value!r} is a percent here: it prunes {value:g}% of the weights. Did you mean "
                      f"{value * 100:g}%? (fasterai 0.4.1 reads {value!r} as a fraction; pass {value * 100:g})",
                      UserWarning, stacklevel=3)


def n_to_prune(sparsity: float, n: int) -> int:
    "Exactly floor(sparsity/100 * n), computed without floating-point error."
    return math.floor(Fraction(sparsity) * n / 100)


def _seed(seed: int, layer: int, draw: int | None = None) -> int:
    "A generator seed from the user's seed, a layer's index and (for restarted channels) a draw count, for any int seed."
    x = seed * 100_003 + layer
    return (x if draw is None else x * 7_919 + draw) % 2 ** 63


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _mul_masks_cpu(params: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    "CPU `apply`: torch casts a bool mask to a fresh float copy at each multiply, numpy casts it in small buffers."
    for p, m in zip(params, masks):
        if p.dtype in _NUMPY_FLOATS:
            w = p.detach().numpy()
            np.multiply(w, m.numpy(), out=w)
        else: p.mul_(m)
    torch.autograd.graph.increment_version(params)  # numpy wrote behind autograd's back


def _regrown(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    "Per layer, the units kept in `new` and masked in `old`, for the layers where there are any (tightening holds none)."
    def kept_now(a, b):
        if a.device.type == 'cpu' and a.shape == b.shape and a.is_contiguous() and b.is_contiguous():
            return torch.from_numpy(np.greater(a.numpy(), b.numpy()))  # numpy: several times faster on CPU
        return a & ~b
    back = {n: kept_now(new[n], old[n]) for n in new if n in old}
    return {n: r for (n, r), c in zip(back.items(), count_true(list(back.values()))) if c}


def _from_rank0(*dicts: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    "Under an initialized torch.distributed group, every rank takes rank 0's boolean tensors (one broadcast)."
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2: return dicts
    ts = [t for d in dicts for t in d.values()]
    if not ts: return dicts
    # gloo broadcasts CPU tensors only, NCCL CUDA ones; bool is sent as uint8, which both backends take
    dev = torch.device('cuda', torch.cuda.current_device()) if 'nccl' in str(dist.get_backend()) else torch.device('cpu')
    flat = torch.cat([t.flatten().to(dev, torch.uint8) for t in ts])
    dist.broadcast(flat, src=0)
    parts = iter(flat.split([t.numel() for t in ts]))
    return tuple({n: next(parts).view(t.shape).to(t.device, torch.bool) for n, t in d.items()} for d in dicts)


class Sparsifier:
    """Prunes the `layer_type` layers of `model` to exact sparsities and keeps pruned weights at zero.

    With `coupled=True` (granularity 'filter') a unit is one channel of a coupled group traced from `example_inputs`:
    every filter, bias, BatchNorm channel and input slice that carries it is zeroed together. Whole-filter pruning
    finds the BatchNorm a filter feeds in the same trace; without `example_inputs` no BatchNorm is zeroed.
    `example_inputs` is a tensor, a tuple of tensors, or a function returning them (called only when a trace is needed)."""
    def __init__(self, model: nn.Module, granularity: str | Granularity = 'weight', context: str = 'local',
                 criteria: Criteria | str = large_final, layer_type: type = nn.Conv2d, round_to: int | None = None,
                 seed: int = 0, nm: bool = False, data=None, coupled: bool = False, example_inputs=None):
        if not isinstance(model, nn.Module): raise TypeError(f"model={model!r} must be an nn.Module")
        if isinstance(layer_type, bool):  # fasterai's positional order: (model, granularity, context, criteria, nm, ...)
            nm, layer_type = layer_type, (round_to if isinstance(round_to, type) else nn.Conv2d)
            if isinstance(round_to, type): round_to = None
        if isinstance(seed, bool) or not isinstance(seed, int): raise TypeError(f"seed={seed!r} must be an integer")
        if not isinstance(coupled, bool): raise TypeError(f"coupled={coupled!r} must be True or False")
        if not isinstance(nm, bool): raise TypeError(f"nm={nm!r} must be True or False")
        if nm:
            if granularity not in ('weight', '2:4'):
                raise ValueError(f"nm=True means granularity='2:4'; it cannot be combined with granularity={granularity!r}")
            granularity = '2:4'
        criteria = self.check_args(context, criteria, layer_type, round_to)
        if getattr(criteria, 'needs_data', False) and data is None:
            raise ValueError(f"criteria {criteria.name} weighs weights by activations: pass data= (a batch, a list of "
                             "batches or a DataLoader) to calibrate on")
        self.model, self.context, self.criteria, self.round_to, self.seed = unwrap_model(model), context, criteria, round_to, seed
        self.layers = prunable_layers(self.model, layer_type)
        if not self.layers:
            raise ValueError(f"layer_type={layer_type.__name__}: the model has no such layer with a weight to prune")
        if nm: self._drop_layers_without_groups()
        self.granularity = {n: get_granularity(granularity, type(m)) for n, m in self.layers.items()}
        for n, m in self.layers.items(): self.granularity[n].check(m.weight, n)
        self.granularity_name = next(iter(self.granularity.values())).name
        self.masks: dict[str, torch.Tensor] = {}
        self.n_units = {n: math.prod(self.granularity[n].unit_shape(m.weight.shape)) for n, m in self.layers.items()}
        self.n_pruned = {n: 0 for n in self.layers}
        self.reference: dict[str, torch.Tensor] = {}
        self.rewind_weights: dict[str, torch.Tensor] = {}
        self.sparsity_target: float | dict = 0.
        self.regrown: dict[str, torch.Tensor] = {}
        self._regrowths = 0  # whole channels restarted so far: seeds their fresh draws
        self.coupled, self.groups, self._bn = coupled, {}, {}
        if coupled: self._init_groups(granularity, layer_type, example_inputs)
        elif self._whole_channels(): self._bn = self._norms(example_inputs)
        self._targets: tuple[list, list] = ([], [])
        self._masked_pct = 0.
        self._found: dict[str, torch.Tensor] = {}  # units found at zero by masks_from_weights that this run never pruned
        self.layer_type = layer_type
        if criteria.reference: self.save_reference()
        self.activation_scale: dict[str, torch.Tensor] = {}
        if getattr(criteria, 'needs_data', False): self.calibrate(data)

    def calibrate(self, data, n_batches: int = 5) -> None:
        "Measure each pruned layer's per-input-channel activations on `data` (first `n_batches`), for activation criteria."
        from .criteria import activation_scales
        scales = activation_scales(self.model, data, self.layer_type, n_batches, self.criteria.data_fn)
        self.activation_scale = {n: scales[m] for n, m in self.layers.items() if m in scales}

    def _drop_layers_without_groups(self) -> None:
        "With nm=True (fasterai's switch), layers whose inputs do not split into groups of 4 are left dense, as fasterai does."
        skipped = []
        for n, m in list(self.layers.items()):
            try: get_granularity('2:4', type(m)).check(m.weight, n)
            except ValueError: skipped.append(n); del self.layers[n]
        if skipped: warnings.warn(f"nm=True: layers {skipped} have inputs that are not a multiple of 4; they stay dense")
        if not self.layers: raise ValueError("nm=True: no layer has inputs that split into groups of 4")

    @staticmethod
    def check_args(context: str = 'local', criteria: Criteria | str = large_final, layer_type: type = nn.Conv2d,
                   round_to: int | None = None) -> Criteria:
        "Raise on a bad argument, naming it; returns the `Criteria` (a name is looked up)."
        if context not in ('local', 'global'):
            raise ValueError(f"context={context!r} is not allowed; use 'local' or 'global'")
        if isinstance(criteria, str):
            if criteria not in CRITERIA: raise ValueError(f"criteria={criteria!r} is not known; valid: {sorted(CRITERIA)}")
            criteria = CRITERIA[criteria]
        if not isinstance(criteria, Criteria):
            raise TypeError(f"criteria={criteria!r} must be a Criteria (such as large_final) or one of {sorted(CRITERIA)}")
        if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
            raise TypeError(f"layer_type={layer_type!r} must be an nn.Module subclass such as nn.Conv2d")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to={round_to!r} must be None or a positive integer")
        return criteria

    # ---- weights kept aside ----
    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {n: m.weight.detach().clone() for n, m in self.layers.items()}

    def save_reference(self) -> None:
        "Keep the weights the criteria compares with (its 'init' or 'previous' weights)."
        self.reference = self._copy_weights()

    def save_rewind(self) -> None:
        "Keep the current weights for lottery-ticket rewinding."
        self.rewind_weights = self._copy_weights()

    def rewind(self) -> None:
        "Reset the surviving weights to those kept by `save_rewind`; pruned ones stay zero."
        if not self.rewind_weights: raise RuntimeError("rewind() before save_rewind(): no weights were kept")
        with torch.no_grad():
            for n, m in self.layers.items(): m.weight.copy_(self.rewind_weights[n])
        self.apply()

    # ---- selection ----
    def _targets_per_layer(self, sparsity) -> dict[str, float]:
        if isinstance(sparsity, dict):
            if self.context != 'local':
                raise ValueError("sparsity as a dict of layer name -> percent needs context='local', "
                                 f"got context={self.context!r}")
            unknown = [k for k in sparsity if k not in self.n_units]
            what = 'channel groups (named by their first layer)' if self.coupled else 'layers'
            if unknown: raise ValueError(f"sparsity names {what} the model has not: {unknown}; pruned {what}: {list(self.n_units)}")
            return {n: check_sparsity(sparsity.get(n, 0), f"sparsity[{n!r}]") for n in self.n_units}
        s = check_sparsity(sparsity)
        return {n: s for n in self.n_units}

    def scores(self) -> dict[str, torch.Tensor]:
        "One score per unit for every layer, shaped as the layer's units; raises naming a layer with NaN or Inf."
        out = {n: self._score(i, n, m) for i, (n, m) in enumerate(self.layers.items())}
        self._check_finite(out)
        return out

    def _score(self, i: int, n: str, m: nn.Module) -> torch.Tensor:
        "The scores of layer `n` (the i-th), one per weight."
        gen = None
        if self.criteria.seeded:  # the same draws on every process and every call: masks nest as sparsity grows
            gen = torch.Generator(device=m.weight.device).manual_seed(_seed(self.seed, i))
        if self.criteria.needs_grad and m.weight.grad is None and not getattr(self.criteria, 'grad_optional', False):
            why = "it is frozen (requires_grad=False)" if not m.weight.requires_grad else "prune after a backward pass"
            raise RuntimeError(f"criteria {self.criteria.name} needs gradients, and layer {n!r} has none: {why}")
        out = self.criteria(m.weight, self.reference.get(n), m.weight.grad, gen, self.activation_scale.get(n))
        if out.shape != m.weight.shape:
            raise ValueError(f"criteria {self.criteria.name} gave scores of shape {tuple(out.shape)} for layer {n!r}, "
                             f"whose weight has shape {tuple(m.weight.shape)}: a criteria scores every weight")
        return out

    def _check_finite(self, scores: dict[str, torch.Tensor]) -> None:
        finite = torch.stack([torch.stack(torch.aminmax(s)) for s in scores.values()]).isfinite().all(1).tolist()
        bad = [n for n, ok in zip(scores, finite) if not ok]
        if bad: raise ValueError(f"criteria {self.criteria.name} gave NaN or Inf scores for layer {bad[0]!r}")

    def _local_masks(self, targets: dict[str, float]) -> tuple[dict, dict]:
        """Local context, layer by layer: scores, unit scores, selection and weight mask while the layer's scores are
        still in cache (keep masks, pruned units); the selection reads its counts per layer anyway. Not in threads:
        torch ops in a second thread start a second OpenMP team, whose spinning slowed a whole CPU fit by 40% for 6 ms
        saved per recompute."""
        def one(i, n, m):
            e = self._score(i, n, m)
            self._check_finite({n: e})
            u = self.criteria.unit_scores(e, self.granularity[n])
            p = self._lowest_units(n, u, targets[n])
            return self.granularity[n].weight_mask(~p.view(u.shape), e).to(m.weight.device), p
        done = [one(i, n, m) for i, (n, m) in enumerate(self.layers.items())]
        return {n: r[0] for n, r in zip(self.layers, done)}, {n: r[1] for n, r in zip(self.layers, done)}

    def _lowest_units(self, n: str, units: torch.Tensor, sparsity: float) -> torch.Tensor:
        "Local selection in layer (or group) `n`: its `sparsity` percent lowest units (rounded), flat."
        return lowest_k(units.flatten(), self._round(n, n_to_prune(sparsity, units.numel()), sparsity))

    def _round(self, n: str, k: int, sparsity: float) -> int:
        "Units to prune once the kept count is a multiple of `round_to` (nearest; at least one multiple below 100%)."
        if not self.round_to or sparsity >= 100: return k
        total = self.n_units[n]
        kept = max(self.round_to, self.round_to * round((total - k) / self.round_to))
        return max(0, total - min(kept, total))

    def _select(self, unit_scores: dict[str, torch.Tensor], targets: dict[str, float]) -> dict[str, torch.Tensor]:
        "Boolean 'pruned' tensor per layer (flat over units) with exact counts."
        if self.context == 'local':
            return {n: self._lowest_units(n, s, targets[n]) for n, s in unit_scores.items()}
        s = next(iter(targets.values()))
        flat = [v.flatten() for v in unit_scores.values()]
        sizes = [v.numel() for v in flat]
        total, k = sum(sizes), n_to_prune(s, sum(sizes))
        free = total - len(flat)  # each layer's best unit is held back so no layer empties, as long as the count allows it
        held = lowest_k_held(flat, k) if k <= free else None  # on CPU: layer by layer, no concatenated copy
        if held is not None: out = dict(zip(unit_scores, held))
        else:
            allv = torch.cat([v.to(flat[0].device) for v in flat])
            starts = torch.tensor([0] + sizes[:-1], device=allv.device).cumsum(0)
            best = starts + torch.stack([v.argmax().to(allv.device) for v in flat])
            if k <= free:
                allv[best] = math.inf  # allv is cat's own copy: hold the best units back in place
                pruned = lowest_k(allv, k)
            else:
                pruned = torch.ones(total, dtype=torch.bool, device=allv.device)
                pruned[best] = lowest_k(allv[best], k - free)
            out = dict(zip(unit_scores, pruned.split(sizes)))
        if self.round_to:
            out = {n: lowest_k(unit_scores[n].flatten(), self._round(n, int(p.sum()), s)) for n, p in out.items()}
        return {n: p.to(unit_scores[n].device) for n, p in out.items()}

    @torch.no_grad()
    def prune(self, sparsity: float | dict, optimizer=None) -> None:
        """Mask each layer (or all layers, globally) to `sparsity` percent of its units, then zero the pruned weights.

        Under an initialized torch.distributed group this is a collective: call it on every rank; all take rank 0's masks."""
        targets = self._targets_per_layer(sparsity)
        if self.context == 'local' and not self.coupled: new, pruned = self._local_masks(targets)
        else:
            elem = self.scores()
            if self.coupled: units = {n: g.unit_scores(elem, self._layer_names) for n, g in self.groups.items()}
            else: units = {n: self.criteria.unit_scores(e, self.granularity[n]) for n, e in elem.items()}
            pruned = self._select(units, targets)
            if self.coupled: new = {n: ~p.view(-1).to(self.layers[n].weight.device) for n, p in pruned.items()}
            else: new = {n: self.granularity[n].weight_mask(~pruned[n].view(units[n].shape), elem[n]).to(m.weight.device)
                         for n, m in self.layers.items()}
        new, pruned = _from_rank0(new, pruned)  # ranks agree even where their scores differ
        self._set_masks(new, optimizer)
        self.n_pruned = dict(zip(pruned, count_true(list(pruned.values()))))
        self.sparsity_target = sparsity
        self._update_masked_pct()
        if self.criteria.reference == 'previous': self.save_reference()

    # ---- fasterai's method names ----
    def _layer_name(self, module: nn.Module) -> str:
        for n, m in self.layers.items():
            if m is module: return n
        raise ValueError(f"module={type(module).__name__} is not one of the pruned {self.layer_type.__name__} layers "
                         f"of this Sparsifier")

    def _group_name(self, module: nn.Module) -> str:
        "With coupled=True: the group whose channels `module` produces."
        for n, g in self.groups.items():
            if any(s.module is module and s.kind == 'out' for s in g.slices): return n
        raise ValueError(f"module={type(module).__name__} produces no coupled channel group this Sparsifier prunes; "
                         f"groups: {list(self.groups)}")

    def _per_layer(self, sparsities) -> dict[str, float]:
        "fasterai's per-layer list (one percent per pruned layer, in the model's order) as a dict by layer name."
        sparsities = list(sparsities)
        if self.coupled:  # one percent per coupled group, in the order of `groups`
            if len(sparsities) != len(self.groups):
                raise ValueError(f"sparsity is a list of {len(sparsities)} percents, but the model has {len(self.groups)} "
                                 f"coupled channel groups to prune: {list(self.groups)}")
            return dict(zip(self.groups, sparsities))
        if len(sparsities) != len(self.layers):
            raise ValueError(f"sparsity is a list of {len(sparsities)} percents, but the model has {len(self.layers)} "
                             f"{self.layer_type.__name__} layers to prune: {list(self.layers)}")
        return dict(zip(self.layers, sparsities))

    def _named_targets(self, sparsity) -> float | dict:
        "A sparsity list, or a dict keyed by modules (fasterai allows both), as a dict by layer name; a number as it is."
        if isinstance(sparsity, (list, tuple)): return self._per_layer(sparsity)
        if not isinstance(sparsity, dict): return sparsity
        name = self._group_name if self.coupled else self._layer_name
        return {k if isinstance(k, str) else name(k): v for k, v in sparsity.items()}

    @torch.no_grad()
    def sparsify_layer(self, module: nn.Module, sparsity: float, round_to: int | None = None) -> None:
        "Prune one layer to exactly `sparsity` percent of its units (local to it); the other layers' masks stay."
        name = self._group_name(module) if self.coupled else self._layer_name(module)
        check_sparsity(sparsity); warn_if_fraction(sparsity)
        if round_to is not None: self.check_args(round_to=round_to)
        if self.coupled: elem, units = None, self.groups[name].unit_scores(self.scores(), self._layer_names)
        else:
            elem = self.scores()[name]
            units = self.criteria.unit_scores(elem, self.granularity[name])
        saved = self.round_to
        if round_to is not None: self.round_to = round_to
        try: k = self._round(name, n_to_prune(sparsity, units.numel()), sparsity)
        finally: self.round_to = saved
        keep = ~lowest_k(units.flatten(), k).view(units.shape)
        if self.coupled: mask = keep.to(self.layers[name].weight.device)
        else: mask = self.granularity[name].weight_mask(keep, elem).to(module.weight.device)
        (new,) = _from_rank0({**self.masks, name: mask})
        self._set_masks(new)
        self.n_pruned[name] = k
        self._update_masked_pct()
        if self.criteria.reference == 'previous': self.save_reference()

    def sparsify_model(self, sparsity: float | dict, round_to: int | None = None) -> None:
        "Prune every layer (or all together, in global context) to `sparsity` percent: a number or a dict per layer."
        sparsity = self._named_targets(sparsity)
        for k, v in (sparsity.items() if isinstance(sparsity, dict) else [('sparsity', sparsity)]):
            warn_if_fraction(v, k if k == 'sparsity' else f"sparsity[{k!r}]")
        if round_to is not None: self.check_args(round_to=round_to)
        saved = self.round_to
        if round_to is not None: self.round_to = round_to
        try: self.prune(sparsity)
        finally: self.round_to = saved

    def print_sparsity(self) -> None:
        "Print the sparsity report of the pruned layers, measured from the weights."
        from .report import sparsity_report
        sparsity_report(self.model, self.layer_type)

    def save_model(self, path, model: nn.Module | None = None) -> None:
        "Save `model` (default: the pruned one) with `torch.save`, its pruned weights at zero."
        self.apply()
        torch.save(unwrap_model(model) if model is not None else self.model, path)

    def _set_masks(self, new: dict[str, torch.Tensor], optimizer=None) -> None:
        "Install `new` masks; weights that come back restart at zero with fresh optimizer state."
        if self.coupled: return self._set_group_masks(new, optimizer)
        self.regrown = _regrown(new, self.masks)
        for n, where in self.regrown.items():
            if n in self._found: where = where & ~self._found[n]  # found at zero, never pruned: only unmasked
            ch = self._output_mask(n, where)
            if ch is None: self.layers[n].weight.masked_fill_(where.expand_as(self.layers[n].weight), 0)
            else: self._restart_channels(n, where, ch)
            if optimizer is not None:
                for p, w in [(self.layers[n].weight, where), *self._channel_params(n, where)]:
                    reset_optimizer_state(optimizer, p, w)
        self.masks, self._found = new, {}  # from now on every masked unit is one this run chose
        self._build_targets()
        self.apply()

    def _restart_channels(self, n: str, where: torch.Tensor, ch: torch.Tensor) -> None:
        """Regrown whole output channels start as new ones: weights drawn as PyTorch initializes a fresh layer
        (uniform within 1/sqrt(fan_in)), bias 0, the following BatchNorm at (1, 0) with fresh running statistics.
        At zero they could never learn: zero weights give a constant channel, and BatchNorm and ReLU pass it no gradient.
        The draw is seeded (seed, layer, regrowth count), so every process of a distributed run draws the same."""
        w, m = self.layers[n].weight, self.layers[n]
        self._regrowths += 1
        g = torch.Generator().manual_seed(_seed(self.seed, list(self.layers).index(n), self._regrowths))
        bound = 1 / math.sqrt(max(1, w[0].numel()))
        fresh = torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g).to(w.device, w.dtype)
        w.copy_(torch.where(where.expand_as(w), fresh, w))
        bn = self._bn.get(m)
        for p, p_ch in self._channel_params(n, where):  # the bias and BatchNorm parameters that go with the channels
            p.masked_fill_(p_ch, 1 if bn is not None and p is bn.weight else 0)
        if bn is not None and bn.num_features == ch.numel() and bn.running_mean is not None:
            ch = ch.to(bn.running_mean.device)
            bn.running_mean.masked_fill_(ch, 0); bn.running_var.masked_fill_(ch, 1)

    def _build_targets(self) -> None:
        "The flat lists `apply` multiplies: each weight (and for whole filters, its bias and BatchNorm) with its mask."
        if self.coupled: self._targets = self._group_targets(); return
        params, masks = [], []
        for n, m in self.layers.items():
            mask = self.masks.get(n)
            if mask is None: continue
            params.append(m.weight); masks.append(mask.expand_as(m.weight))
            for p, out_mask in self._channel_params(n, mask): params.append(p); masks.append(out_mask)
        self._targets = (params, masks)

    def _channel_params(self, n: str, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        "When units are whole output channels: the bias and following BatchNorm parameters, each with its channel mask."
        out_mask = self._output_mask(n, mask)
        if out_mask is None: return []
        m = self.layers[n]
        extra = [m.bias] if isinstance(getattr(m, 'bias', None), torch.Tensor) else []
        bn = self._bn.get(m)
        if bn is not None and bn.affine and bn.num_features == out_mask.numel(): extra += [bn.weight, bn.bias]
        return [(p, out_mask.to(p.device)) for p in extra]

    def _output_mask(self, n: str, mask: torch.Tensor) -> torch.Tensor | None:
        "For a granularity whose units are whole output channels, the per-channel mask; else None."
        # only layers whose weight layout is known: a registered custom layer (GPT-2's Conv1D stores (in, out)) is not
        if not isinstance(self.layers[n], (nn.Linear, nn.modules.conv._ConvNd)): return None
        out_dim = 1 if type(self.layers[n]).__name__.startswith('ConvTranspose') else 0
        # decided by the granularity, not the mask's shape: a (1, 1, 1, 1) 'channel' or 'weight' mask is no filter
        if mask.dim() < 2 or set(self.granularity[n].dims) != set(range(mask.dim())) - {out_dim}: return None
        # a grouped ConvTranspose's weight holds out_channels/groups columns, column j feeding channel j of every group
        return mask.flatten().repeat(getattr(self.layers[n], 'groups', 1) if out_dim == 1 else 1)

    @torch.no_grad()
    def apply(self) -> None:
        "Force every pruned weight back to exactly zero: one fused multiply over all masked tensors."
        params, masks = self._targets
        if not params: return
        if params[0].device.type == 'cpu': _mul_masks_cpu(params, masks)
        else: torch._foreach_mul_(params, masks)

    @torch.no_grad()
    def masks_from_weights(self, pruned: bool = True) -> None:
        """Rebuild masks from the weights (a unit whose weights are all zero is pruned), as after loading a pruned model.
        `pruned=False`: those zeros were not put there by this run (a zero-initialised layer), so a unit found at zero is
        never re-initialised when it comes back, only unmasked."""
        if self.coupled: return self._group_masks_from_weights()
        new, counts = {}, {}
        for n, m in self.layers.items():
            g, nonzero = self.granularity[n], m.weight != 0
            keep = nonzero.any(dim=g.dims, keepdim=True) if g.dims else nonzero
            if isinstance(g, NMGranularity):
                keep = g._groups(nonzero).sum(-1) > g.n
                new[n] = nonzero
            else: new[n] = keep = self._with_channel_params(n, keep)
            counts[n] = (~keep).sum()
        self.masks = {}
        self._set_masks(new)
        if not pruned: self._found = {n: ~k & ~self._norm_zeroed(n, k) for n, k in new.items()}
        self.n_pruned = dict(zip(counts, torch.stack(list(counts.values())).tolist()))
        self._update_masked_pct()

    def _norm_zeroed(self, n: str, keep: torch.Tensor) -> torch.Tensor:
        """Units whose following normalisation channel is zeroed too (weight and bias): the mark this library's filter
        pruning leaves, so such a filter found at zero was pruned, and restarts as a new filter when it comes back."""
        m, none = self.layers[n], torch.zeros_like(keep)
        bn = self._bn.get(m)
        ch = self._output_mask(n, keep)
        if ch is None or bn is None or not bn.affine or bn.num_features != ch.numel(): return none
        zeroed = (bn.weight == 0) & (bn.bias == 0)
        if type(m).__name__.startswith('ConvTranspose'): zeroed = zeroed.view(getattr(m, 'groups', 1), -1).all(0)
        return zeroed.to(keep.device).view(keep.shape)

    def _with_channel_params(self, n: str, keep: torch.Tensor) -> torch.Tensor:
        "A whole filter counts as pruned only if its bias and normalisation channel are zero too, as pruning leaves them."
        params = self._channel_params(n, keep)
        if not params: return keep
        nonzero = torch.stack([p != 0 for p, _ in params]).any(0)
        m = self.layers[n]
        if type(m).__name__.startswith('ConvTranspose'): nonzero = nonzero.view(getattr(m, 'groups', 1), -1).any(0)
        return keep | nonzero.to(keep.device).view(keep.shape)

    def _update_masked_pct(self) -> None:
        "Percent of weights the masks zero, kept so that reading it costs no device sync."
        if self.coupled:
            ids = {id(m.weight) for m in self.layers.values()}
            ws = [(p, m) for p, m in zip(*self._targets) if id(p) in ids]
        else: ws = [(self.layers[n].weight, m) for n, m in self.masks.items()]
        if not ws: self._masked_pct = 0.; return
        pruned = sum((m.numel() - c) * (w.numel() // m.numel()) for (w, m), c in zip(ws, count_true([m for _, m in ws])))
        self._masked_pct = 100. * pruned / sum(m.weight.numel() for m in self.layers.values())

    def masked_sparsity(self) -> float:
        "Percent of the pruned layers' weights that the masks hold at zero (no device sync)."
        return self._masked_pct

    # ---- device, measure, state ----
    def to(self, device=None) -> 'Sparsifier':
        "Move masks and kept weights to the device of their layers (after the model moved)."
        for d in (self.masks, self.reference, self.rewind_weights):
            for n in d: d[n] = d[n].to(self.layers[n].weight.device)
        self._build_targets()
        return self

    @torch.no_grad()
    def sparsity(self) -> float:
        "Percent of the pruned layers' weights that are zero, measured from the weights."
        ws = [m.weight for m in self.layers.values()]
        zeros = torch.stack([(w.numel() - w.count_nonzero()).to('cpu') for w in ws]).sum().item()
        return 100. * zeros / sum(w.numel() for w in ws)

    def state_dict(self) -> dict:
        "Masks, kept weights and the last target, as a plain dict of tensors."
        return {'masks': dict(self.masks), 'reference': dict(self.reference), 'rewind': dict(self.rewind_weights),
                'n_pruned': dict(self.n_pruned), 'sparsity_target': self.sparsity_target}

    def load_state_dict(self, state: dict) -> None:
        "Restore what `state_dict` returned, on the layers' devices, and re-apply the masks."
        unknown = set(state['masks']) - set(self.n_units)
        if unknown: raise ValueError(f"state names {'channel groups' if self.coupled else 'layers'} this model has not: "
                                     f"{sorted(unknown)}")
        dev = {n: m.weight.device for n, m in self.layers.items()}
        self.masks = {n: t.to(dev[n]) for n, t in state['masks'].items()}
        self.reference = {n: t.to(dev[n]) for n, t in state.get('reference', {}).items()} or self.reference
        self.rewind_weights = {n: t.to(dev[n]) for n, t in state.get('rewind', {}).items()}
        self.n_pruned = {**self.n_pruned, **state.get('n_pruned', {})}
        self.sparsity_target = state.get('sparsity_target', 0.)
        self._build_targets()
        self._update_masked_pct()
        self.apply()

    def memory_bytes(self) -> dict[str, int]:
        "Bytes held beside the model: masks, and copies of weights (reference, rewind)."
        size = lambda d: sum(t.numel() * t.element_size() for t in d.values())
        return {'masks': size(self.masks), 'weight_copies': size(self.reference) + size(self.rewind_weights)}

    # ---- structure: BatchNorms after whole filters, coupled channel groups (traced) ----
    def _whole_channels(self) -> bool:
        "Does some layer's granularity make units of whole output channels (so a bias and a BatchNorm go with them)?"
        for n, m in self.layers.items():
            out_dim = 1 if type(m).__name__.startswith('ConvTranspose') else 0
            if m.weight.dim() >= 2 and set(self.granularity[n].dims) == set(range(m.weight.dim())) - {out_dim}: return True
        return False

    def _norms(self, example_inputs) -> dict[nn.Module, nn.Module]:
        "The BatchNorm each layer's output channels feed, from the graph traced with `example_inputs`."
        if example_inputs is None:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
                warnings.warn(f"granularity={self.granularity_name!r} without example_inputs: the BatchNorm channels that "
                              "pruned filters feed are not zeroed; pass example_inputs (one batch) to find them in the "
                              "traced graph")
            return {}
        try: dg = trace(self.model, example_inputs)
        except ValueError as e:
            warnings.warn(f"{e}; the BatchNorm channels that pruned filters feed are not zeroed")
            return {}
        return following_norms(dg, self.layers)

    def _init_groups(self, granularity, layer_type: type, example_inputs) -> None:
        "Trace the model and make each coupled channel group (named by its first layer) a layer of units."
        if not self._whole_channels() or not all(self.granularity[n].name == self.granularity_name for n in self.layers):
            raise ValueError(f"coupled=True prunes whole output channels: it needs granularity='filter', "
                             f"got granularity={self.granularity_name!r}")
        if example_inputs is None:
            raise ValueError("coupled=True needs example_inputs (a batch of inputs, or a tuple of them) to trace which "
                             "tensors move together with each channel")
        if callable(example_inputs) and not isinstance(example_inputs, torch.Tensor): example_inputs = example_inputs()
        dg = trace(self.model, example_inputs)
        missing = {n: m for n, m in self.layers.items() if m not in dg.module2node}
        idle = [n for n, m in missing.items() if m not in modules_run(self.model, example_inputs, missing.values())]
        if idle:  # an auxiliary head that runs only in training: its inputs would be cut without it knowing
            raise ValueError(f"layer {idle[0]!r} does not run in an eval forward pass of {type(self.model).__name__}, so "
                             "the trace cannot couple its channels with the layers that feed it (an auxiliary head? "
                             "build the model without it, e.g. aux_logits=False), or prune without coupled=True")
        if missing:
            missing = list(missing)
            raise ValueError(f"torch-pruning's trace of {type(self.model).__name__} did not reach layer {missing[0]!r}: "
                             "its output is not in the autograd graph of the model's output (detached, or computed "
                             "without gradients), so its channels cannot be coupled")
        every = channel_groups(dg, root_types=(layer_type,), prunable_only=False)
        groups = [g for g in every if g.why_not is None]
        if not groups:
            why = f": {every[0].why_not}" if every else ": every channel reaches the model's output"
            raise ValueError(f"coupled=True: {type(self.model).__name__} has no channel group of {layer_type.__name__} "
                             f"layers that can be pruned{why}")
        self.groups = {g.name: g for g in groups}
        self._layer_names = {m: n for n, m in self.layers.items()}
        self.n_units = {n: g.n for n, g in self.groups.items()}
        self.n_pruned = {n: 0 for n in self.groups}

    def _group_targets(self) -> tuple[list, list]:
        "Each tensor of every masked group with one mask (the groups that cut it combined), expanded to its shape."
        pairs: dict[int, list] = {}
        for n, g in self.groups.items():
            keep = self.masks.get(n)
            if keep is None: continue
            for p, mask in g.masks(keep):
                if id(p) in pairs: pairs[id(p)][1] = pairs[id(p)][1] & mask
                else: pairs[id(p)] = [p, mask]
        pairs = [(p, m) for p, m in pairs.values()]
        return [p for p, _ in pairs], [m.expand_as(p) for p, m in pairs]

    @torch.no_grad()
    def _group_masks_from_weights(self) -> None:
        "A group channel is pruned when its filters, biases and BatchNorm scale and shift are all zero."
        new = {n: ~g.zero_channels().to(self.layers[n].weight.device) for n, g in self.groups.items()}
        self.masks = {}
        self._set_masks(new)
        self.n_pruned = {n: int((~k).sum()) for n, k in new.items()}
        self._update_masked_pct()

    def _set_group_masks(self, new: dict[str, torch.Tensor], optimizer=None) -> None:
        "Install group masks; regrown channels restart as new ones (see `_restart_group`)."
        self.regrown = _regrown(new, self.masks)
        for n, where in self.regrown.items(): self._restart_group(n, where, optimizer)
        self.masks = new
        self._build_targets()
        self.apply()

    def _restart_group(self, n: str, where: torch.Tensor, optimizer=None) -> None:
        """Regrown group channels start as new ones: filters drawn as a fresh layer's (uniform within 1/sqrt(fan_in)),
        biases 0, BatchNorm at (1, 0) with fresh running statistics; the consumers' input slices restart from zero."""
        self._regrowths += 1
        gen = torch.Generator().manual_seed(_seed(self.seed, list(self.groups).index(n), self._regrowths))
        for s in self.groups[n].slices:
            for p, d in s.params():
                shape = [1] * p.dim(); shape[d] = p.shape[d]
                at = (~s.channel_mask(~where.cpu(), p.shape[d])).view(shape).to(p.device)
                if s.kind == 'norm': p.masked_fill_(at, 1 if p is s.module.weight else 0)
                elif p.dim() >= 2 and (s.kind == 'out' or _depthwise(s.module)):
                    bound = 1 / math.sqrt(max(1, p.numel() // p.shape[d]))
                    fresh = torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
                    p.copy_(torch.where(at, fresh.to(p.device, p.dtype), p))
                else: p.masked_fill_(at, 0)
                if optimizer is not None: reset_optimizer_state(optimizer, p, at)
            bn = s.module
            if s.kind == 'norm' and bn.running_mean is not None:
                ch = ~s.channel_mask(~where.cpu(), bn.num_features).to(bn.running_mean.device)
                bn.running_mean.masked_fill_(ch, 0); bn.running_var.masked_fill_(ch, 1)


def reset_optimizer_state(optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    "Zero the optimizer's per-element state of `param` at `where` (torch and fastai optimizers alike)."
    state = getattr(optimizer, 'state', {}).get(param, {})
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.shape == param.shape: v.masked_fill_(where.expand_as(v), 0)
