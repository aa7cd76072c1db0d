"""Granularities: exact pruned-unit counts for every granularity x layer type x context (hypothesis), and the registry."""
import math
from fractions import Fraction
import pytest, torch, torch.nn as nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fasterai_sched import Sparsifier, register_granularity, granularity_names, large_final
from fasterai_sched.granularity import GRANULARITIES, get_granularity

CONVS = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]
LAYER_TYPES = [nn.Linear, *CONVS]
NM = ['2:4', '1:2', '3:4', '1:3']
# 'channel' has fasterai's meaning since issue 10: a unit spans the input channels (one per output and kernel
# position); the former 'channel' (one unit per input channel) is fasterai's 'shared_kernel'
GRANS = {nn.Linear: ['weight', 'kernel', 'filter', 'channel', 'row', 'column', *NM],
         **{t: ['weight', 'kernel', 'filter', 'channel', 'shared_kernel', *NM] for t in CONVS}}
FILLS = ['random', 'equal', 'half_zero', 'few_values']
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the expected numbers, computed from the layer's own attributes (not from the code under test) ----
def expected_k(sparsity, n):
    "floor(s/100 * n), exactly."
    return math.floor(Fraction(sparsity) * n / 100)


def nm_of(gran):
    return tuple(int(x) for x in gran.split(':')) if ':' in gran else None


def n_units(layer, gran):
    "How many units `gran` cuts `layer` into, from in/out features and kernel size."
    if isinstance(layer, nn.Linear): cin, cout, ks = layer.in_features, layer.out_features, 1
    else: cin, cout, ks = layer.in_channels, layer.out_channels, math.prod(layer.kernel_size)
    if nm_of(gran): return cin * cout * ks // nm_of(gran)[1]
    return {'weight': cin * cout * ks, 'kernel': cin * cout, 'filter': cout, 'row': cout,
            'channel': cout * ks, 'shared_kernel': cin, 'column': cin}[gran]


def unit_rows(layer, gran, t):
    "`t` (shaped like the layer's weight) as (n_units, unit_size): row i holds every element of unit i."
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if nm_of(gran): return t.movedim(in_dim, -1).reshape(-1, nm_of(gran)[1])
    if gran == 'weight' or (gran == 'kernel' and isinstance(layer, nn.Linear)): return t.reshape(-1, 1)
    if gran == 'kernel': return t.reshape(t.shape[0] * t.shape[1], -1)
    if gran in ('filter', 'row'): return t.movedim(out_dim, 0).reshape(t.shape[out_dim], -1)
    if gran == 'channel': return t.movedim(in_dim, -1).reshape(-1, t.shape[in_dim])  # sums over the inputs
    return t.movedim(in_dim, 0).reshape(t.shape[in_dim], -1)  # shared_kernel, column


def empty_units(layer, gran, w):
    "Units a pruning would leave: all zero, or for N:M, groups with at most N non-zero weights."
    rows = unit_rows(layer, gran, w)
    return (rows != 0).sum(1) <= nm_of(gran)[0] if nm_of(gran) else (rows == 0).all(1)


def unit_scores(layer, gran, w):
    """large_final per unit, in float64: the mean of |w| (the default reduction since issue 10; the sum before), or for
    N:M the sum of the M-N smallest |w| of a group."""
    rows = unit_rows(layer, gran, w.double().abs())
    if nm_of(gran): n, m = nm_of(gran); return rows.sort(1).values[:, :m - n].sum(1)
    return rows.mean(1)


def pruned_by_mask(layer, gran, mask, weight):
    "Units the mask prunes, counted from the mask alone; checks a mask covers whole units (or N of M for N:M)."
    off = unit_rows(layer, gran, ~mask.expand_as(weight))
    counts = off.sum(1)
    if nm_of(gran):
        n, m = nm_of(gran)
        assert bool(((counts == 0) | (counts == m - n)).all()), "an N:M group must lose exactly M-N weights or none"
        return counts == m - n
    assert bool(((counts == 0) | off.all(1)).all()), "a unit must be pruned whole or not at all"
    return off.all(1)


