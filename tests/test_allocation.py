"""Issue 13: per-layer allocations (uniform, dense first layer, ERK) whose counts add up to the budget exactly, and LAMP."""
import math
import random
import pytest, torch, torch.nn as nn
from hypothesis import given, settings, strategies as st
from fasterai_sched import SparsifyCallback, Sparsifier, allocate, uniform, uniform_dense_first, erk, lamp, agp, sparsity_report
from fasterai_sched.allocation import layer_shapes, ALLOCATIONS
from fasterai_sched.sparsifier import n_to_prune
from conftest import small_learner, small_net, fit_capture, epoch_lines, conv_sparsity


@pytest.fixture(autouse=True)
def _same_batches():
    "fastai draws each loader's shuffling seed from Python's random module: fix it, so a test trains the same in any order."
    random.seed(0)

ALLOC = [uniform, uniform_dense_first, erk]


def counts(targets, shapes):
    return {n: n_to_prune(targets[n], math.prod(s)) for n, s in shapes.items()}


shape_st = st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]))


@settings(max_examples=150, deadline=None)
@given(shapes=st.lists(shape_st, min_size=1, max_size=6), sparsity=st.floats(0, 100), which=st.sampled_from(ALLOC))
def test_counts_add_up_to_the_budget_exactly(shapes, sparsity, which):
    shapes = {str(i): s for i, s in enumerate(shapes)}
    total = sum(math.prod(s) for s in shapes.values())
    if which is uniform_dense_first and n_to_prune(sparsity, total) > total - math.prod(shapes['0']):
        with pytest.raises(ValueError, match='first layer'): which(shapes, sparsity)
        return
    targets = which(shapes, sparsity)
    c = counts(targets, shapes)
    assert sum(c.values()) == n_to_prune(sparsity, total)  # what global context at `sparsity` prunes
    for n, s in shapes.items():
        assert 0 <= targets[n] <= 100 and 0 <= c[n] <= math.prod(s)
        assert abs(targets[n] - 100 * c[n] / math.prod(s)) < 1e-9  # the target is the count's own percent
    # the weighted sum of the targets is the budget, to the unit
    weighted = sum(targets[n] * math.prod(s) for n, s in shapes.items()) / total
    assert abs(weighted - 100 * n_to_prune(sparsity, total) / total) < 1e-9
    if which is uniform_dense_first: assert c['0'] == 0


def test_erk_gives_small_layers_lower_sparsity():
    shapes = {'stem': (16, 3, 3, 3), 'mid': (32, 16, 3, 3), 'big': (64, 32, 3, 3), 'head': (10, 64)}
    t = erk(shapes, 90)
    assert t['stem'] < t['mid'] < t['big']
    # density is proportional to (sum of dims)/(product of dims) where no layer is capped at dense
    dens = {n: 1 - t[n] / 100 for n in ('mid', 'big')}
    ratio = (sum(shapes['mid']) / math.prod(shapes['mid'])) / (sum(shapes['big']) / math.prod(shapes['big']))
    assert dens['mid'] / dens['big'] == pytest.approx(ratio, rel=1e-2)


def test_erk_keeps_a_layer_dense_when_its_share_would_pass_dense():
    shapes = {'tiny': (2, 1, 1, 1), 'big': (256, 256, 3, 3)}
    t = erk(shapes, 50)
    assert t['tiny'] == 0 and counts(t, shapes)['big'] == n_to_prune(50, 2 + 256 * 256 * 9)


def test_uniform_is_the_budget_on_each_layer_within_a_unit():
    shapes = layer_shapes(small_net())
    t = uniform(shapes, 90)
    for n, s in shapes.items(): assert abs(counts(t, shapes)[n] - 0.9 * math.prod(s)) < 1


def test_allocate_reads_the_models_layers_and_units():
    model = small_net()
    assert list(allocate(model, 80, 'erk')) == ['0', '3', '6']
    assert allocate(model, 80, 'uniform') == uniform(layer_shapes(model), 80)
    # with filters, the units are filters: 32 + 64 + 64 of them
    t = allocate(model, 50, 'erk', granularity='filter')
    assert sum(n_to_prune(t[n], u) for n, u in zip(t, (32, 64, 64))) == 80
    assert set(ALLOCATIONS) == {'uniform', 'dense_first', 'erk'}


@pytest.mark.parametrize('bad, kw, match', [
    ('allocation', dict(allocation='lamp'), "allocation='lamp'"),
    ('sparsity', dict(sparsity=120), 'sparsity=120'),
    ('layer_type', dict(layer_type=nn.Conv1d), 'layer_type=Conv1d'),
])
def test_allocate_errors(bad, kw, match):
    args = dict(model=small_net(), sparsity=80, allocation='erk') | kw
    with pytest.raises(ValueError, match=match): allocate(**args)
    with pytest.raises(ValueError, match='power'): erk({'a': (2, 2)}, 50, power=0)


