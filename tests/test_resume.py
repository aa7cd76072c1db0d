"""Issue 6, resume: a run saved at the end of an epoch and continued in a fresh learner ends as the uninterrupted run."""
import re
from functools import partial
import pytest, torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.learner import load_learner
from fasterai_sched import SparsifyCallback, agp, iterative, movement, large_init, large_final
from conftest import fit_capture, epoch_lines, conv_sparsity
from issue6_helpers import fast_learner

N_EPOCH = 6


class Crash(RuntimeError): pass


class SaveThenCrash(Callback):
    "Save with `learn.save` at the end of `epoch` (after the epoch line), then stop the fit as a crash would."
    order = 90
    def __init__(self, epoch): self.crash_epoch = epoch
    def after_epoch(self):
        if self.epoch == self.crash_epoch:
            self.learn.save('ckpt')
            raise Crash(f"killed after epoch {self.epoch}")


def state_files(tmp_path):
    "The callback's state files in the learner's models folder: one weight file and one index per run."
    return sorted((tmp_path / 'models').glob(f"{SparsifyCallback.state_fname}_*"))


def remove_state_files(tmp_path):
    for f in state_files(tmp_path): f.unlink()


def conv_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def uninterrupted(tmp_path, **kw):
    "The whole run, saving a checkpoint at every epoch; returns its learner, callback and printed text."
    learn = fast_learner(path=tmp_path)
    cb = SparsifyCallback(**kw)
    out = fit_capture(learn, N_EPOCH, [cb, SaveModelCallback(every_epoch=True)])
    return learn, cb, out


def resumed(tmp_path, ckpt, epoch, **kw):
    "A freshly built learner, loaded from `ckpt`, continued at `epoch` with a new callback of the same arguments."
    learn = fast_learner(seed=1, path=tmp_path)  # another init: everything must come from the checkpoint
    learn.load(ckpt)
    loaded = conv_weights(learn.model)
    cb = SparsifyCallback(**kw)
    out = fit_capture(learn, N_EPOCH, [cb], start_epoch=epoch)
    return learn, cb, out, loaded


@pytest.mark.parametrize('schedule', [agp, partial(iterative, n_steps=3)], ids=['agp', 'iterative'])
def test_save_model_callback_resume_prints_the_same_lines(tmp_path, schedule):
    kw = dict(sparsity=80, schedule=schedule, start_epoch=1)
    _, _, full = uninterrupted(tmp_path, **kw)
    lines = epoch_lines(full)
    assert len(lines) == N_EPOCH and lines[-1] == 80.0
    k = 2
    learn, cb, out, at_save = resumed(tmp_path, f'model_{k}', k + 1, **kw)
    assert epoch_lines(out) == lines[k + 1:]
    # no line for the skipped epochs, and the final line is the uninterrupted run's
    assert not re.search(r"end of epoch [0-2]:", out)
    assert re.search(r"Final Sparsity: 80.00%", out) and re.search(r"Final Sparsity: 80.00%", full)
    # every weight pruned at the save is still pruned
    now = conv_weights(learn.model)
    for n, w in at_save.items():
        assert (w == 0).any()
        assert (now[n][w == 0] == 0).all(), n


def test_learn_save_after_a_crash_resumes_with_the_same_lines(tmp_path):
    kw = dict(sparsity=75, schedule=agp, start_epoch=1, granularity='filter')
    _, _, full = uninterrupted(tmp_path, **kw)
    crashed = fast_learner(path=tmp_path)
    with pytest.raises(Crash):
        fit_capture(crashed, N_EPOCH, [SparsifyCallback(**kw), SaveThenCrash(3)])
    learn, cb, out, at_save = resumed(tmp_path, 'ckpt', 4, **kw)
    assert epoch_lines(out) == epoch_lines(full)[4:]
    assert conv_sparsity(learn.model) == pytest.approx(75, abs=0.01)
    # whole filters pruned at the save are still pruned
    now = conv_weights(learn.model)
    for n, w in at_save.items(): assert (now[n][w == 0] == 0).all(), n