# ---- building layers ----
def make_layer(lt, cin, cout, ks):
    return lt(cin, cout) if lt is nn.Linear else lt(cin, cout, ks)


def n_spatial(lt):
    return 0 if lt is nn.Linear else int(lt.__name__[-2])


def fill_(w, fill, gen):
    with torch.no_grad():
        if fill == 'equal': w.fill_(0.5)
        else:
            v = torch.randn(w.shape, generator=gen)
            if fill == 'few_values': v = torch.randint(1, 4, w.shape, generator=gen).float() * v.sign()
            if fill == 'half_zero': v.view(-1)[1::2] = 0  # element 0 stays non-zero: no layer starts empty
            w.copy_(v)


@st.composite
def models(draw, max_layers=3, mixed_convs=False):
    "A Sequential of 1..max_layers layers of one type (or of several conv types), a granularity, a fill."
    lt = draw(st.sampled_from(CONVS if mixed_convs else LAYER_TYPES))
    gran = draw(st.sampled_from(GRANS[lt]))
    m = nm_of(gran)[1] if nm_of(gran) else 1
    layers = []
    for _ in range(draw(st.integers(1, max_layers))):
        t = draw(st.sampled_from(CONVS)) if mixed_convs else lt
        cin, cout = m * draw(st.integers(1, 3 if m > 1 else 5)), draw(st.integers(1, 5))
        ks = tuple(draw(st.integers(1, 3)) for _ in range(n_spatial(t)))
        layers.append(make_layer(t, cin, cout, ks))
    fill, seed = draw(st.sampled_from(FILLS)), draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    for l in layers: fill_(l.weight, fill, gen)
    return nn.Sequential(*layers), (nn.modules.conv._ConvNd if mixed_convs else lt), gran


sparsities = st.one_of(st.sampled_from([0, 100, 0., 100., 50, 90, 99.9, 0.1, 1e-9, 100 - 1e-9]),
                       st.integers(0, 100), st.floats(0, 100))


def check_prune(model, layer_type, gran, context, sparsity):
    "Prune; assert exact counts from n_pruned, from the masks and from the weights; return per-layer (n, pruned)."
    layers = dict(model.named_children())
    before = {n: l.weight.detach().clone() for n, l in layers.items()}
    empty0 = {n: empty_units(l, gran, before[n]) for n, l in layers.items()}
    bias0 = {n: l.bias.detach().clone() for n, l in layers.items()}
    sp = Sparsifier(model, gran, context, large_final, layer_type=layer_type)
    sp.prune(sparsity)
    counts = {}
    for n, l in layers.items():
        w, mask = l.weight.detach(), sp.masks[n]
        assert mask.dtype == torch.bool
        nu = n_units(l, gran)
        assert sp.n_units[n] == nu
        pruned = pruned_by_mask(l, gran, mask, w)
        assert pruned.numel() == nu
        assert int(pruned.sum()) == sp.n_pruned[n]
        full = mask.expand_as(w)
        assert bool((w[~full] == 0).all()), "a pruned weight is not zero"
        assert torch.equal(w[full], before[n][full]), "a kept weight changed"
        # counted from the weights alone: the units left empty are exactly those pruned plus those empty before
        assert torch.equal(empty_units(l, gran, w), pruned | empty0[n])
        # only whole output channels ('filter', 'row'; a Linear's 'channel') take their bias with them
        whole_outputs = gran in ('filter', 'row') or (gran == 'channel' and isinstance(l, nn.Linear))
        gone = pruned if whole_outputs else torch.zeros_like(l.bias, dtype=torch.bool)
        assert bool((l.bias[gone] == 0).all()) and torch.equal(l.bias[~gone], bias0[n][~gone])
        counts[n] = (nu, pruned)
    if context == 'local':
        for n, (nu, pruned) in counts.items():
            k = expected_k(sparsity, nu)
            assert sp.n_pruned[n] == k and int(pruned.sum()) == k
            if not empty0[n].any(): assert int(empty_units(layers[n], gran, layers[n].weight).sum()) == k
            scores = unit_scores(layers[n], gran, before[n])
            if 0 < k < nu: assert scores[pruned].max() <= scores[~pruned].min() * (1 + 1e-5) + 1e-9
    else:
        total = sum(nu for nu, _ in counts.values())
        k = expected_k(sparsity, total)
        assert sum(sp.n_pruned.values()) == k == sum(int(p.sum()) for _, p in counts.values())
        if not any(e.any() for e in empty0.values()):
            assert sum(int(empty_units(layers[n], gran, layers[n].weight).sum()) for n in layers) == k
        if k <= total - len(counts):  # the count allows it: no layer is emptied
            assert all(int((~p).sum()) >= 1 for _, p in counts.values())
            # pruned units are the lowest, setting aside each layer's best (held-back) unit
            pruned_s, kept_s = [], []
            for n, (nu, p) in counts.items():
                s = unit_scores(layers[n], gran, before[n])
                pruned_s.append(s[p]); kept = s[~p].sort().values; kept_s.append(kept[:-1])
            pruned_s, kept_s = torch.cat(pruned_s), torch.cat(kept_s)
            if pruned_s.numel() and kept_s.numel(): assert pruned_s.max() <= kept_s.min() * (1 + 1e-5) + 1e-9
        else: assert sum(int((~p).sum()) for _, p in counts.values()) == total - k
    return sp