@pytest.mark.parametrize('allocation', ['uniform', 'dense_first', 'erk'])
def test_agp_with_an_allocation_ends_at_the_budget_exactly(allocation):
    learn = small_learner()
    targets = allocate(learn.model, 85, allocation)
    cb = SparsifyCallback(sparsity=targets, context='local', schedule=agp, start_epoch=1)
    text = fit_capture(learn, 3, [cb])
    assert 'Pruning of weight until a sparsity of 85%' in text
    lines = epoch_lines(text)
    assert lines[0] == 0 and lines[-1] == 85.0
    zeros = {r.layer: r.zeros for r in sparsity_report(learn.model, verbose=False)}
    shapes = layer_shapes(learn.model)
    for n in shapes: assert zeros[n] == counts(targets, shapes)[n], n
    assert sum(zeros[n] for n in shapes) == n_to_prune(85, sum(math.prod(s) for s in shapes.values()))


# ---- LAMP ----
def test_lamp_scores_are_the_share_of_the_tail():
    w = torch.tensor([[0.5, -2.0], [1.0, 0.5]])
    s = lamp(w)
    # squares 0.25, 4, 1, 0.25 sorted: 0.25 (index 0), 0.25 (index 3), 1, 4; tails 5.5, 5.25, 5, 4
    assert torch.allclose(s, torch.tensor([[0.25 / 5.5, 1.0], [1 / 5, 0.25 / 5.25]]))
    # monotone in magnitude within a layer; every layer's largest weight scores 1
    x = torch.randn(500)
    order = x.abs().argsort()
    assert (lamp(x)[order].diff() >= 0).all() and lamp(x).max() == 1 and lamp(x * 100).max() == 1


def test_lamp_is_scale_free_across_layers():
    "Magnitude ranks a layer scaled by 10 after all others; LAMP prunes the same weights whatever the scale."
    torch.manual_seed(0)
    a, b, c = small_net(), small_net(), small_net()
    b.load_state_dict(a.state_dict())
    with torch.no_grad(): b[6].weight.mul_(10)
    c.load_state_dict(b.state_dict())
    sa, sb = Sparsifier(a, context='global', criteria=lamp), Sparsifier(b, context='global', criteria=lamp)
    sa.prune(70); sb.prune(70)
    for n in sa.masks: assert torch.equal(sa.masks[n], sb.masks[n]), n
    mag = Sparsifier(c, context='global')
    mag.prune(70)
    assert mag.n_pruned['6'] < sb.n_pruned['6']  # magnitude spares the scaled layer; LAMP does not care


def test_agp_lamp_global_exact_count_and_no_layer_emptied():
    learn = small_learner()
    cb = SparsifyCallback(sparsity=98, context='global', criteria=lamp, schedule=agp, start_epoch=1)
    text = fit_capture(learn, 3, [cb])
    assert epoch_lines(text)[-1] == 98.0 and conv_sparsity(learn.model) == pytest.approx(98, abs=0.005)
    for r in sparsity_report(learn.model, verbose=False)[:-1]: assert r.zeros < r.params, r.layer


@pytest.mark.parametrize('method', ['erk', 'lamp'])
def test_agp_with_erk_or_lamp_resumes_from_a_checkpoint(tmp_path, method):
    from fastai.callback.tracker import SaveModelCallback
    from issue6_helpers import fast_learner
    learn = fast_learner(path=tmp_path)
    kw = (dict(sparsity=allocate(learn.model, 85, 'erk')) if method == 'erk'
          else dict(sparsity=85, context='global', criteria=lamp))
    kw.update(schedule=agp, start_epoch=1)
    full = fit_capture(learn, 5, [SparsifyCallback(**kw), SaveModelCallback(every_epoch=True)])
    resumed = fast_learner(seed=1, path=tmp_path)
    resumed.load('model_2')
    at_save = {n: (m.weight == 0).clone() for n, m in resumed.model.named_modules() if isinstance(m, nn.Conv2d)}
    out = fit_capture(resumed, 5, [SparsifyCallback(**kw)], start_epoch=3)
    assert epoch_lines(out) == epoch_lines(full)[3:] and epoch_lines(out)[-1] == 85.0
    for n, m in resumed.model.named_modules():  # pruned at the save, still pruned
        if isinstance(m, nn.Conv2d): assert (m.weight[at_save[n]] == 0).all(), n
