"""Which tensors move with a channel: coupled channel groups traced with torch-pruning's `DependencyGraph`."""
from __future__ import annotations
import warnings
from dataclasses import dataclass, field
import torch, torch.nn as nn
import torch_pruning as tp

__all__ = ['trace', 'ChannelGroup', 'channel_groups', 'following_norms', 'output_layers', 'modules_run']

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
# ops without weights that carry a channel through unchanged or rearranged (torch-pruning maps the indices)
_CARRIERS = {tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
             tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.OUTPUT}


def _as_args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def trace(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced in eval mode with `example_inputs` (a tensor or a tuple).
    The model's train/eval flags are restored and no parameter or buffer changes; a failed trace raises ValueError."""
    if callable(example_inputs) and not isinstance(example_inputs, torch.Tensor): example_inputs = example_inputs()
    if example_inputs is None:
        raise ValueError("example_inputs=None: tracing the model's channels needs an example input, such as one batch")
    flags = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return tp.DependencyGraph().build_dependency(model, example_inputs=_as_args(example_inputs), verbose=False)
    except Exception as e:
        raise ValueError(f"torch-pruning could not trace {type(model).__name__} with example_inputs of shape "
                         f"{[tuple(getattr(x, 'shape', ())) for x in _as_args(example_inputs)]}: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        for m, t in flags.items(): m.training = t


@torch.no_grad()
def modules_run(model: nn.Module, example_inputs, modules) -> set:
    "Which of `modules` run in an eval forward pass of `model` on `example_inputs` (train/eval flags restored)."
    ran, flags = set(), {m: m.training for m in model.modules()}
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.add(mod)) for m in modules]
    try:
        model.eval()
        model(*_as_args(example_inputs))
    finally:
        for h in hooks: h.remove()
        for m, t in flags.items(): m.training = t
    return ran


def output_layers(dg: tp.DependencyGraph) -> list[nn.Module]:
    "The convolutions and linear layers whose output channels reach the model's outputs (never pruned)."
    found, seen = [], set()
    stack = [n for n in dg.module2node.values() if not n.outputs]
    while stack:
        node = stack.pop()
        if node in seen: continue
        seen.add(node)
        if isinstance(node.module, _WEIGHTED): found.append(node.module)
        else: stack.extend(node.inputs)
    return found


def _out_dim(m: nn.Module) -> int: return 1 if getattr(m, 'transposed', False) else 0
def _in_dim(m: nn.Module) -> int: return 0 if getattr(m, 'transposed', False) else 1


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.out_channels == m.in_channels


@dataclass
class _Slice:
    "One tensor's share of a group: `module`'s dim `dim` at `idxs`, position i carrying group channel `channels[i]`."
    name: str
    module: nn.Module
    kind: str  # 'out' (a producer's filters, with its bias), 'in' (a consumer's input slices), 'norm' (BatchNorm)
    idxs: torch.Tensor
    channels: torch.Tensor

    @property
    def dim(self) -> int:
        if self.kind == 'in' and not _depthwise(self.module): return _in_dim(self.module)
        return _out_dim(self.module) if isinstance(self.module, _WEIGHTED) else 0

    def params(self) -> list[tuple[torch.Tensor, int]]:
        "The tensors this slice cuts, each with its channel dim."
        m = self.module
        if self.kind == 'in' and not _depthwise(m): return [(m.weight, self.dim)]
        out = [(m.weight, self.dim)] if isinstance(getattr(m, 'weight', None), torch.Tensor) else []
        if isinstance(getattr(m, 'bias', None), torch.Tensor): out.append((m.bias, 0))
        return out

    def channel_mask(self, keep: torch.Tensor, size: int) -> torch.Tensor:
        "Boolean vector over the tensor's `size` channels: False where a pruned group channel sits."
        full = torch.ones(size, dtype=torch.bool, device=keep.device)
        full[self.idxs.to(keep.device)] = keep[self.channels.to(keep.device)]
        return full

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        "Per-position sums of element `scores` shaped as the weight."
        d = self.dim
        per = scores.movedim(d, 0).reshape(scores.shape[d], -1).sum(1)
        return per[self.idxs.to(per.device)]


