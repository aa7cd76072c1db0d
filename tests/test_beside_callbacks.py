"""Issue 11, class 2: beside fastai's other callbacks, the model the callback hands back is the one they mean, and its
epoch lines stay exact."""
import contextlib, io, math
from fractions import Fraction
import numpy as np, pytest, torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.callback.progress import CSVLogger, ShowGraphCallback
from fastai.metrics import ValueMetric, accuracy
from fasterai_sched import SparsifyCallback, agp, one_shot, large_final
from conftest import fit_capture, epoch_lines, conv_sparsity
from issue6_helpers import fast_learner


def expected(schedule, sparsity, n_epoch, learn, start_epoch=0):
    "The exact epoch lines of 'weight' local pruning: floor(target/100 * n) weights of each layer."
    sizes = [m.weight.numel() for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)]
    out = []
    for e in range(n_epoch):
        pos = 0 if e + 1 <= start_epoch else (e + 1 - start_epoch) / (n_epoch - start_epoch)
        t = schedule(0, sparsity, pos) if pos > 0 else 0
        out.append(round(100 * sum(math.floor(Fraction(t) * n / 100) for n in sizes) / sum(sizes), 2))
    return out


def epoch_metric_learner(tmp_path):
    "A learner whose metrics include the epoch number, so that SaveModelCallback's best epoch is chosen by the test."
    learn = fast_learner(path=tmp_path)
    learn.metrics = [accuracy, ValueMetric(lambda: learn.epoch, 'epoch_n')]
    return learn


def test_save_model_callback_hands_back_best_as_saved(tmp_path):
    learn = epoch_metric_learner(tmp_path)
    # comp=np.less on the epoch number: the best epoch is the first, pruned 0% (the window opens at epoch 1)
    text = fit_capture(learn, 4, [SparsifyCallback(sparsity=80, schedule=agp, start_epoch=1),
                                  SaveModelCallback(monitor='epoch_n', comp=np.less)])
    best = torch.load(tmp_path / 'models' / 'model.pth', map_location='cpu')
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, best[k]), k
    assert conv_sparsity(learn.model) == 0  # best.pth as saved, no later masks applied on top
    assert epoch_lines(text)[-1] == 80 and 'Final Sparsity: 0.00%' in text


def test_save_model_callback_best_in_the_middle(tmp_path):
    learn = epoch_metric_learner(tmp_path)
    # comp picks the epoch whose number is largest but under 2: the best is epoch 1, with agp's epoch-1 masks
    text = fit_capture(learn, 4, [SparsifyCallback(sparsity=80, schedule=agp, start_epoch=0),
                                  SaveModelCallback(monitor='epoch_n', comp=lambda a, b: a < 2 and a > b)])
    best = torch.load(tmp_path / 'models' / 'model.pth', map_location='cpu')
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, best[k]), k
    lines = epoch_lines(text)
    assert conv_sparsity(learn.model) == pytest.approx(lines[1], abs=0.005) and lines[1] < lines[-1] == 80
    assert f'Final Sparsity: {lines[1]:.2f}%' in text


@pytest.mark.parametrize('n_acc', [48, 72])
def test_gradient_accumulation_reaches_the_target_with_exact_lines(tmp_path, n_acc):
    learn = fast_learner(path=tmp_path, bs=24)  # 3 batches of 24 per epoch: steps every 2 or 3 batches
    text = fit_capture(learn, 4, [SparsifyCallback(sparsity=80, schedule=agp, start_epoch=1), GradientAccumulation(n_acc)])
    assert epoch_lines(text) == expected(agp, 80, 4, learn, start_epoch=1)
    assert conv_sparsity(learn.model) == pytest.approx(80, abs=0.01) and 'Final Sparsity: 80.00%' in text


class CancelIn(Callback):
    "Cancels the fit in `event`; its order puts it before or after SparsifyCallback."
    def __init__(self, event, order=10, when=lambda cb: True):
        self.order, self.when = order, when
        setattr(self, event, self._cancel)
    def _cancel(self):
        if self.when(self): raise CancelFitException()


@pytest.mark.parametrize('order', [10, 90])
def test_a_fit_cancelled_in_before_fit(tmp_path, order):
    learn = fast_learner(path=tmp_path)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    text = fit_capture(learn, 3, [SparsifyCallback(sparsity=50), CancelIn('before_fit', order)])
    # cancelled after ours (order 90), the fit had begun: only its first line, nothing trained or measured
    assert text == ('' if order < 70 else 'Pruning of weight until a sparsity of 50%\n') and all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    # and the callback goes on working in the next fit
    assert epoch_lines(fit_capture(learn, 2, [SparsifyCallback(sparsity=50)]))[-1] == 50


