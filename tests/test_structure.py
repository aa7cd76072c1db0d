"""Structure traced with torch-pruning: following BatchNorms, coupled groups (residual sums, concatenations), and
coupled pruning in the Sparsifier: exact counts, only the group's tensors, regrowth, state, bad input."""
import copy, warnings
import pytest, torch, torch.nn as nn
import torchvision.models as tvm
from fasterai_sched import Sparsifier, large_final, random
from fasterai_sched.structure import trace, channel_groups, following_norms
from conftest import small_net

X = torch.randn(2, 3, 16, 16)


def randomize_(model):
    "Non-trivial BatchNorm parameters and statistics, so that zeroing (or not) shows."
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean): t.copy_(torch.rand(t.shape, generator=g) + .5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + .5)
            if isinstance(m, nn.Conv2d) and m.bias is not None: m.bias.copy_(torch.rand(m.bias.shape, generator=g) + .5)
    return model


def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Residual(nn.Module):
    "Two convolutions whose outputs are summed: their output channels are one group."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.c, self.head = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 2)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.head(self.c(y).mean((2, 3)))


class Concat(nn.Module):
    "Two branches concatenated: each branch's channels are a group, matching a slice of the next conv's input."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c, self.head = nn.Conv2d(10, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(self.c(y).mean((2, 3)))


class PreAct(nn.Module):
    """Definition order is not dataflow: `bn` normalises the residual sum, not `conv`'s output alone, and the two
    ModuleLists define every BatchNorm after every convolution."""
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.convs[0](x)          # convs[0] feeds a residual sum, never a BatchNorm directly
        x = self.bns[0](x)                # the sum's BatchNorm
        x = self.bns[1](self.convs[1](torch.relu(x)))  # convs[1] -> bns[1]: a real following BatchNorm
        return self.head(x.mean((2, 3)))


# ---- BatchNorm found in the graph, not by definition order ----
def test_following_norms_follow_dataflow_not_definition_order():
    m = PreAct()
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    norms = following_norms(trace(m, X), layers)
    assert norms == {m.convs[1]: m.bns[1]}


def test_filter_pruning_leaves_the_batchnorm_of_a_residual_sum_alone():
    m = randomize_(PreAct())
    snap = state(m)
    sp = Sparsifier(m, 'filter', 'local', large_final, example_inputs=X)
    sp.prune(50)
    assert torch.equal(m.bns[0].weight, snap['bns.0.weight']) and torch.equal(m.bns[0].bias, snap['bns.0.bias'])
    gone = (m.convs[1].weight == 0).all(dim=(1, 2, 3))
    assert int(gone.sum()) == 4
    assert not m.bns[1].weight[gone].any() and not m.bns[1].bias[gone].any()
    assert torch.equal(m.bns[1].weight[~gone], snap['bns.1.weight'][~gone])


def test_filter_without_example_inputs_warns_and_zeroes_no_batchnorm():
    m = randomize_(small_net())
    snap = state(m)
    with pytest.warns(UserWarning, match='example_inputs'):
        sp = Sparsifier(m, 'filter', 'local', large_final)
    sp.prune(50)
    assert (m[0].weight == 0).all(dim=(1, 2, 3)).sum() == 16
    assert torch.equal(m[1].weight, snap['1.weight']) and torch.equal(m[1].bias, snap['1.bias'])


def test_weight_granularity_traces_nothing_and_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        Sparsifier(small_net(), 'weight', 'local', large_final).prune(50)


# ---- coupled groups ----
def test_residual_sum_is_one_group_with_every_tensor():
    m = Residual()
    groups = {g.name: g for g in channel_groups(trace(m, X), root_types=(nn.Conv2d,))}
    assert list(groups) == ['a', 'c']  # named by their first producer; 'c' feeds the head's input
    g = groups['a']
    kinds = {(s.name, s.kind) for s in g.slices}
    assert kinds == {('a', 'out'), ('b', 'out'), ('bn_a', 'norm'), ('bn_b', 'norm'), ('c', 'in')}


def test_concatenation_maps_each_branch_to_its_slice():
    m = Concat()
    groups = {g.name: g for g in channel_groups(trace(m, X), root_types=(nn.Conv2d,))}
    bn_b = next(s for s in groups['b'].slices if s.name == 'bn')
    c_b = next(s for s in groups['b'].slices if s.name == 'c')
    assert bn_b.idxs.tolist() == list(range(4, 10)) and c_b.idxs.tolist() == list(range(4, 10))
    assert bn_b.channels.tolist() == list(range(6))


@pytest.mark.parametrize('model_fn, pruned_in', [(Residual, ['a', 'b', 'bn_a', 'bn_b', 'c']),
                                                 (Concat, ['a', 'b', 'bn', 'c'])], ids=['residual', 'concat'])
def test_a_pruned_channel_is_zero_in_every_tensor_of_its_group_and_only_there(model_fn, pruned_in):
    torch.manual_seed(0)
    m = randomize_(model_fn())
    snap = state(m)
    sp = Sparsifier(m, 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp.prune(50)
    zeroed, expected = {}, set()
    for g in sp.groups.values():
        keep = sp.masks[g.name]
        assert int((~keep).sum()) == g.n // 2  # exact count per group
        for p, mask in g.masks(keep): expected.add(id(p))
    now = m.state_dict(keep_vars=True)
    for k, v in now.items():
        if 'running' in k or 'num_batches' in k:
            assert torch.equal(v, snap[k]), k  # buffers are left alone
            continue
        changed = v.detach() != snap[k]
        if id(v) not in expected: assert not changed.any(), k  # tensors outside every group: untouched
        else: assert (v.detach()[changed] == 0).all(), k     # inside: changed only to zero
        zeroed[k.rsplit('.', 1)[0]] = bool(changed.any())
    assert [n for n in pruned_in if not zeroed[n]] == []
    assert not zeroed['head']  # the output layer is never pruned


def test_every_producer_of_a_residual_sum_loses_the_same_channels():
    m = randomize_(Residual())
    Sparsifier(m, 'filter', 'local', large_final, coupled=True, example_inputs=X).prune(50)
    gone_a, gone_b = (m.a.weight == 0).all(dim=(1, 2, 3)), (m.b.weight == 0).all(dim=(1, 2, 3))
    assert torch.equal(gone_a, gone_b) and int(gone_a.sum()) == 4
    kept_c = m.c.weight.any(dim=(1, 2, 3))  # 'c' is a group of its own, pruned by half too
    assert int(kept_c.sum()) == 3
    assert not m.c.weight[:, gone_a].any() and m.c.weight[kept_c][:, ~gone_a].abs().sum((2, 3)).gt(0).all()
    assert not m.bn_a.bias[gone_a].any() and not m.bn_b.weight[gone_a].any()


def test_the_output_layer_is_never_pruned():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten())  # the last conv is the output
    sp = Sparsifier(m, 'filter', 'global', large_final, coupled=True, example_inputs=torch.randn(1, 3, 5, 5))
    assert list(sp.groups) == ['0']
    bias = m[2].bias.detach().clone()
    sp.prune(50)
    assert int(m[2].weight.abs().sum(dim=(0, 2, 3)).eq(0).sum()) == 4  # its input slices go with group '0'
    assert m[2].weight.any(dim=(1, 2, 3)).all() and torch.equal(m[2].bias, bias)  # its own filters all stay


@pytest.mark.parametrize('context', ['local', 'global'])
def test_coupled_counts_are_exact_and_round_to_holds(context):
    m = tvm.resnet18(num_classes=3)
    sp = Sparsifier(m, 'filter', context, large_final, coupled=True, example_inputs=X, round_to=8)
    sp.prune(40)
    for n, k in sp.n_pruned.items():
        assert (sp.n_units[n] - k) % 8 == 0, n
        assert int((~sp.masks[n]).sum()) == k
    sp2 = Sparsifier(tvm.resnet18(num_classes=3), 'filter', context, large_final, coupled=True, example_inputs=X)
    sp2.prune(40)
    total = sum(sp2.n_units.values())
    if context == 'global': assert sum(sp2.n_pruned.values()) == int(0.4 * total)
    else: assert sp2.n_pruned == {n: int(0.4 * u) for n, u in sp2.n_units.items()}


def test_depthwise_convolutions_are_coupled_with_their_producer():
    m = tvm.mobilenet_v2(num_classes=3)
    sp = Sparsifier(m, 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp.prune(50)
    expand, dw = m.features[2].conv[0][0], m.features[2].conv[1][0]   # 1x1 expansion -> 3x3 depthwise
    gone = (expand.weight == 0).all(dim=(1, 2, 3))
    assert int(gone.sum()) == expand.out_channels // 2
    assert torch.equal((dw.weight == 0).all(dim=(1, 2, 3)), gone)


def test_masks_nest_regrow_and_round_trip_through_state():
    m = tvm.resnet18(num_classes=3)
    sp = Sparsifier(m, 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp.prune(50)
    first = {n: k.clone() for n, k in sp.masks.items()}
    sp.prune(25)  # falling target: half the pruned channels come back
    assert all((sp.masks[n] | ~first[n]).all() for n in first)  # only pruned channels regrew
    n = 'layer1.0.conv1'
    back = sp.regrown[n]
    assert int(back.sum()) == 16
    assert m.layer1[0].conv1.weight[back].abs().sum(dim=(1, 2, 3)).gt(0).all()  # regrown filters drawn fresh
    assert torch.equal(m.layer1[0].bn1.weight[back], torch.ones(16)) and not m.layer1[0].bn1.bias[back].any()
    assert not m.layer1[0].conv2.weight[:, back].any()  # consumer slices restart at zero
    sd = copy.deepcopy(sp.state_dict())
    m2 = copy.deepcopy(m)
    sp2 = Sparsifier(m2, 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp2.load_state_dict(sd)
    assert all(torch.equal(sp2.masks[k], v) for k, v in sp.masks.items()) and sp2.n_pruned == sp.n_pruned
    sp3 = Sparsifier(copy.deepcopy(m), 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp3.masks_from_weights()
    assert sp3.n_pruned == sp.n_pruned


def test_random_criteria_is_seeded_in_coupled_groups():
    a, b = tvm.resnet18(num_classes=3), tvm.resnet18(num_classes=3)
    b.load_state_dict(a.state_dict())
    sa = Sparsifier(a, 'filter', 'global', random, seed=3, coupled=True, example_inputs=X); sa.prune(30)
    sb = Sparsifier(b, 'filter', 'global', random, seed=3, coupled=True, example_inputs=X); sb.prune(30)
    assert all(torch.equal(sa.masks[n], sb.masks[n]) for n in sa.masks)


def test_apply_holds_the_group_at_zero_after_an_update():
    m = Residual()
    sp = Sparsifier(m, 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp.prune(50)
    with torch.no_grad():
        for p in m.parameters(): p.add_(1)
    sp.apply()
    gone = ~sp.masks['a']
    assert not m.a.weight[gone].any() and not m.b.bias[gone].any() and not m.c.weight[:, gone].any()
    assert not m.bn_b.weight[gone].any()


# ---- bad input: a clear error, the model unchanged ----
class Detached(nn.Module):
    "The first convolution's output leaves the autograd graph: torch-pruning cannot see what it feeds."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x): return self.b(self.a(x).detach()).mean((2, 3))


@pytest.mark.parametrize('make, kw, err, match', [
    (small_net, dict(granularity='weight'), ValueError, r"coupled=True .* needs granularity='filter', got granularity='weight'"),
    (small_net, dict(granularity='kernel'), ValueError, r"granularity='filter', got granularity='kernel'"),
    (small_net, dict(example_inputs=None), ValueError, r"coupled=True needs example_inputs"),
    (small_net, dict(example_inputs=torch.randn(2, 5, 8, 8)), ValueError, r"torch-pruning could not trace Sequential"),
    (Detached, dict(), ValueError, r"did not reach layer 'a'"),
    (small_net, dict(coupled=1), TypeError, r"coupled=1 must be True or False"),
])
def test_bad_coupled_arguments_raise_naming_them_and_change_nothing(make, kw, err, match):
    m = make()
    snap = state(m)
    args = {**dict(granularity='filter', coupled=True, example_inputs=X), **kw}
    with pytest.raises(err, match=match):
        Sparsifier(m, context='local', criteria=large_final, **args)
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())
    assert m.training


def test_a_model_with_no_prunable_group_says_why():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())  # its only conv is the output
    with pytest.raises(ValueError, match="no channel group of Conv2d layers that can be pruned"):
        Sparsifier(m, 'filter', coupled=True, example_inputs=torch.randn(1, 3, 4, 4))


def test_a_layernorm_across_channels_makes_its_group_unprunable():
    m = tvm.convnext_tiny(num_classes=3)
    gs = channel_groups(trace(m, torch.randn(1, 3, 32, 32)), root_types=(nn.Conv2d,), prunable_only=False)
    assert gs and all('normalizes across the channels' in g.why_not for g in gs)
    sp = Sparsifier(m, 'filter', layer_type=nn.Linear, coupled=True, example_inputs=torch.randn(1, 3, 32, 32))
    assert len(sp.groups) == 18  # the MLP's hidden channels, one group per block


def test_a_layer_that_does_not_run_in_eval_is_named():
    "GoogLeNet's auxiliary classifiers run only in training: coupling would cut their inputs unseen."
    m = tvm.googlenet(num_classes=3, aux_logits=True, init_weights=True)
    snap = state(m)
    with pytest.raises(ValueError, match=r"layer 'aux1.conv.conv' does not run in an eval forward pass of GoogLeNet"):
        Sparsifier(m, 'filter', coupled=True, example_inputs=torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items()) and m.training


def test_fasterai_methods_work_on_coupled_groups():
    m = Residual()
    sp = Sparsifier(m, 'filter', 'local', large_final, coupled=True, example_inputs=X)
    sp.sparsify_layer(m.b, 50)  # 'b' produces group 'a' (the residual sum): the whole group is pruned
    assert sp.n_pruned['a'] == 4 and (m.a.weight == 0).all(dim=(1, 2, 3)).sum() == 4 and 'c' not in sp.masks
    sp.sparsify_model([25, 50])  # one percent per group, in the order of sp.groups
    assert sp.n_pruned == {'a': 2, 'c': 3}
    sp.sparsify_model({m.c: 0, 'a': 50})
    assert sp.n_pruned == {'a': 4, 'c': 0}
    with pytest.raises(ValueError, match="module=Linear produces no coupled channel group"): sp.sparsify_layer(m.head, 50)
    with pytest.raises(ValueError, match="2 coupled channel groups"): sp.sparsify_model([50])
