"""Issue 11, class 7: the sentences of README.md and docs/ that state a number or a behaviour, checked against the
code. Each test quotes the sentence it checks, so a changed claim fails here until it is measured again."""
import random as pyrandom, re
from pathlib import Path
import pytest, torch, torch.nn as nn
from fasterai_sched import (SparsifyCallback, Sparsifier, sparsity_report, agp, large_final, movement, large_init,
                            updating_movement, taylor)
from conftest import fit_capture, epoch_lines, small_learner, even_net
from issue6_helpers import fast_learner

ROOT = Path(__file__).parents[1]
README, RESUME, ERRORS = [(ROOT / p).read_text() for p in ('README.md', 'docs/resume.md', 'docs/errors.md')]


def flat(text): return re.sub(r'\s+', ' ', text)


def says(doc, sentence):
    assert flat(sentence) in flat(doc), f"the docs no longer say: {sentence}"


def test_a_printed_sparsity_can_sit_below_the_target():
    says(README, "80% of a layer of 216 weights prunes 172: 79.63%")
    says(ERRORS, "80% on a layer of 216 weights prunes `floor(0.8 · 216) = 172` of them and prints 79.63%")
    net = nn.Sequential(nn.Conv2d(3, 8, 3))
    assert net[0].weight.numel() == 216
    Sparsifier(net).prune(80)
    row = sparsity_report(net, verbose=False)[0]
    assert row.zeros == 172 and f"{row.sparsity:.2f}" == '79.63'


@pytest.mark.parametrize('granularity,per', [('weight', 1), ('kernel', 9), ('filter', 27)])
def test_masks_take_at_most_one_byte_per_weight(granularity, per):
    says(README, "Masks take at most one byte per weight of the pruned layers (one per unit for structured granularities)")
    net = nn.Sequential(nn.Conv2d(3, 8, 3))
    sp = Sparsifier(net, granularity=granularity)
    sp.prune(50)
    assert sp.memory_bytes()['masks'] == 216 // per


@pytest.mark.parametrize('kw,copies', [
    (dict(), False), (dict(criteria=taylor), False), (dict(lth=True), True), (dict(reset_end=True), True),
    (dict(criteria=movement), True), (dict(criteria=large_init), True), (dict(criteria=updating_movement), True)],
    ids=['large_final', 'taylor', 'lth', 'reset_end', 'movement', 'large_init', 'updating_movement'])
def test_weight_copies_only_when_something_needs_them(tmp_path, kw, copies):
    says(README, "no weight copy is kept unless `lth`, `reset_end` or a criterion that compares with earlier weights "
                 "(`'init'` or `'previous'`) needs one")
    cb = SparsifyCallback(sparsity=50, schedule=agp, **kw)
    text = fit_capture(fast_learner(path=tmp_path), 2, [cb])
    assert (cb.sparsifier.memory_bytes()['weight_copies'] > 0) == copies
    says(README, "`Saving Weights at epoch N` appears only when weights are really copied (`lth=True` or `reset_end=True`)")
    assert ('Saving Weights at epoch 0' in text) == bool(kw.get('lth') or kw.get('reset_end'))


@pytest.mark.parametrize('zero_layer', [False, True], ids=['plain', 'zero-initialised layer'])
def test_sparsity_zero_trains_exactly_as_without_the_callback(zero_layer):
    says(RESUME, "`sparsity=0`: no weight is ever pruned, and the fit trains exactly as without the callback")
    models = []
    for with_cb in [True, False]:
        pyrandom.seed(0); torch.manual_seed(0)
        learn = small_learner(model=even_net(), c=8)
        if zero_layer: nn.init.zeros_(learn.model[3].weight)
        torch.manual_seed(1)
        fit_capture(learn, 2, [SparsifyCallback(sparsity=0, granularity='filter')] if with_cb else [], lr=1e-2)
        models.append(learn.model.state_dict())
    for k, v in models[0].items(): assert torch.equal(v, models[1][k]), k


def test_the_agp_lines_of_the_readme():
    m = re.search(r"the epoch lines read ([\d., ]+)\.", flat(README))
    assert m, "the README no longer quotes agp's epoch lines"
    quoted = [float(v) for v in m[1].split(', ')]
    assert quoted == [round(agp(0, 90, max(0, (e + 1 - 2) / 8)), 2) for e in range(10)]


def test_a_run_name_of_eight_hex_digits(tmp_path):
    says(RESUME, "gets a name of 8 hex digits")
    fit_capture(fast_learner(path=tmp_path), 2, [SparsifyCallback(sparsity=50, lth=True)])
    names = sorted(p.name for p in (tmp_path / 'models').iterdir())
    assert len(names) == 2 and all(re.fullmatch(r"sparsify_state_[0-9a-f]{8}\.(json|pth)", n) for n in names)


def test_the_readme_workflow_kept_in_the_learner_runs(tmp_path):
    "The README's `Learner(cbs=...)` example, on a small learner: each comment is what happens."
    says(README, "learn.lr_find()                  # a mock training: nothing pruned, nothing printed")
    from fastai.callback.tracker import SaveModelCallback
    learn = fast_learner(path=tmp_path, cbs=[SparsifyCallback(sparsity=80, schedule=agp, start_epoch=1),
                                            SaveModelCallback()])
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar():
        learn.lr_find(num_it=12, show_plot=False)
        assert 'Sparsity' not in out.getvalue()
        learn.fit_one_cycle(5, 1e-3)
        assert 'Final Sparsity' in out.getvalue()
        n = len(out.getvalue())
        learn.validate(); learn.get_preds(); learn.predict(0)
        assert 'Sparsity' not in out.getvalue()[n:]
