"""Issue 11, class 1: kept in `Learner(cbs=...)`, the callback acts in training fits only. Inside `validate`, `get_preds`,
`predict`, `summary`, `tta` and `lr_find` it prints nothing and changes no weight, file or record."""
import contextlib, io, random
import pytest, torch
from fastai.callback.core import Callback, CancelFitException
from fastai.learner import Learner
from fasterai_sched import SparsifyCallback, agp, large_init
from conftest import fit_capture, epoch_lines, conv_sparsity
from issue6_helpers import fast_learner


def snapshot(learn):
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files(learn): return sorted(p.name for p in (learn.path / learn.model_dir).glob('*')) \
    if (learn.path / learn.model_dir).exists() else []


INFERENCE = {
    'validate': lambda l: l.validate(),
    'get_preds': lambda l: l.get_preds(),
    'get_preds train set': lambda l: l.get_preds(ds_idx=0),
    'predict': lambda l: l.predict(0),
    'summary': lambda l: l.summary(),
    'tta': lambda l: l.tta(n=2),
}


@pytest.mark.parametrize('call', INFERENCE, ids=list(INFERENCE))
def test_inference_before_any_fit_does_nothing(tmp_path, call):
    # start_epoch=2 would be past the end of a one-epoch "fit": the callback must not even look
    cb = SparsifyCallback(sparsity=50, schedule=agp, start_epoch=2, criteria=large_init)
    learn = fast_learner(path=tmp_path, cbs=[cb])
    before = snapshot(learn)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(): INFERENCE[call](learn)
    text = out.getvalue()
    assert 'Sparsity' not in text and 'Pruning' not in text
    assert same(before, snapshot(learn)) and files(learn) == [] and cb.sparsifier is None and cb.history == []
    # and the learner is not left in a bad state: a training fit afterwards prunes as usual
    lines = epoch_lines(fit_capture(learn, 4, None))
    assert len(lines) == 4 and lines[:2] == [0, 0] and lines[-1] == 50


@pytest.mark.parametrize('call', INFERENCE, ids=list(INFERENCE))
def test_inference_after_training_changes_no_weight_file_or_record(tmp_path, call):
    cb = SparsifyCallback(sparsity=60, schedule=agp, start_epoch=1, criteria=large_init, lth=True)
    learn = fast_learner(path=tmp_path, cbs=[cb])
    fit_capture(learn, 3, None)
    before, history, sp = snapshot(learn), list(cb.history), cb.sparsifier
    state = {f: (learn.path / learn.model_dir / f).read_bytes() for f in files(learn)}
    assert state  # the run wrote its weight copies
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(): INFERENCE[call](learn)
    assert 'Sparsity' not in out.getvalue() and 'Pruning' not in out.getvalue()
    assert same(before, snapshot(learn)) and cb.history == history and cb.sparsifier is sp
    assert {f: (learn.path / learn.model_dir / f).read_bytes() for f in files(learn)} == state
    assert cb.final_sparsity == pytest.approx(60, abs=0.01)


def test_lr_find_neither_prunes_nor_prints(tmp_path):
    cb = SparsifyCallback(sparsity=50, schedule=agp)
    learn = fast_learner(path=tmp_path, cbs=[cb])
    before = snapshot(learn)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(): learn.lr_find(num_it=12, show_plot=False)
    assert 'Sparsity' not in out.getvalue() and 'Pruning' not in out.getvalue()
    assert same(before, snapshot(learn)) and conv_sparsity(learn.model) == 0 and cb.sparsifier is None


@pytest.mark.parametrize('how', ['fit', 'fit_one_cycle'])
def test_kept_in_the_learner_a_training_fit_is_as_when_passed_to_fit(tmp_path, how):
    kw = dict(sparsity=70, schedule=agp, start_epoch=1)
    texts, models = [], []
    for kept in [True, False]:
        random.seed(0)  # fastai's loaders draw their shuffling seed from `random` when built
        learn = fast_learner(path=tmp_path / str(kept), cbs=[SparsifyCallback(**kw)] if kept else None)
        cbs = None if kept else [SparsifyCallback(**kw)]
        with learn.no_bar(): learn.validate()  # an inference pass first changes nothing either way
        torch.manual_seed(1)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), learn.no_bar(): getattr(learn, how)(3, 1e-3, cbs=cbs)
        texts.append(out.getvalue()); models.append(snapshot(learn))
    assert texts[0] == texts[1] and 'Final Sparsity: 70.00%' in texts[0]
    assert same(*models)