@SETTINGS
@given(models(), sparsities)
def test_local_counts_exact(case, sparsity):
    model, lt, gran = case
    check_prune(model, lt, gran, 'local', sparsity)


@SETTINGS
@given(models(), sparsities)
def test_global_counts_exact(case, sparsity):
    model, lt, gran = case
    check_prune(model, lt, gran, 'global', sparsity)


@settings(max_examples=30, deadline=None)
@given(models(mixed_convs=True), sparsities, st.sampled_from(['local', 'global']))
def test_mixed_conv_types_counts_exact(case, sparsity, context):
    "One Sparsifier over every kind of convolution at once (layer_type=_ConvNd)."
    model, lt, gran = case
    check_prune(model, lt, gran, context, sparsity)


@settings(max_examples=30, deadline=None)
@given(models(max_layers=2), st.lists(sparsities, min_size=2, max_size=3), st.sampled_from(['local', 'global']))
def test_counts_exact_over_successive_prunes(case, targets, context):
    "Re-pruning the same model (rising or falling targets) still gives the exact count each time."
    model, lt, gran = case
    sp = Sparsifier(model, gran, context, large_final, layer_type=lt)
    for s in targets:
        sp.prune(s)
        if context == 'local':
            assert sp.n_pruned == {n: expected_k(s, sp.n_units[n]) for n in sp.layers}
        else: assert sum(sp.n_pruned.values()) == expected_k(s, sum(sp.n_units.values()))
        for n, l in sp.layers.items():
            assert int(pruned_by_mask(l, gran, sp.masks[n], l.weight).sum()) == sp.n_pruned[n]


