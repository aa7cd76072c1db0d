"""Issue 11, class 4: layers whose weight is computed, shared, compiled or lazy. A sparsity is only ever reported when
the weights hold it."""
import contextlib, io, re
import pytest, torch, torch.nn as nn
import torch.nn.utils.prune as torch_prune
from torch.nn.utils import parametrize, parametrizations
from fasterai_sched import Sparsifier, SparsifyCallback, sparsity_report, random, large_final
from conftest import fit_capture, epoch_lines, conv_sparsity, small_learner, small_net

WRAPPERS = {
    'weight_norm': lambda c: parametrizations.weight_norm(c),
    'spectral_norm': lambda c: parametrizations.spectral_norm(c),
    'old weight_norm': lambda c: nn.utils.weight_norm(c),
    'old spectral_norm': lambda c: nn.utils.spectral_norm(c),
    'torch prune': lambda c: torch_prune.l1_unstructured(c, 'weight', amount=0.2),
}
REMOVE = {
    'weight_norm': lambda c: parametrize.remove_parametrizations(c, 'weight'),
    'spectral_norm': lambda c: parametrize.remove_parametrizations(c, 'weight'),
    'old weight_norm': lambda c: nn.utils.remove_weight_norm(c),
    'old spectral_norm': lambda c: nn.utils.remove_spectral_norm(c),
    'torch prune': lambda c: torch_prune.remove(c, 'weight'),
}


def wrapped_net(kind):
    torch.manual_seed(0)
    net = small_net()
    net[3] = WRAPPERS[kind](net[3])
    return net


def params(net): return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize('kind', WRAPPERS)
def test_a_computed_weight_is_refused_naming_the_layer_and_the_fix(kind):
    net = wrapped_net(kind)
    before = params(net)
    with pytest.raises(ValueError, match=r"layer '3' \(\w*Conv2d\) computes its weight from other tensors.*stores it"):
        Sparsifier(net).prune(50)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize('kind', WRAPPERS)
def test_a_computed_weight_is_refused_in_a_fit_before_any_step(kind):
    learn = small_learner(model=wrapped_net(kind))
    before = params(learn.model)
    with pytest.raises(ValueError, match="computes its weight"):
        fit_capture(learn, 2, [SparsifyCallback(sparsity=50)])
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())


@pytest.mark.parametrize('kind', WRAPPERS)
def test_once_the_weight_is_stored_the_report_holds_the_target(kind):
    net = wrapped_net(kind)
    REMOVE[kind](net[3])
    sp = Sparsifier(net)
    sp.prune(50)
    rows = sparsity_report(net, verbose=False)
    assert [r.sparsity for r in rows] == pytest.approx([50] * 4, abs=0.2) and sp.sparsity() == pytest.approx(sp.masked_sparsity())


def tied_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1))
    net[4].weight = net[2].weight  # one Parameter in two layers
    return net


@pytest.mark.parametrize('context', ['local', 'global'])
@pytest.mark.parametrize('criteria', [random, large_final], ids=['random', 'large_final'])
def test_tied_weights_are_pruned_once_at_the_target(context, criteria):
    net = tied_net()
    sp = Sparsifier(net, context=context, criteria=criteria)
    assert list(sp.layers) == ['0', '2']
    sp.prune(50)
    w = net[2].weight
    n_all = net[0].weight.numel() + w.numel()
    zeros = int((net[0].weight == 0).sum() + (w == 0).sum())
    assert zeros == (n_all // 2 if context == 'global' else net[0].weight.numel() // 2 + w.numel() // 2)
    rows = sparsity_report(net, verbose=False)
    assert [r.layer for r in rows] == ['0', '2', 'Overall'] and rows[-1].params == n_all


def test_tied_weights_in_a_fit():
    learn = small_learner(model=tied_net())
    learn.model = nn.Sequential(learn.model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    text = fit_capture(learn, 2, [SparsifyCallback(sparsity=60, criteria=random)])
    assert epoch_lines(text)[-1] == pytest.approx(60, abs=0.3) and 'Final Sparsity' in text
    assert (learn.model[0][2].weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)


def test_a_compiled_model_keeps_its_layer_names():
    torch.manual_seed(0)
    net = small_net()
    compiled = torch.compile(net, backend='eager')
    sp = Sparsifier(compiled)
    assert list(sp.layers) == ['0', '3', '6']
    sp.prune(40)
    assert set(sp.state_dict()['masks']) == {'0', '3', '6'}
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rows = sparsity_report(compiled)
    assert '_orig_mod' not in out.getvalue() and [r.layer for r in rows] == ['0', '3', '6', 'Overall']
    assert conv_sparsity(net) == pytest.approx(40, abs=0.1)
    x = torch.randn(2, 3, 8, 8)
    net.eval(); compiled.eval()
    assert torch.allclose(compiled(x), net(x))  # the compiled model runs the pruned weights


def test_a_compiled_model_in_a_fit():
    learn = small_learner()
    learn.model = torch.compile(learn.model, backend='eager')
    text = fit_capture(learn, 2, [SparsifyCallback(sparsity=50)])
    assert '_orig_mod' not in text and re.search(r"^0\s+Conv2d", text, re.M) and 'Final Sparsity: 50.00%' in text


def test_a_lazy_layer_gets_a_clear_message_then_works_after_one_forward():
    net = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"layer '0' \(LazyConv2d\) is lazy and has no weight yet: run one batch"):
        Sparsifier(net)
    net(torch.randn(1, 3, 8, 8))
    sp = Sparsifier(net)
    sp.prune(50)
    assert sp.sparsity() == pytest.approx(50, abs=0.2)


def test_a_lazy_layer_in_a_fit_gets_the_message():
    learn = small_learner(model=nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                             nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="is lazy and has no weight yet"):
        fit_capture(learn, 1, [SparsifyCallback(sparsity=50)])


def test_prunable_layers_lists_what_a_sparsifier_prunes():
    from fasterai_sched.sparsifier import prunable_layers
    net = tied_net()
    assert list(prunable_layers(net, nn.Conv2d)) == ['0', '2']
    assert list(prunable_layers(torch.compile(net, backend='eager'), nn.Conv2d)) == ['0', '2']
    assert prunable_layers(net, nn.Linear) == {}
    with pytest.raises(ValueError, match="computes its weight"): prunable_layers(wrapped_net('spectral_norm'), nn.Conv2d)


def test_the_report_on_a_lazy_layer_says_so():
    net = nn.Sequential(nn.LazyConv2d(8, 3))
    with pytest.raises(ValueError, match=r"layer '0' \(LazyConv2d\) is lazy and has no weight yet"): sparsity_report(net)
    net(torch.randn(1, 3, 8, 8))
    assert sparsity_report(net, verbose=False)[-1].zeros == 0