class InferenceInside(Callback):
    "A logger that runs inference passes of every kind from inside the fit, as W&B-style loggers do."
    order, busy = 60, False  # before SparsifyCallback; `busy`: the passes send these events too
    def after_epoch(self): self.once(lambda: (self.learn.validate(), self.learn.get_preds(inner=True), self.learn.summary()))
    def after_fit(self): self.once(lambda: (self.learn.get_preds(), self.learn.tta(n=1)))
    def once(self, f):
        if self.busy: return
        self.busy = True
        try: f()
        finally: self.busy = False


def test_inference_passes_inside_a_training_fit_leave_its_lines_alone(tmp_path):
    kw = dict(sparsity=80, schedule=agp, start_epoch=1)
    plain_learn, busy_learn = fast_learner(path=tmp_path / 'a'), fast_learner(path=tmp_path / 'b')
    plain = fit_capture(plain_learn, 3, [SparsifyCallback(**kw)])
    busy = fit_capture(busy_learn, 3, [SparsifyCallback(**kw), InferenceInside()])
    assert epoch_lines(busy) == epoch_lines(plain) and busy.count('Final Sparsity') == 1
    assert busy.count('Pruning of weight') == 1 and conv_sparsity(busy_learn.model) == pytest.approx(80, abs=0.01)


class Boom(RuntimeError): pass


class CrashAt(Callback):
    order = 90
    def after_batch(self):
        if self.training and self.iter == 1: raise Boom('crash')


def test_a_fit_after_a_crashed_fit_is_a_new_run(tmp_path):
    cb = SparsifyCallback(sparsity=50, schedule=agp)
    learn = fast_learner(path=tmp_path, cbs=[cb])
    with pytest.raises(Boom): fit_capture(learn, 2, [CrashAt()])
    learn.validate()  # still nothing of ours in an inference pass
    text = fit_capture(learn, 2, None)
    assert len(epoch_lines(text)) == 2 and 'Final Sparsity: 50.00%' in text


def test_fit_zero_says_so(tmp_path):
    learn = fast_learner(path=tmp_path, cbs=[SparsifyCallback(sparsity=50)])
    before = snapshot(learn)
    with pytest.warns(UserWarning, match=r"fit\(0\) trains no epoch, so nothing was pruned"):
        text = fit_capture(learn, 0, None)
    assert text == '' and same(before, snapshot(learn))


class OwnFitLearner(Learner):
    "A Learner whose fit runs fastai's loop without `Learner.fit`: the callback starts its run at `before_train`."
    def fit(self, n_epoch, lr=None, wd=None, cbs=None, reset_opt=False, start_epoch=0):
        with self.added_cbs(cbs):
            if reset_opt or not self.opt: self.create_opt()
            self.opt.set_hypers(lr=self.lr if lr is None else lr)
            self.n_epoch = n_epoch
            self._with_events(self._do_fit, 'fit', CancelFitException, self._end_cleanup)


def test_a_fit_that_comes_another_way_prunes_the_same(tmp_path):
    from issue6_helpers import fast_dls
    from conftest import small_net
    from fastai.vision.all import CrossEntropyLossFlat, accuracy
    texts, models = [], []
    for cls in [Learner, OwnFitLearner]:
        random.seed(0); torch.manual_seed(0)
        learn = cls(fast_dls(), small_net(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=tmp_path / cls.__name__)
        cb = SparsifyCallback(sparsity=70, schedule=agp, start_epoch=1)
        learn.add_cb(cb)
        with learn.no_bar(): learn.validate()
        torch.manual_seed(1)
        texts.append(fit_capture(learn, 3, None)); models.append(snapshot(learn))
    assert texts[0] == texts[1] and 'Final Sparsity: 70.00%' in texts[1] and same(*models)