@pytest.mark.parametrize('lt', LAYER_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize('context', ['local', 'global'])
@pytest.mark.parametrize('fill', FILLS)
def test_every_granularity_and_layer_type(lt, context, fill):
    "Every (layer type, granularity) pair, walked deterministically at the edge targets."
    for gran in GRANS[lt]:
        m = nm_of(gran)[1] if nm_of(gran) else 1
        for s in [0, 37.5, 100]:
            gen = torch.Generator().manual_seed(1)
            ks = (3,) * n_spatial(lt)
            model = nn.Sequential(make_layer(lt, 2 * m, 3, ks), make_layer(lt, m, 2, (1,) * n_spatial(lt)))
            for l in model: fill_(l.weight, fill, gen)
            check_prune(model, lt, gran, context, s)


@pytest.mark.parametrize('lt', LAYER_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize('context', ['local', 'global'])
def test_layers_of_one_unit(lt, context):
    "A layer that is a single unit: below 100% nothing goes (local); global keeps it unless the target is 100%."
    for gran in ['weight', 'filter', 'channel']:
        model = nn.Sequential(make_layer(lt, 1, 1, (1,) * n_spatial(lt)))
        w0 = model[0].weight.detach().clone()
        for s in [0, 50, 99.99]:
            sp = check_prune(model, lt, gran, context, s)
            assert sp.n_pruned == {'0': 0} and torch.equal(model[0].weight, w0)
        sp = check_prune(model, lt, gran, context, 100)
        assert sp.n_pruned == {'0': 1} and not model[0].weight.any()


def test_global_never_empties_a_small_layer():
    "A layer whose weights are all far below the others keeps its best unit under a global target < 100%."
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 8, 3))
    with torch.no_grad(): model[0].weight.mul_(1e-6)
    w_small = model[0].weight.detach().clone()
    n = 4 * 4 * 9 + 8 * 4 * 9
    sp = Sparsifier(model, 'weight', 'global', large_final)
    sp.prune(100 * Fraction(n - 2, n))  # exactly n-2 units: one held back per layer
    assert sum(sp.n_pruned.values()) == n - 2
    assert sp.n_pruned == {'0': 4 * 4 * 9 - 1, '1': 8 * 4 * 9 - 1}
    assert int((model[0].weight != 0).sum()) == 1 and int((model[1].weight != 0).sum()) == 1
    assert model[0].weight.abs().max() == w_small.abs().max()  # the one kept is the layer's largest
    sp.prune(100)
    assert sum(sp.n_pruned.values()) == n and not model[0].weight.any() and not model[1].weight.any()


def test_global_keeps_the_largest_unit_of_each_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(16.).view(4, 4) + 1)
        model[1].weight.copy_((torch.arange(16.).view(4, 4) + 1) * 100)
    sp = Sparsifier(model, 'row', 'global', large_final, layer_type=nn.Linear)
    sp.prune(75)  # 6 of 8 rows: all of layer 0's rows would go; its best row (the last) is held back
    assert sp.n_pruned == {'0': 3, '1': 3}
    assert model[0].weight[:3].eq(0).all() and model[0].weight[3].ne(0).all()
    assert model[1].weight[:3].eq(0).all() and model[1].weight[3].ne(0).all()


def test_nm_keeps_the_n_largest_of_each_group():
    lin = nn.Linear(8, 2)
    w = torch.tensor([[1., -8, 3, 2, 5, 5, 5, 5], [4, 3, -2, 1, .5, 9, -7, 0]])
    with torch.no_grad(): lin.weight.copy_(w)
    sp = Sparsifier(nn.Sequential(lin), '2:4', 'local', large_final, layer_type=nn.Linear)
    sp.prune(100)
    expected = torch.tensor([[0., -8, 3, 0, 5, 5, 0, 0], [4, 3, 0, 0, 0, 9, -7, 0]])  # ties: lower index kept
    assert torch.equal(lin.weight.detach(), expected)
    assert sp.n_pruned == {'0': 4}


def test_nm_partial_target_prunes_the_cheapest_groups():
    lin = nn.Linear(4, 3)
    with torch.no_grad(): lin.weight.copy_(torch.tensor([[9., 9, 9, 9], [1, 1, 9, 9], [5, 5, 9, 9]]))
    sp = Sparsifier(nn.Sequential(lin), '2:4', 'local', large_final, layer_type=nn.Linear)
    sp.prune(50)  # floor(1.5) = 1 group: the one whose two smallest sum least
    assert sp.n_pruned == {'0': 1}
    assert torch.equal(lin.weight.detach(), torch.tensor([[9., 9, 9, 9], [0, 0, 9, 9], [5, 5, 9, 9]]))


