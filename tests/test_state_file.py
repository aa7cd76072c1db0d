"""Issue 11, class 3: each run's weight copies belong to it. Two experiments in one folder each resume with their own,
and a checkpoint whose run's copies are not there is an error, never a silent read of another run's."""
import json
from functools import partial
import pytest, torch
from fastai.callback.tracker import SaveModelCallback
from fasterai_sched import SparsifyCallback, agp, iterative, large_init
from conftest import fit_capture, epoch_lines
from issue6_helpers import fast_learner

N = 5
LTH = dict(sparsity=70, schedule=partial(iterative, n_steps=3), start_epoch=1, lth=True, rewind_epoch=1)


def run(tmp_path, seed, fname, **kw):
    "A whole run saving `fname`_<epoch> checkpoints in the shared folder; returns its callback and printed text."
    learn = fast_learner(seed=seed, path=tmp_path)
    cb = SparsifyCallback(**kw)
    text = fit_capture(learn, N, [cb, SaveModelCallback(fname=fname, every_epoch=True)])
    return cb, text


def resume(tmp_path, ckpt, epoch, **kw):
    learn = fast_learner(seed=9, path=tmp_path)
    learn.load(ckpt)
    cb = SparsifyCallback(**kw)
    return cb, fit_capture(learn, N, [cb], start_epoch=epoch)


def copies(cb, kind): return {n: t.clone() for n, t in getattr(cb.sparsifier, kind).items()}


def equal(a, b): return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_two_experiments_in_one_folder_each_resume_with_their_own_copies(tmp_path):
    cb_a, full_a = run(tmp_path, 0, 'a', **LTH)
    cb_b, full_b = run(tmp_path, 1, 'b', **LTH)
    rewind_a, rewind_b = copies(cb_a, 'rewind_weights'), copies(cb_b, 'rewind_weights')
    assert not equal(rewind_a, rewind_b)
    assert len(list((tmp_path / 'models').glob('sparsify_state_*.pth'))) == 2  # one file per run
    for name, rewind, full in [('a', rewind_a, full_a), ('b', rewind_b, full_b)]:
        cb, text = resume(tmp_path, f'{name}_2', 3, **LTH)
        assert 'read back the rewind weights' in text and equal(copies(cb, 'rewind_weights'), rewind)
        assert epoch_lines(text) == epoch_lines(full)[3:]


def test_the_other_runs_copies_are_never_read(tmp_path):
    run(tmp_path, 0, 'a', **LTH)
    cb_b, _ = run(tmp_path, 1, 'b', **LTH)
    # run a's copies are lost; only run b's are in the folder
    for f in (tmp_path / 'models').glob('sparsify_state_*.json'):
        if json.loads(f.read_text())['run'] != cb_b._run: f.unlink()
    learn = fast_learner(seed=9, path=tmp_path); learn.load('a_2')
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"none of the 1 state file\(s\) .* is of the run the loaded weights come from"):
        fit_capture(learn, N, [SparsifyCallback(**LTH)], start_epoch=3)
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())


def test_a_checkpoint_of_another_epoch_is_refused(tmp_path):
    run(tmp_path, 0, 'a', **LTH)
    learn = fast_learner(seed=9, path=tmp_path); learn.load('a_2')
    with pytest.raises(ValueError, match="load the checkpoint saved at the end of epoch 3"):
        fit_capture(learn, N, [SparsifyCallback(**LTH)], start_epoch=4)  # epoch 3's checkpoint is a_3, not a_2


def test_init_reference_of_two_runs(tmp_path):
    kw = dict(sparsity=60, schedule=agp, start_epoch=1, criteria=large_init)
    cb_a, full_a = run(tmp_path, 0, 'a', **kw)
    cb_b, full_b = run(tmp_path, 1, 'b', **kw)
    for name, cb0, full in [('b', cb_b, full_b), ('a', cb_a, full_a)]:
        cb, text = resume(tmp_path, f'{name}_1', 2, **kw)
        assert 'read back the reference weights' in text and equal(copies(cb, 'reference'), copies(cb0, 'reference'))
        assert epoch_lines(text) == epoch_lines(full)[2:]


def test_a_resumed_run_goes_on_in_its_own_index_and_resumes_again(tmp_path):
    cb_a, full = run(tmp_path, 0, 'a', **LTH)
    cb1, text1 = resume(tmp_path, 'a_1', 2, **LTH)
    assert cb1._run == cb_a._run  # the resumed fit is the same run
    index = json.loads(next((tmp_path / 'models').glob(f'sparsify_state_{cb_a._run}.json')).read_text())
    assert sorted(index['epochs']) == ['1', '2', '3', '4'] and index['rewind_epoch'] == 1
    cb2, text2 = resume(tmp_path, 'a_3', 4, **LTH)
    assert epoch_lines(text2) == epoch_lines(full)[4:]


def test_the_same_callback_with_another_runs_checkpoint_reads_that_runs_copies(tmp_path):
    cb_a, _ = run(tmp_path, 0, 'a', **LTH)
    cb_b, full_b = run(tmp_path, 1, 'b', **LTH)
    learn = fast_learner(seed=0, path=tmp_path)
    learn.load('b_2')  # cb_a holds run a's copies; the weights are run b's
    cb_a.learn = None
    text = fit_capture(learn, N, [cb_a], start_epoch=3)
    assert 'read back the rewind weights' in text
    assert equal(copies(cb_a, 'rewind_weights'), copies(cb_b, 'rewind_weights'))
    assert epoch_lines(text) == epoch_lines(full_b)[3:]