def test_lth_resume_reads_back_the_original_rewind_weights(tmp_path):
    kw = dict(sparsity=70, schedule=partial(iterative, n_steps=3), start_epoch=1, lth=True, rewind_epoch=1)
    learn0, cb0, full = uninterrupted(tmp_path, **kw)
    assert "Saving Weights at epoch 1" in full
    files = state_files(tmp_path)
    assert [f.suffix for f in files] == ['.json', '.pth']  # one run: its weight copies and its index
    state_file = files[1]
    original = {n: t.clone() for n, t in cb0.sparsifier.rewind_weights.items()}
    learn = fast_learner(seed=1, path=tmp_path); learn.load('model_3')
    cb, seen = SparsifyCallback(**kw), RewoundWeights(original)
    out = fit_capture(learn, N_EPOCH, [cb, seen], start_epoch=4)
    assert f"Resuming at epoch 4: read back the rewind weights from {state_file}" in out
    assert "Saving Weights" not in out  # not taken again from the loaded weights
    assert epoch_lines(out) == epoch_lines(full)[4:]
    assert cb.sparsifier.rewind_weights.keys() == original.keys()
    for n, t in original.items(): assert torch.equal(cb.sparsifier.rewind_weights[n], t), n
    # iterative's third step falls in epoch 4: the kept weights went back to the original run's epoch-1 weights
    assert seen.changes == 1


class RewoundWeights(Callback):
    "After each mask change, check the kept weights are the original run's rewind weights (the pruned ones zero)."
    order = 75  # right after SparsifyCallback
    def __init__(self, rewind): self.rewind, self.changes = rewind, 0
    def before_fit(self): self.masks = self.learn.sparsify.sparsifier.masks
    def before_step(self):
        sp = self.learn.sparsify.sparsifier
        if sp.masks is self.masks: return
        self.masks, self.changes = sp.masks, self.changes + 1
        for n, m in sp.layers.items():
            assert torch.equal(m.weight, self.rewind[n] * sp.masks[n]), n


def test_lth_resume_before_the_rewind_epoch_takes_the_weights_in_the_resumed_fit(tmp_path):
    kw = dict(sparsity=70, schedule=agp, start_epoch=3, lth=True, rewind_epoch=3)
    _, cb0, full = uninterrupted(tmp_path, **kw)
    remove_state_files(tmp_path)  # the resumed fit must not need them
    learn, cb, out, loaded = resumed(tmp_path, 'model_1', 2, **kw)
    assert "read back" not in out and "Saving Weights at epoch 3" in out
    assert epoch_lines(out) == epoch_lines(full)[2:]


def test_init_criteria_resume_reads_back_the_reference(tmp_path):
    # large_init ranks by the 'init' weights only: the masks of a run depend on nothing else, so they must agree
    kw = dict(sparsity=60, schedule=agp, start_epoch=1, criteria=large_init)
    _, cb0, full = uninterrupted(tmp_path, **kw)
    original = {n: t.clone() for n, t in cb0.sparsifier.reference.items()}
    learn, cb, out, loaded = resumed(tmp_path, 'model_2', 3, **kw)
    assert "read back the reference weights" in out
    assert epoch_lines(out) == epoch_lines(full)[3:]
    for n, t in original.items():
        assert torch.equal(cb.sparsifier.reference[n], t)
        assert not torch.equal(t, loaded[n])  # the loaded weights are not the reference
        assert torch.equal(cb.sparsifier.masks[n], cb0.sparsifier.masks[n]), n


def test_resume_without_the_state_file_fails_before_any_weight_changes(tmp_path):
    kw = dict(sparsity=70, schedule=agp, start_epoch=1, lth=True, rewind_epoch=0)
    uninterrupted(tmp_path, **kw)
    remove_state_files(tmp_path)
    learn = fast_learner(path=tmp_path); learn.load('model_2')
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"resumes at epoch 3 and needs the rewind weights.*missing"):
        fit_capture(learn, N_EPOCH, [SparsifyCallback(**kw)], start_epoch=3)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k]), k


class MasksAtStart(Callback):
    "The percent of weights the callback's masks zero when the fit starts, seen right after its before_fit."
    order = 75
    def before_fit(self): self.masked = self.learn.sparsify.sparsifier.masked_sparsity()