def test_transposed_conv_units_follow_its_weight_layout():
    "ConvTranspose weights are (in, out, *k): a filter is an output channel, along dim 1."
    ct = nn.ConvTranspose2d(3, 4, 2)
    sp = Sparsifier(nn.Sequential(ct), 'filter', 'local', large_final, layer_type=nn.ConvTranspose2d)
    sp.prune(50)
    out_zero = (ct.weight == 0).all(dim=(0, 2, 3))
    assert int(out_zero.sum()) == 2 and not bool((ct.weight == 0).all(dim=(1, 2, 3)).any())
    assert torch.equal(ct.bias[out_zero], torch.zeros(2))


# ---- the registry ----
FASTERAI_2D = ['weight', 'shared_weight', 'channel', 'column', 'row', 'kernel', 'filter', 'shared_channel',
               'shared_column', 'shared_row', 'vertical_slice', 'horizontal_slice', 'shared_vertical_slice',
               'shared_horizontal_slice', 'shared_kernel', 'layer']


def test_granularity_names_per_layer_type():
    "fasterai's names (issue 10): the full set for 2-d and 3-d convs, a Linear's set for 1-d convs and Linear."
    assert sorted(granularity_names(nn.Linear)) == sorted(['weight', 'shared_weight', 'channel', 'column', 'row',
                                                           'kernel', 'filter', 'layer'])
    for t in (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert sorted(granularity_names(t)) == sorted(FASTERAI_2D)
    for t in (nn.Conv1d, nn.ConvTranspose1d):
        assert sorted(granularity_names(t)) == sorted(['weight', 'shared_weight', 'channel', 'column', 'row', 'kernel',
                                                       'filter', 'shared_channel', 'shared_kernel', 'layer'])
    assert granularity_names(nn.Embedding) == []


@pytest.mark.parametrize('lt', LAYER_TYPES, ids=lambda t: t.__name__)
def test_unknown_granularity_lists_valid_names(lt):
    with pytest.raises(ValueError, match='granularity') as e: get_granularity('vector', lt)
    for name in GRANS[lt]:
        if ':' not in name: assert repr(name) in str(e.value)
    assert "'vector'" in str(e.value) and 'N:M' in str(e.value)
    if lt in (nn.Linear, nn.Conv1d, nn.ConvTranspose1d):  # 2-d kernel slices need a 2-d kernel
        with pytest.raises(ValueError, match="'vertical_slice'"): get_granularity('vertical_slice', lt)


@pytest.mark.parametrize('bad', ['4:4', '0:4', '5:4', '2:0'])
def test_bad_nm_pattern(bad):
    with pytest.raises(ValueError, match='granularity'): get_granularity(bad, nn.Linear)


def test_granularity_not_a_string():
    with pytest.raises(TypeError, match='granularity'): get_granularity(3, nn.Conv2d)


def test_register_a_new_layer_type_and_granularity():
    emb = nn.Embedding(10, 6)
    try:
        register_granularity(nn.Embedding, 'token', (1,))
        assert granularity_names(nn.Embedding) == ['token']
        sp = Sparsifier(nn.Sequential(emb), 'token', 'local', large_final, layer_type=nn.Embedding)
        sp.prune(70)
        assert sp.n_pruned == {'0': 7}
        assert int((emb.weight == 0).all(1).sum()) == 7 and int((emb.weight == 0).sum()) == 42
        register_granularity(nn.Conv2d, 'spatial', (0, 1))  # a new granularity on a known layer type
        conv = nn.Conv2d(2, 3, 3)
        sp = Sparsifier(nn.Sequential(conv), 'spatial', 'local', large_final)
        sp.prune(50)
        assert sp.n_pruned == {'0': 4} and int((conv.weight == 0).all(dim=(0, 1)).sum()) == 4
    finally:
        GRANULARITIES.pop(nn.Embedding, None); GRANULARITIES[nn.Conv2d].pop('spatial', None)
    assert 'spatial' not in granularity_names(nn.Conv2d)


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError, match='layer_type'): register_granularity('Conv2d', 'x', (0,))
    with pytest.raises(ValueError, match='name'): register_granularity(nn.Conv2d, '2:4', (0,))
