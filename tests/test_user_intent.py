"""Issue 11, class 5: what the user meant. A user's schedule never prunes before the window, a layer that was never
pruned is never re-initialised, and any `numbers.Real` is a percentage that formats and computes."""
from fractions import Fraction
import numpy as np, pytest, torch, torch.nn as nn
from fasterai_sched import SparsifyCallback, Sparsifier, agp
from conftest import fit_capture, epoch_lines, conv_sparsity, small_learner, even_net


def constant_end(start, end, pos): return end


@pytest.mark.parametrize('start_sparsity,want', [(0, [0, 0, 50, 50]), (10, [9.9, 9.9, 50, 50])])  # floor(10% of 576)
def test_a_user_schedule_does_not_prune_before_start_epoch(start_sparsity, want):
    learn = small_learner(model=even_net(), c=8)
    text = fit_capture(learn, 4, [SparsifyCallback(sparsity=50, schedule=constant_end, start_epoch=2,
                                                   start_sparsity=start_sparsity)])
    assert epoch_lines(text) == want


def test_a_user_schedule_per_layer_does_not_prune_before_start_epoch():
    learn = small_learner(model=even_net(), c=8)
    cb = SparsifyCallback(sparsity={'0': 50, '3': 25}, schedule=constant_end, start_epoch=1)
    fit_capture(learn, 3, [cb])
    assert [h['target'] for h in cb.history][:len(learn.dls.train)] == [0] * len(learn.dls.train)
    # issue 13: per-layer targets are recorded as their overall share of the pruned weights (two layers of 576)
    assert cb.history[-1]['target'] == 37.5


def test_the_schedule_is_not_called_before_the_window():
    calls = []
    def watched(start, end, pos): calls.append(pos); return agp(start, end, pos)
    learn = small_learner(model=even_net(), c=8)
    cb = SparsifyCallback(sparsity=50, schedule=watched, start_epoch=2)
    fit_capture(learn, 3, [cb])
    in_fit = calls[101:]  # the first 101 calls are before_fit's check of the schedule over [0, 1]
    assert in_fit and min(in_fit) > 0  # only the steps of epoch 2, never before the window


def fixup_net():
    "A residual-style branch whose last conv starts at zero (Fixup / zero-init), followed by a BatchNorm at (1, 0)."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    nn.init.zeros_(net[3].weight); nn.init.zeros_(net[3].bias)
    return net


@pytest.mark.parametrize('granularity', ['filter', 'weight', 'kernel'])
def test_a_zero_initialised_layer_at_target_zero_is_left_as_it_is(granularity):
    learn = small_learner(model=fixup_net(), c=8)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    # lr=0: nothing trains, so any change would come from the callback
    fit_capture(learn, 2, [SparsifyCallback(sparsity=0, granularity=granularity)], lr=0)
    for k, v in learn.model.state_dict().items():
        if 'num_batches' not in k and 'running' not in k: assert torch.equal(v, before[k]), k


