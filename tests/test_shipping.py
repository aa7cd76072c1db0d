"""Issue 11, class 6: shipping the result. An export holds no training state of ours, the named criteria pickle, a
criteria of the wrong shape or a gradient criteria on a frozen layer is a clear error, and fit(0) says so."""
import contextlib, io, pickle
import pytest, torch, torch.nn as nn
from fastai.learner import load_learner
from fasterai_sched import SparsifyCallback, Sparsifier, Criteria, agp, movement, large_init, taylor
from fasterai_sched.criteria import CRITERIA
from conftest import fit_capture, epoch_lines, conv_sparsity
from issue6_helpers import fast_learner


@pytest.mark.parametrize('kw', [dict(), dict(criteria=movement), dict(lth=True, start_epoch=1)],
                         ids=['masks', 'init copies', 'rewind copies'])
def test_an_export_holds_no_training_state(tmp_path, kw):
    kept = fast_learner(path=tmp_path, cbs=[SparsifyCallback(sparsity=80, schedule=agp, **kw)])
    fit_capture(kept, 2, None)
    pruned = conv_sparsity(kept.model)
    kept.export('with_cb.pkl')
    kept.remove_cb(kept.sparsify)
    kept.export('without_cb.pkl')
    size = lambda f: (tmp_path / f).stat().st_size
    assert size('with_cb.pkl') < size('without_cb.pkl') + 4096  # the callback's arguments, no masks nor copies
    back = load_learner(tmp_path / 'with_cb.pkl')
    cb = back.sparsify
    assert cb.sparsifier is None and cb.history == [] and not cb.active
    # the shipped model is the pruned one, and the loaded learner predicts without touching it
    before = {k: v.clone() for k, v in back.model.state_dict().items()}
    with back.no_bar(): back.get_preds(dl=back.dls.test_dl([0, 1, 2]))
    assert all(torch.equal(v, before[k]) for k, v in back.model.state_dict().items())
    assert conv_sparsity(back.model) == pruned > 79.99  # floors per layer: 80% local prints 79.99%
    assert pruned <= 80 or kw.get("criteria") is movement  # movement regrows weights that can stay at zero


def test_a_loaded_learner_trains_a_new_run(tmp_path):
    learn = fast_learner(path=tmp_path, cbs=[SparsifyCallback(sparsity=60, schedule=agp)])
    fit_capture(learn, 2, None)
    learn.export('l.pkl')
    back = load_learner(tmp_path / 'l.pkl')
    back.dls = fast_learner(path=tmp_path).dls  # an exported learner ships without data
    text = fit_capture(back, 2, None)
    assert epoch_lines(text)[-1] == 60 and 'Final Sparsity: 60.00%' in text


@pytest.mark.parametrize('name', sorted(CRITERIA))
def test_every_named_criteria_pickles(name):
    c = CRITERIA[name]
    back = pickle.loads(pickle.dumps(c))
    assert back.name == c.name and back.reference == c.reference and back.needs_grad == c.needs_grad
    torch.manual_seed(0)
    w, w0 = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    g = torch.Generator().manual_seed(1) if c.seeded else None
    g2 = torch.Generator().manual_seed(1) if c.seeded else None
    assert torch.equal(c(w, w0, w0, g), back(w, w0, w0, g2))


@pytest.mark.parametrize('f,kind,msg', [
    (lambda w: w.abs().mean(), ValueError, r"criteria bad gave scores of shape \(\) for layer '0', whose weight has shape"),
    (lambda w: w.abs().sum(0), ValueError, r"criteria bad gave scores of shape \(3, 3, 3\) for layer '0'"),
    (lambda w: w.abs().flatten(), ValueError, r"criteria bad gave scores of shape \(216,\) for layer '0'"),
    (lambda w: 1.0, TypeError, "criteria bad returned float; it must return a tensor of scores shaped like the weight"),
], ids=['scalar', 'reduced', 'flat', 'float'])
def test_a_criteria_of_the_wrong_shape_is_a_clear_error(f, kind, msg):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(kind, match=msg): Sparsifier(net, criteria=Criteria(f, name='bad')).prune(50)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_criteria_of_the_wrong_shape_in_a_fit(tmp_path):
    learn = fast_learner(path=tmp_path)
    with pytest.raises(ValueError, match="gave scores of shape"):
        fit_capture(learn, 2, [SparsifyCallback(sparsity=50, criteria=Criteria(lambda w: w.abs().mean(), name='m'))])


def test_taylor_on_a_frozen_pruned_layer_names_it(tmp_path):
    learn = fast_learner(path=tmp_path)
    learn.model[3].requires_grad_(False)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"criteria taylor .* layer '3' is frozen \(requires_grad=False\)"):
        fit_capture(learn, 2, [SparsifyCallback(sparsity=50, criteria=taylor)])
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    # the plain Sparsifier names it too
    x = torch.randn(2, 3, 8, 8)
    learn.model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"layer '3' has none: it is frozen"):
        Sparsifier(learn.model, criteria=taylor).prune(50)


def test_taylor_with_every_pruned_layer_frozen_waits_for_the_unfrozen_fit(tmp_path):
    learn = fast_learner(path=tmp_path)
    for i in (0, 3, 6): learn.model[i].requires_grad_(False)
    text = fit_capture(learn, 1, [SparsifyCallback(sparsity=50, criteria=taylor)])
    assert 'Pruned layers are frozen in this fit' in text and conv_sparsity(learn.model) == 0


@pytest.mark.parametrize('kept', [True, False], ids=['learner-cbs', 'fit-cbs'])
def test_fit_zero_says_so_plainly(tmp_path, kept):
    cb = SparsifyCallback(sparsity=50, start_epoch=3)  # start_epoch is not checked against a fit of no epoch
    learn = fast_learner(path=tmp_path, cbs=[cb] if kept else None)
    with pytest.warns(UserWarning, match=r"fit\(0\) trains no epoch, so nothing was pruned"):
        text = fit_capture(learn, 0, None if kept else [cb])
    assert text == '' and conv_sparsity(learn.model) == 0