def test_the_same_callback_resumes_from_a_checkpoint_loaded_into_the_same_model(tmp_path):
    kw = dict(sparsity=80, schedule=agp, start_epoch=1, lth=True, rewind_epoch=1)
    learn, cb = fast_learner(path=tmp_path), SparsifyCallback(**kw)
    full = fit_capture(learn, N_EPOCH, [cb, SaveModelCallback(every_epoch=True)])
    rewind = {n: t.clone() for n, t in cb.sparsifier.rewind_weights.items()}
    learn.load('model_2')  # back to epoch 2, in the same model: the callback's last masks are those of epoch 5
    at_load = conv_sparsity(learn.model)
    seen = MasksAtStart()
    out = fit_capture(learn, N_EPOCH, [cb, seen], start_epoch=3)
    assert seen.masked == pytest.approx(at_load) and at_load < 80  # the masks are the checkpoint's, not the last fit's
    assert epoch_lines(out) == epoch_lines(full)[3:]
    assert "read back" not in out  # the rewind weights it holds are the run's own
    for n, t in rewind.items(): assert torch.equal(cb.sparsifier.rewind_weights[n], t)


def test_state_fname_none_writes_nothing_and_a_resume_past_the_copies_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(SparsifyCallback, 'state_fname', None)
    kw = dict(sparsity=70, schedule=agp, start_epoch=1, lth=True, rewind_epoch=1)
    uninterrupted(tmp_path, **kw)
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == [f'model_{i}.pth' for i in range(N_EPOCH)]
    learn = fast_learner(path=tmp_path); learn.load('model_2')
    with pytest.raises(FileNotFoundError, match="state_fname is None, so none was written"):
        fit_capture(learn, N_EPOCH, [SparsifyCallback(**kw)], start_epoch=3)


def test_state_file_of_another_model_is_refused(tmp_path):
    kw = dict(sparsity=50, criteria=movement)
    learn = fast_learner(path=tmp_path, c=3)
    fit_capture(learn, 2, [SparsifyCallback(**kw)])
    other = fast_learner(path=tmp_path, c=5)  # the first layer has another shape
    with pytest.raises(ValueError, match="written for other layers"):
        fit_capture(other, 3, [SparsifyCallback(**kw)], start_epoch=1)


def test_pruned_model_loads_strictly_into_a_fresh_learner(tmp_path):
    learn = fast_learner(path=tmp_path)
    fit_capture(learn, 2, [SparsifyCallback(sparsity=90, granularity='filter', context='global')])
    learn.save('pruned')
    fresh = fast_learner(seed=3, path=tmp_path)
    assert fresh.model.state_dict().keys() == learn.model.state_dict().keys()  # no mask buffers or parametrizations
    fresh.load('pruned')  # fastai's default: strict=True
    assert conv_sparsity(fresh.model) == pytest.approx(conv_sparsity(learn.model)) and conv_sparsity(fresh.model) > 80
    for (k, a), b in zip(learn.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize('cb_in_learner', [False, True], ids=['fit-cbs', 'learner-cbs'])
def test_export_and_load_learner_round_trip_a_pruned_learner(tmp_path, cb_in_learner):
    kw = dict(sparsity=80, schedule=agp, criteria=large_final)
    learn = fast_learner(path=tmp_path, cbs=[SparsifyCallback(**kw)] if cb_in_learner else None)
    fit_capture(learn, 2, None if cb_in_learner else [SparsifyCallback(**kw)])
    assert conv_sparsity(learn.model) == pytest.approx(80, abs=0.01)
    learn.export('pruned.pkl')
    back = load_learner(tmp_path / 'pruned.pkl')
    for (k, a), b in zip(learn.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(4, 3, 8, 8)
    learn.model.eval(); back.model.eval()
    assert torch.equal(learn.model(x), back.model(x))
    if cb_in_learner:  # issue 11: the export carries the callback's arguments, none of a run's masks or weight copies
        cb = back.cbs.filter(lambda c: isinstance(c, SparsifyCallback))[0]
        assert cb.sparsifier is None and cb.history == [] and cb.sparsity == 80



@pytest.mark.parametrize('schedule', [agp, partial(iterative, n_steps=3)], ids=['agp', 'iterative'])
def test_resume_within_the_schedules_own_window(tmp_path, schedule):
    "No start_epoch (issue 10): the window is the schedule's own, a share of the whole fit, and a resumed fit keeps it."
    kw = dict(sparsity=80, schedule=schedule)
    _, _, full = uninterrupted(tmp_path, **kw)
    lines = epoch_lines(full)
    assert lines[0] == 0 and lines[1] > 0 and lines[-1] == 80.0  # a fifth of 6 epochs: pruning starts in epoch 1
    learn, cb, out, at_save = resumed(tmp_path, 'model_2', 3, **kw)
    assert epoch_lines(out) == lines[3:]