@pytest.mark.parametrize('granularity', ['filter', 'weight', 'kernel'])
def test_a_zero_initialised_layer_is_pruned_but_never_redrawn(granularity):
    learn = small_learner(model=fixup_net(), c=8)
    fit_capture(learn, 3, [SparsifyCallback(sparsity=50, granularity=granularity, start_epoch=2)], lr=0)
    assert (learn.model[3].weight == 0).all() and (learn.model[3].bias == 0).all()  # nothing drawn at random
    bn = learn.model[4].weight
    assert ((bn == 0) | (bn == 1)).all()  # only the channels of pruned filters are zeroed, the others untouched
    assert (learn.model[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_a_zero_initialised_layer_trains_from_zero():
    "Fixup: no normalisation, the zero conv feeds the head directly and learns from its gradients."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    nn.init.zeros_(net[2].weight)
    learn = small_learner(model=net, c=8)
    fit_capture(learn, 2, [SparsifyCallback(sparsity=50, granularity='filter', start_epoch=1)], lr=1e-3)
    w = learn.model[2].weight
    assert (w != 0).any() and w.abs().max() < 0.02  # moved by its gradients, not redrawn within 1/sqrt(fan_in)=0.12


def test_a_loaded_pruned_filter_of_this_run_still_restarts():
    "Filters this run pruned and later regrows (dsd) restart as new filters, as before."
    from fasterai_sched import dsd
    learn = small_learner(model=even_net(), c=8)
    fit_capture(learn, 2, [SparsifyCallback(sparsity=50, granularity='filter', schedule=dsd)], lr=0)
    assert conv_sparsity(learn.model) == 0  # regrown filters are drawn afresh, not left at zero


VALUES = [Fraction(45, 2), np.float32(22.5), np.float64(22.5), np.int64(20), 22.5]


@pytest.mark.parametrize('value', VALUES, ids=[type(v).__name__ for v in VALUES])
def test_any_real_number_is_a_percentage(value):
    learn = small_learner(model=even_net(), c=8)
    text = fit_capture(learn, 2, [SparsifyCallback(sparsity=value, start_sparsity=value / 2, schedule=agp)])
    assert f"until a sparsity of {float(value):g}%" in text
    assert epoch_lines(text)[-1] == pytest.approx(float(value), abs=0.2)
    sp = Sparsifier(even_net(), context='global')
    sp.prune(value)
    assert sp.sparsity() == pytest.approx(float(value), abs=0.2)


def test_a_dict_of_real_numbers():
    learn = small_learner(model=even_net(), c=8)
    text = fit_capture(learn, 1, [SparsifyCallback(sparsity={'0': Fraction(1, 2), '3': np.float32(75)})])
    # issue 13: per-layer targets print their overall share of the pruned weights: (0.5 + 75) / 2 for two layers of 576
    assert 'until a sparsity of 37.75%' in text


@pytest.mark.parametrize('pruned', [False, True])
def test_masks_from_weights_says_whose_zeros_they_are(pruned):
    # the BatchNorm each filter feeds is found in the graph traced from example inputs (issue 12)
    sp = Sparsifier(fixup_net(), granularity='filter', example_inputs=torch.randn(2, 8, 6, 6))
    zero = sp.layers['3'].weight
    sp.masks_from_weights(pruned=pruned)
    assert sp.n_pruned['3'] == 0  # its BatchNorm is at (1, 0): no pruning left these filters
    bn = sp.model[4]
    with torch.no_grad(): bn.weight.zero_(); bn.bias.zero_()  # as this library's own filter pruning leaves them
    sp.masks_from_weights(pruned=pruned)
    assert sp.n_pruned['3'] == 8
    sp.prune(0)  # every filter comes back: zeroed with their BatchNorm channel, they bear the mark of filter pruning
    assert (zero != 0).all(1).all().item()  # so they restart as new filters


@pytest.mark.parametrize('pruned', [False, True])
def test_a_zero_filter_without_normalisation_is_redrawn_only_if_pruned_here(pruned):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False))
    nn.init.zeros_(net[2].weight)
    sp = Sparsifier(net, granularity='filter')
    sp.masks_from_weights(pruned=pruned)
    assert sp.n_pruned['2'] == 8
    sp.prune(0)
    assert bool((net[2].weight != 0).any()) == pruned  # Fixup's zero conv is never redrawn


def test_filters_pruned_by_an_earlier_run_restart_when_a_new_run_brings_them_back():
    learn = small_learner(model=even_net(), c=8)
    fit_capture(learn, 2, [SparsifyCallback(sparsity=50, granularity='filter')])
    assert conv_sparsity(learn.model) == 50
    fit_capture(learn, 1, [SparsifyCallback(sparsity=0, granularity='filter')], lr=0)
    assert conv_sparsity(learn.model) == 0  # not left as dead zero filters behind a zeroed BatchNorm
