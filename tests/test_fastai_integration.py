"""Issue 11: the callback kept in `Learner(cbs=...)` beside SaveModelCallback, GradientAccumulation and MixedPrecision,
through lr_find, fit_one_cycle, validate, get_preds, export and load_learner; weights and printed lines at each stage."""
import contextlib, io, math, re, warnings
from fractions import Fraction
import pytest, torch
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.learner import load_learner
from fasterai_sched import SparsifyCallback, agp
from conftest import epoch_lines, conv_sparsity
from issue6_helpers import fast_learner

# fastai 2.8.12's MixedPrecision autocasts for device 'cuda'; on a machine without CUDA torch disables that autocast and
# its GradScaler with a warning, so the fit runs in float32 through all of MixedPrecision's events. With CUDA present
# the data here would stay on the CPU while MixedPrecision scales for CUDA, so it is left out there (the cuda tests of
# test_callback.py cover real mixed precision).
MIXED = [] if torch.cuda.is_available() else [MixedPrecision()]


def state(learn): return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def printed(f):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = f()
    return res, out.getvalue()


def expected_lines(learn, sparsity, n_epoch, start_epoch):
    sizes = [m.weight.numel() for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)]
    lines = []
    for e in range(n_epoch):
        t = 0 if e + 1 <= start_epoch else agp(0, sparsity, (e + 1 - start_epoch) / (n_epoch - start_epoch))
        lines.append(round(100 * sum(math.floor(Fraction(t) * n / 100) for n in sizes) / sum(sizes), 2))
    return lines


def test_kept_in_the_learner_through_a_whole_fastai_workflow(tmp_path):
    sp_cb = SparsifyCallback(sparsity=80, schedule=agp, start_epoch=1)
    learn = fast_learner(path=tmp_path, bs=24, cbs=[sp_cb, SaveModelCallback(), GradientAccumulation(n_acc=48), *MIXED])
    models = tmp_path / 'models'
    start = state(learn)

    # lr_find: a mock training; the callback neither prunes nor prints, and the weights come back as they were
    with learn.no_bar(): _, text = printed(lambda: learn.lr_find(num_it=12, show_plot=False))
    assert 'Sparsity' not in text and 'Pruning' not in text  # (SaveModelCallback may print its own line)
    assert same(start, state(learn)) and sp_cb.sparsifier is None and not list(models.glob('sparsify_state*'))

    # fit_one_cycle: the run, with exact epoch lines; the model handed back is SaveModelCallback's best as saved
    with learn.no_bar(): _, text = printed(lambda: learn.fit_one_cycle(4, 1e-3))
    assert text.startswith('Pruning of weight until a sparsity of 80%\n')
    assert epoch_lines(text) == expected_lines(learn, 80, 4, 1)
    best = torch.load(models / 'model.pth', map_location='cpu')
    assert same(best, state(learn))
    final = float(re.search(r"Final Sparsity: ([\d.]+)%", text)[1])
    assert final == pytest.approx(conv_sparsity(learn.model), abs=0.005) and final in epoch_lines(text)
    assert re.search(rf"^Overall\s+all\s+[\d,]+\s+[\d,]+\s+{final:.2f}%$", text, re.M)
    trained, history = state(learn), list(sp_cb.history)
    ours = lambda: {p.name: p.read_bytes() for p in models.glob('sparsify_state*')}
    files = ours()
    quiet = lambda t: 'Sparsity' not in t and 'Pruning' not in t  # SaveModelCallback prints (and saves) in validate too

    # validate and get_preds: nothing printed, no weight, file or record changed
    with learn.no_bar(): (loss, acc), text = printed(lambda: learn.validate())
    assert quiet(text) and same(trained, state(learn)) and sp_cb.history == history
    with learn.no_bar(): (preds, targs), text = printed(lambda: learn.get_preds())
    assert quiet(text) and same(trained, state(learn)) and ours() == files and sp_cb.history == history
    assert preds.shape == (24, 2) and loss == pytest.approx(torch.nn.functional.cross_entropy(preds.log(), targs).item(), rel=1e-4)

    # export and load_learner: the pruned model, none of the run's masks or weight copies
    _, text = printed(lambda: learn.export('pruned.pkl'))
    back = load_learner(tmp_path / 'pruned.pkl')
    assert same(trained, state(back)) and conv_sparsity(back.model) == pytest.approx(final, abs=0.005)
    shipped = back.sparsify
    assert shipped.sparsifier is None and shipped.history == [] and shipped.sparsity == 80
    with back.no_bar(): (preds_back, _), text = printed(lambda: back.get_preds(dl=back.dls.test_dl(list(range(72, 96)))))
    assert quiet(text) and torch.allclose(preds_back, preds, atol=1e-6) and same(trained, state(back))
