"""fasterai's criteria API page: the call form `crit(module, granularity)`, the Criteria keywords, Reducer and
Normalizer, the criteria groups and names, grad_crit and wanda; with only the import changed."""
import pytest, torch, torch.nn as nn
from fasterai_sched import *
from conftest import small_learner, fit_capture

FASTERAI_NAMES = ('random', 'large_final', 'small_final', 'squared_final', 'large_init', 'small_init',
                  'large_init_large_final', 'small_init_small_final', 'magnitude_increase', 'movement',
                  'updating_magnitude_increase', 'updating_movement', 'movmag', 'updating_movmag')


def conv():
    torch.manual_seed(0)
    return nn.Conv2d(4, 6, 3)


def test_call_form_returns_unit_scores_shaped_for_the_weight():
    m = conv()
    w = m.weight.detach().abs()
    assert torch.equal(large_final(m, 'weight'), w)
    assert large_final(m, 'filter').shape == (6, 1, 1, 1)
    assert torch.allclose(large_final(m, 'filter').flatten(), w.mean((1, 2, 3)))  # fasterai's default: the mean
    assert large_final(m, 'kernel').shape == (6, 4, 1, 1) and large_final(m, 'channel').shape == (6, 1, 3, 3)
    assert large_final(m, 'filter', squeeze=True).shape == (6,)
    with pytest.raises(ValueError, match="granularity='vector'"): large_final(m, 'vector')


def test_reducer_and_normalizer():
    m = conv(); w = m.weight.detach().abs()
    summed = Criteria(torch.abs, reducer=Reducer.sum)
    assert torch.allclose(summed(m, 'filter').flatten(), w.sum((1, 2, 3)))
    assert torch.allclose(Reducer.mean(w, [2, 3, 4]), w.mean((1, 2, 3), keepdim=True))  # fasterai's dim numbering
    assert torch.equal(Reducer.sum(w, 0), w)
    normed = Criteria(torch.abs, normalizer=Normalizer.sum)
    assert normed(m, 'filter').sum() == pytest.approx(1)
    assert Criteria(torch.abs, normalizer=Normalizer.max)(m, 'filter').max() == pytest.approx(1)
    g = Criteria(torch.abs, normalizer=Normalizer.gaussian)(m, 'filter')
    assert g.mean() == pytest.approx(0, abs=1e-6)
    s = Normalizer.standardization(torch.tensor([1., 3.]))
    assert s[0] == 0 and s[1] == pytest.approx(1, abs=1e-6)


def test_init_and_update_keywords_with_fasterais_buffers():
    m = conv()
    m.register_buffer('_init_weights', m.weight.detach().clone() * 2)  # where fasterai's Sparsifier keeps them
    crit = Criteria(torch.abs, needs_init=True, output_fn=lambda x, y: torch.abs(torch.sub(x, y)))
    assert torch.allclose(crit(m, 'weight'), m.weight.detach().abs())  # | |w| - |2w| | = |w|
    assert torch.equal(large_init(m, 'weight'), 2 * m.weight.detach().abs())
    back = Criteria(torch.abs, needs_init=True, return_init=True)
    assert torch.equal(back(m, 'weight'), 2 * m.weight.detach().abs())
    upd = Criteria(torch.abs, needs_update=True, output_fn=torch.sub)
    assert upd.needs_update and upd.reference == 'previous'
    with pytest.raises(ValueError, match='needs_init=True and needs_update=True'):
        Criteria(torch.abs, needs_init=True, needs_update=True)
    with pytest.raises(ValueError, match='compares with the init weights'): large_init(conv(), 'weight')


def test_groups_and_names():
    assert tuple(available_criterias()[:len(FASTERAI_NAMES)]) == FASTERAI_NAMES
    assert set(available_criterias()) >= set(FASTERAI_NAMES) | {'taylor', 'grad_crit', 'wanda'}
    assert criterias == available_criterias()
    mine = magnitude_criteria(torch.square)
    assert torch.equal(mine(conv(), 'weight'), conv().weight.detach() ** 2)
    assert init_based_criteria(torch.abs, output_fn=torch.min).needs_init
    assert update_based_criteria(torch.abs, output_fn=torch.sub).needs_update
    assert activation_criteria(torch.abs).needs_data


def test_grad_crit():
    m = conv()
    assert torch.allclose(grad_crit(m, 'filter').flatten(), (m.weight.detach() ** 2).mean((1, 2, 3)))  # no gradient yet
    m(torch.randn(2, 4, 5, 5)).sum().backward()
    want = ((m.weight * m.weight.grad) ** 2).mean((1, 2, 3)).detach()
    assert torch.allclose(grad_crit(m, 'filter').flatten(), want)
    learn = small_learner()
    cb = SparsifyCallback(sparsity=50, granularity='filter', context='local', criteria=grad_crit, schedule=one_shot)
    fit_capture(learn, 2, [cb])
    assert cb.final_sparsity > 0


def test_wanda_calibrates_on_the_learners_first_batches():
    learn = small_learner()
    cb = SparsifyCallback(sparsity=50, granularity='weight', context='local', criteria=wanda, schedule=one_shot)
    fit_capture(learn, 2, [cb])
    sp = cb.sparsifier
    assert set(sp.activation_scale) == set(sp.layers) and all(s.dim() == 1 for s in sp.activation_scale.values())
    assert sp.activation_scale['0'].numel() == 3 and cb.final_sparsity == pytest.approx(50, abs=0.01)
    # by hand, as fasterai's page: calibrate, then score a layer
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(8, 3, 6, 6)
    scales = wanda.calibrate(m, x)
    rms = x.pow(2).mean((0, 2, 3)).sqrt()
    assert torch.allclose(scales[m[0]], rms, rtol=1e-5)
    assert torch.allclose(wanda(m[0], 'weight'), m[0].weight.detach().abs() * rms.view(1, 3, 1, 1), rtol=1e-5)
    with pytest.raises(ValueError, match='pass data='): Sparsifier(m, 'weight', 'local', wanda)
