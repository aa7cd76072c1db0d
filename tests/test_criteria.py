"""Criteria: finite non-negative scores shaped like the weight; seeds, references, gradients, user criteria."""
import copy
import pytest, torch, torch.nn as nn
import torch.nn.functional as F
from fasterai_sched import Sparsifier, Criteria, large_final, small_final, random, movement, taylor, large_init
from fasterai_sched import criteria as C
from fasterai_sched.criteria import CRITERIA
from conftest import small_net

NAMES = ['random', 'large_final', 'small_final', 'squared_final', 'large_init', 'small_init', 'large_init_large_final',
         'small_init_small_final', 'magnitude_increase', 'movement', 'updating_magnitude_increase',
         'updating_movement', 'updating_movmag', 'taylor', 'movmag', 'grad_crit', 'wanda']


def net_with_grads(seed=0):
    torch.manual_seed(seed)
    model = small_net()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    return model


def test_every_named_criterion_is_registered_and_exported():
    assert sorted(CRITERIA) == sorted(NAMES)
    import fasterai_sched
    for n in NAMES:
        assert n in fasterai_sched.__all__ and getattr(fasterai_sched, n) is CRITERIA[n] and CRITERIA[n].name == n
    assert 'CRITERIA' not in fasterai_sched.__all__


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_scores_finite_non_negative_shaped_like_weight(name, dtype):
    model = net_with_grads().to(dtype)
    data = torch.randn(4, 3, 8, 8, dtype=dtype) if name == 'wanda' else None  # wanda calibrates on activations
    sp = Sparsifier(model, 'weight', 'local', name, data=data)
    with torch.no_grad():  # move away from the reference so 'init'/'previous' criteria see a change
        for m in sp.layers.values(): m.weight.add_(0.01 * torch.randn_like(m.weight))
    scores = sp.scores()
    assert list(scores) == ['0', '3', '6']
    for n, s in scores.items():
        w = sp.layers[n].weight
        assert s.shape == w.shape and s.dtype == torch.float32 and s.device == w.device
        assert bool(s.isfinite().all()) and bool((s >= 0).all())
        assert s.std() > 0, "a criterion that scores every weight the same cannot tell them apart"


def test_scores_match_their_definitions():
    w = torch.tensor([[-2., 0.5], [1., -0.25]]); w0 = torch.tensor([[1., -1.], [1., 0.5]])
    g = torch.tensor([[0.5, 2.], [-1., 4.]])
    assert torch.equal(large_final(w), w.abs())
    assert torch.equal(C.squared_final(w), w ** 2)
    assert torch.equal(large_init(w, w0), w0.abs())
    assert torch.equal(movement(w, w0), (w - w0).abs())
    assert torch.equal(C.large_init_large_final(w, w0), torch.minimum(w.abs(), w0.abs()))
    assert torch.equal(C.updating_movmag(w, w0), (w * (w - w0)).abs())
    assert torch.equal(taylor(w, grad=g), (w * g).abs())
    assert torch.allclose(C.magnitude_increase(w, w0), F.softplus(w.abs() - w0.abs()))


@pytest.mark.parametrize('small,large', [('small_final', lambda w, w0: w.abs()), ('small_init', lambda w, w0: w0.abs()),
                                         ('small_init_small_final', lambda w, w0: torch.maximum(w.abs(), w0.abs()))])
def test_small_criteria_keep_what_is_small(small, large):
    "Their order is the reverse of the magnitude they keep small."
    w, w0 = torch.randn(50), torch.randn(50)
    s, l = CRITERIA[small](w, w0), large(w, w0)
    assert torch.equal(s.argsort(stable=True), (-l).argsort(stable=True))


def test_small_final_prunes_the_largest_weights():
    conv = nn.Conv2d(1, 1, 2)
    with torch.no_grad(): conv.weight.copy_(torch.tensor([1., -4., 2., -3.]).view(1, 1, 2, 2))
    Sparsifier(nn.Sequential(conv), 'weight', 'local', small_final).prune(50)
    assert torch.equal(conv.weight.detach().flatten(), torch.tensor([1., 0., 2., 0.]))


def test_random_is_seeded():
    model = small_net()
    a = Sparsifier(model, 'weight', 'local', random, seed=3).scores()
    b = Sparsifier(copy.deepcopy(model), 'weight', 'local', 'random', seed=3).scores()
    c = Sparsifier(model, 'weight', 'local', random, seed=4).scores()
    for n in a:
        assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])
    assert not torch.equal(a['0'].flatten()[:100], a['3'].flatten()[:100])  # layers draw different numbers
    # independent of the global RNG: the same scores after it moved
    torch.rand(1000)
    assert all(torch.equal(a[n], s) for n, s in Sparsifier(model, 'weight', 'local', random, seed=3).scores().items())