def test_a_fit_cancelled_between_the_optimizer_step_and_ours_is_masked(tmp_path):
    learn = fast_learner(path=tmp_path)
    cb = SparsifyCallback(sparsity=60, schedule=one_shot)
    text = fit_capture(learn, 2, [cb, CancelIn('after_step', 50, lambda c: c.epoch == 1 and c.iter == 1)])
    assert conv_sparsity(learn.model) == pytest.approx(60, abs=0.01)
    assert epoch_lines(text) == [60, 60]  # the cut epoch gets its line too
    for n, m in cb.sparsifier.layers.items(): assert (m.weight[~cb.sparsifier.masks[n].expand_as(m.weight)] == 0).all()


def test_early_stopping_prints_the_stopped_epochs_line(tmp_path):
    learn = fast_learner(path=tmp_path)
    # comp=np.greater with a huge min_delta never sees an improvement after the first epoch: stops after epoch 1
    stop = EarlyStoppingCallback(monitor='valid_loss', comp=np.greater, min_delta=1e9, patience=0)
    text = fit_capture(learn, 6, [SparsifyCallback(sparsity=60, schedule=agp, start_epoch=0), stop])
    assert epoch_lines(text) == expected(agp, 60, 6, learn)[:2]
    assert f"Final Sparsity: {epoch_lines(text)[-1]:.2f}%" in text


@pytest.mark.parametrize('other', ['ReduceLROnPlateau', 'GradientClip', 'CSVLogger', 'ShowGraphCallback', 'MixedPrecision'])
def test_lines_are_exact_beside_other_callbacks(tmp_path, other):
    learn = fast_learner(path=tmp_path)
    cbs = {'ReduceLROnPlateau': lambda: [ReduceLROnPlateau(patience=0, min_delta=1e9)], 'GradientClip': lambda: [GradientClip(1e-3)],
           'CSVLogger': lambda: [CSVLogger()], 'ShowGraphCallback': lambda: [ShowGraphCallback()], 'MixedPrecision': lambda: []}[other]()
    if other == 'MixedPrecision': learn.to_fp16()  # on CPU, fastai 2.8 autocasts for 'cuda': float32 with a GradScaler
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        if other == 'ShowGraphCallback': learn.fit(3, 1e-3, cbs=[SparsifyCallback(sparsity=70, schedule=agp, start_epoch=0)] + cbs)
        else:
            with learn.no_bar(): learn.fit(3, 1e-3, cbs=[SparsifyCallback(sparsity=70, schedule=agp, start_epoch=0)] + cbs)
    assert epoch_lines(out.getvalue()) == expected(agp, 70, 3, learn)
    assert conv_sparsity(learn.model) == pytest.approx(70, abs=0.01)
    if other == 'CSVLogger': assert len((tmp_path / 'history.csv').read_text().splitlines()) == 4


def test_early_stopping_and_save_model_together(tmp_path):
    learn = epoch_metric_learner(tmp_path)
    stop = EarlyStoppingCallback(monitor='valid_loss', comp=np.greater, min_delta=1e9, patience=0)  # stops after epoch 1
    text = fit_capture(learn, 6, [SparsifyCallback(sparsity=60, schedule=agp, start_epoch=0), stop,
                                  SaveModelCallback(monitor='epoch_n', comp=np.less)])  # best: epoch 0
    lines = epoch_lines(text)
    assert lines == expected(agp, 60, 6, learn)[:2]  # the stopped epoch's line is its own, measured before the load
    best = torch.load(tmp_path / 'models' / 'model.pth', map_location='cpu')
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, best[k]), k
    assert f"Final Sparsity: {lines[0]:.2f}%" in text


def test_reset_end_rewinds_the_model_save_model_callback_hands_back(tmp_path):
    learn = epoch_metric_learner(tmp_path)
    cb = SparsifyCallback(sparsity=80, schedule=agp, reset_end=True)
    fit_capture(learn, 4, [cb, SaveModelCallback(monitor='epoch_n', comp=lambda a, b: a < 2 and a > b)])  # best: 1
    best = torch.load(tmp_path / 'models' / 'model.pth', map_location='cpu')
    for n, m in cb.sparsifier.layers.items():
        zero = best[f'{n}.weight'] == 0
        assert zero.any() and torch.equal(m.weight == 0, zero | (cb.sparsifier.rewind_weights[n] == 0)), n
        assert torch.equal(m.weight[~zero], cb.sparsifier.rewind_weights[n][~zero]), n  # best's masks, rewound