@dataclass
class ChannelGroup:
    """Channels that must go together: channel i of the group is position `channels == i` in every slice. A group is
    named by its first producing layer in definition order."""
    name: str
    n: int
    slices: list[_Slice] = field(default_factory=list)
    why_not: str | None = None  # set when the group cannot be pruned, saying why

    def __repr__(self):
        return f"ChannelGroup({self.name!r}, n={self.n}, {[(s.name, s.kind) for s in self.slices]})"

    @property
    def modules(self) -> list[str]: return list(dict.fromkeys(s.name for s in self.slices))

    def unit_scores(self, scores: dict[str, torch.Tensor], names: dict[nn.Module, str]) -> torch.Tensor:
        """One score per group channel: the mean element score (`scores`: layer name -> element scores) over every
        weight slice of the channel in a scored layer, so groups of many tensors and of few compare fairly."""
        total = count = None
        for s in self.slices:
            n = names.get(s.module)
            if n is None or n not in scores or s.kind == 'norm': continue
            per = s.reduce(scores[n])
            if total is None: total, count = torch.zeros(self.n, device=per.device), torch.zeros(self.n, device=per.device)
            chans = s.channels.to(per.device)
            total.index_add_(0, chans, per)
            count.index_add_(0, chans, torch.full_like(per, scores[n].numel() // scores[n].shape[s.dim]))
        return total / count.clamp_min(1)

    def masks(self, keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        "(tensor, mask broadcastable to it) for every tensor of the group; `keep` is the group's boolean vector."
        out = []
        for s in self.slices:
            for p, d in s.params():
                shape = [1] * p.dim(); shape[d] = p.shape[d]
                out.append((p, s.channel_mask(keep.to(p.device), p.shape[d]).view(shape)))
        return out

    @torch.no_grad()
    def zero_channels(self) -> torch.Tensor:
        "Boolean vector: the group channels whose producers (filters, biases, BatchNorm scale and shift) are all zero."
        dead = torch.ones(self.n, dtype=torch.bool)
        for s in self.slices:
            if s.kind == 'in': continue
            for p, d in s.params():
                nz = (p.detach() != 0).movedim(d, 0).reshape(p.shape[d], -1).any(1).cpu()
                dead[s.channels.cpu()[nz[s.idxs.cpu()]]] = False
        return dead


def _group_of(dg: tp.DependencyGraph, tp_group, names: dict, root_types: tuple) -> ChannelGroup:
    "Our description of one torch-pruning group, with `why_not` set where its channels cannot be removed exactly."
    root = tp_group[0].dep.target.module
    g = ChannelGroup(names[root], len(tp_group[0].idxs))
    for item in tp_group:
        m, handler = item.dep.target.module, item.dep.handler
        node_type = item.dep.target.type
        idxs, chans = torch.tensor(item.idxs, dtype=torch.long), torch.tensor(item.root_idxs, dtype=torch.long)
        name = names.get(m, str(m))
        if node_type in _CARRIERS: continue
        if isinstance(m, _WEIGHTED):
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _depthwise(m):
                g.why_not = g.why_not or f"layer {name!r} is a grouped convolution (groups={m.groups})"
            kind = 'out' if dg.is_out_channel_pruning_fn(handler) else 'in'
        elif isinstance(m, _BN):
            kind = 'norm'
            if not m.affine: g.why_not = g.why_not or f"BatchNorm {name!r} has no affine parameters to zero"
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            # its statistics span the channels: a zero channel changes the others, removing it is not exact
            g.why_not = g.why_not or f"{type(m).__name__} {name!r} normalizes across the channels"; continue
        else:
            g.why_not = g.why_not or f"layer {name!r} ({type(m).__name__}) holds channels that are not handled"; continue
        g.slices.append(_Slice(name, m, kind, idxs, chans))
    order = list(names.values())
    producers = [s.name for s in g.slices if s.kind == 'out' and s.name in order and isinstance(s.module, root_types)]
    if producers: g.name = min(producers, key=order.index)  # named by its first root-type producer in definition order
    return g


def channel_groups(dg: tp.DependencyGraph, root_types=(nn.modules.conv._ConvNd, nn.Linear),
                   prunable_only: bool = True) -> list[ChannelGroup]:
    """The coupled channel groups of a traced model, one per set of output channels that must go together, rooted at
    `root_types` layers. Groups whose channels reach the model's output are never listed; with `prunable_only`,
    neither are groups whose channels cannot be removed exactly (their `why_not` says why)."""
    names = {m: n for n, m in dg.model.named_modules()}
    outs = output_layers(dg)
    root_types = tuple(root_types)
    groups = [_group_of(dg, g, names, root_types) for g in dg.get_all_groups(ignored_layers=outs, root_module_types=root_types)]
    order = {n: i for i, n in enumerate(names.values())}
    groups.sort(key=lambda g: order.get(g.name, len(order)))
    return [g for g in groups if g.why_not is None] if prunable_only else groups


def following_norms(dg: tp.DependencyGraph, layers: dict[str, nn.Module]) -> dict[nn.Module, nn.Module]:
    """Each layer mapped to the BatchNorm its output channels feed in the traced graph, directly or through
    single-input element-wise ops (activations); a residual sum or a concatenation in between ends the search."""
    out = {}
    for m in layers.values():
        node = dg.module2node.get(m)
        while node is not None:
            nxt = node.outputs
            if len(nxt) != 1: break
            node = nxt[0]
            if len(node.inputs) != 1: break
            if isinstance(node.module, _BN):
                n_out = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else getattr(m, 'out_features', None)
                if node.module.num_features == n_out: out[m] = node.module
                break
            if node.type != tp.ops.OPTYPE.ELEMENTWISE: break
    return out