def test_random_masks_are_the_same_for_the_same_seed():
    m1, m2 = small_net(), small_net()
    m2.load_state_dict(m1.state_dict())
    s1, s2 = Sparsifier(m1, 'filter', 'global', random, seed=7), Sparsifier(m2, 'filter', 'global', random, seed=7)
    s1.prune(60); s2.prune(60)
    assert all(torch.equal(s1.masks[n], s2.masks[n]) for n in s1.masks)
    s3 = Sparsifier(m2, 'weight', 'local', random, seed=8); s4 = Sparsifier(m1, 'weight', 'local', random, seed=9)
    s3.prune(50); s4.prune(50)
    assert not torch.equal(s3.masks['3'], s4.masks['3'])


def test_init_criteria_compare_with_weights_at_set_up():
    model = small_net()
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    sp_init, sp_move = Sparsifier(model, criteria=large_init), Sparsifier(model, criteria=movement)
    assert sp_init.reference.keys() == w0.keys() and Sparsifier(model).reference == {}  # copied only when needed
    delta = {}
    with torch.no_grad():
        for n, m in sp_init.layers.items():
            delta[n] = torch.randn_like(m.weight); m.weight.add_(delta[n])
    for n, s in sp_init.scores().items(): assert torch.equal(s, w0[n].abs())
    for n, s in sp_move.scores().items(): assert torch.allclose(s, delta[n].abs(), atol=1e-6)
    # pruning with large_init keeps the weights that were large at set-up, whatever they are now
    sp_init.prune(50)
    w = sp_init.layers['3'].weight
    k = w.numel() // 2
    assert torch.equal(w == 0, w0['3'].abs().flatten().argsort(stable=True).argsort().view_as(w) < k)


def test_updating_criteria_compare_with_weights_at_last_prune():
    model = small_net()
    sp = Sparsifier(model, 'weight', 'local', 'updating_movement')
    with torch.no_grad():
        for m in sp.layers.values(): m.weight.add_(1.)
    sp.prune(30)
    after = {n: m.weight.detach().clone() for n, m in sp.layers.items()}
    assert all(torch.equal(sp.reference[n], after[n]) for n in after)
    delta = {}
    with torch.no_grad():
        for n, m in sp.layers.items(): delta[n] = torch.randn_like(m.weight); m.weight.add_(delta[n])
    for n, s in sp.scores().items(): assert torch.allclose(s, delta[n].abs(), atol=1e-6)


def test_taylor_needs_a_gradient():
    model = small_net()
    sp = Sparsifier(model, 'weight', 'local', taylor)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match='taylor.*gradient'): sp.prune(50)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters())) and sp.masks == {}
    model(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
    w3 = model[3].weight.detach().clone()
    sp.prune(50)
    rank = (w3 * model[3].weight.grad).abs().flatten().argsort(stable=True).argsort().view_as(w3)
    assert torch.equal(model[3].weight == 0, rank < w3.numel() // 2)  # the lowest |w * grad| went
    assert sp.n_pruned['0'] == sp.layers['0'].weight.numel() // 2
    for n, m in sp.layers.items():
        s = taylor(m.weight, grad=m.weight.grad)
        assert torch.equal(s, (m.weight.detach() * m.weight.grad).abs())


def test_user_criteria_from_a_function():
    def closest_to_one(w): return 1 / (1 + (w - 1).abs())  # keep weights near 1
    crit = Criteria(closest_to_one)
    assert crit.name == 'closest_to_one' and repr(crit) == 'Criteria(closest_to_one)'
    lin = nn.Linear(4, 1)
    with torch.no_grad(): lin.weight.copy_(torch.tensor([[1., 3., 0.9, -1.]]))
    sp = Sparsifier(nn.Sequential(lin), 'weight', 'local', crit, layer_type=nn.Linear)
    sp.prune(50)
    assert torch.equal(lin.weight.detach(), torch.tensor([[1., 0., 0.9, 0.]]))


def test_user_criteria_with_a_reference():
    crit = Criteria(lambda w, w0: (w.abs() - w0.abs()).clamp(min=0), reference='init', name='grew')
    lin = nn.Linear(3, 1)
    with torch.no_grad(): lin.weight.copy_(torch.tensor([[1., 1., 1.]]))
    sp = Sparsifier(nn.Sequential(lin), 'weight', 'local', crit, layer_type=nn.Linear)
    with torch.no_grad(): lin.weight.copy_(torch.tensor([[3., 0.5, 2.]]))
    sp.prune(100 * 2 / 3)
    assert torch.equal(lin.weight.detach(), torch.tensor([[3., 0., 0.]]))


def test_criteria_rejects_bad_arguments():
    with pytest.raises(TypeError, match='callable'): Criteria(3)
    with pytest.raises(ValueError, match='reference'): Criteria(torch.abs, reference='first')
