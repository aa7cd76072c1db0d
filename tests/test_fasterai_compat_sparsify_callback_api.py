"""fasterai's SparsifyCallback API page: its arguments (positional order, dict sparsity, nm, save_tickets, lth, ...),
`current_sparsity` and the fraction warning, with only the import and the data changed."""
import warnings
import pytest, torch, torch.nn as nn
from fastai.callback.core import Callback
from fasterai_sched import *
from conftest import small_learner, epoch_lines, conv_sparsity
import contextlib, io


from test_fasterai_compat_sparsify_callback_tutorial import run, PerLayer


def test_api_a_sparsity_per_layer_as_a_dict():
    learn = small_learner()
    sp_cb = SparsifyCallback(sparsity={'3': 60}, granularity='weight', context='local', criteria=large_final, schedule=cos)
    probe = PerLayer()
    run(learn, 2, [sp_cb, probe])
    assert probe.seen[-1] == pytest.approx([0, 60, 0], abs=0.01)


def test_api_positional_arguments_in_fasterais_order():
    learn = small_learner()
    text = run(learn, 2, SparsifyCallback(50, 'filter', 'global', large_final, one_cycle))
    assert 'Pruning of filter until a sparsity of 50%' in text


def test_api_current_sparsity_follows_the_schedule():
    class Watch(Callback):
        order = 80
        def before_fit(self): self.seen = []
        def after_step(self): self.seen.append(cb.current_sparsity)
    learn, w = small_learner(), Watch()
    cb = SparsifyCallback(sparsity=80, granularity='weight', context='local', criteria=large_final, schedule=agp)
    assert cb.current_sparsity == 0
    run(learn, 5, [cb, w], how='fit')
    n = len(learn.dls.train)
    assert w.seen[n - 1] == 0 and w.seen[n] > 0  # agp's window opens once a fifth of training (1 epoch of 5) is done
    assert w.seen[2 * n - 1] == pytest.approx(80 * (1 - 0.75 ** 3)) and w.seen[-1] == 80 and cb.current_sparsity == 80


def test_api_nm_is_the_2_4_pattern():
    learn = small_learner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        text = run(learn, 2, SparsifyCallback(sparsity=100, granularity='weight', context='local', criteria=large_final,
                                              schedule=one_shot, nm=True))
    assert any('stay dense' in str(w.message) for w in caught)  # the 3-input first conv cannot split into fours
    convs = [m for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    for m in convs[1:]:  # every group of 4 inputs keeps exactly 2
        groups = (m.weight != 0).movedim(1, -1).reshape(-1, 4).sum(-1)
        assert bool((groups == 2).all())
    assert 'Pruning of 2:4 until a sparsity of 100%' in text
    with pytest.raises(ValueError, match="nm=True means granularity='2:4'"):
        SparsifyCallback(sparsity=50, granularity='filter', context='local', criteria=large_final, schedule=one_shot, nm=True)


def test_api_save_tickets_without_lth(tmp_path):
    learn = small_learner(path=tmp_path)
    cb = SparsifyCallback(sparsity=60, granularity='weight', context='local', criteria=large_final,
                          schedule=iterative, save_tickets=True)
    text = run(learn, 5, cb, how='fit')
    assert text.count('Saving Intermediate Ticket') == 3 and text.count('Saving Final Ticket') == 1
    assert 'Resetting Weights' not in text  # no lth: nothing is rewound
    files = sorted(p.name for p in (tmp_path / learn.model_dir).iterdir())
    assert files == ['ticket_final_sparsity_060.00.pth', 'ticket_sparsity_020.00.pth', 'ticket_sparsity_040.00.pth',
                     'ticket_sparsity_060.00.pth']
    state = torch.load(tmp_path / learn.model_dir / 'ticket_sparsity_040.00.pth', weights_only=True)
    convs = [k for k in state if k.endswith('weight') and state[k].dim() == 4]
    zeros = sum(int((state[k] == 0).sum()) for k in convs) / sum(state[k].numel() for k in convs)
    assert 100 * zeros == pytest.approx(40, abs=0.01)


def test_api_a_fraction_warns_that_sparsity_is_a_percent():
    with pytest.warns(UserWarning, match=r"sparsity=0.5 is a percent here.*Did you mean 50%"):
        SparsifyCallback(sparsity=0.5, granularity='weight', context='local', criteria=large_final, schedule=one_shot)
    with pytest.warns(UserWarning, match=r"sparsity\['3'\]=0.3"):
        SparsifyCallback(sparsity={'3': 0.3}, granularity='weight', context='local', criteria=large_final, schedule=one_shot)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        SparsifyCallback(sparsity=50, granularity='weight', context='local', criteria=large_final, schedule=one_shot)
        SparsifyCallback(sparsity=1, granularity='weight', context='local', criteria=large_final, schedule=one_shot)


def test_api_optional_arguments_of_the_page(tmp_path):
    "lth, rewind_epoch, reset_end, save_tickets, model, round_to, layer_type: each accepted and acting."
    learn = small_learner(path=tmp_path)
    head = learn.model[-1]
    cb = SparsifyCallback(sparsity=50, granularity='row', context='local', criteria=large_final, schedule=one_shot,
                          lth=True, rewind_epoch=0, reset_end=True, save_tickets=True, model=learn.model,
                          round_to=1, layer_type=nn.Linear)
    text = run(learn, 2, cb, how='fit')
    assert 'Saving Weights at epoch 0' in text and 'Resetting Weights to their epoch 0 values' in text
    assert int((head.weight == 0).all(1).sum()) == 1  # one of the 2 output rows


def test_api_given_epochs_win_over_the_schedules_window():
    "Only end_epoch: the window is epochs [0, end_epoch), today's meaning; neither: the schedule's own window."
    learn = small_learner()
    got = epoch_lines(run(learn, 4, SparsifyCallback(sparsity=60, granularity='weight', context='local',
                                                     criteria=large_final, schedule=lin, end_epoch=2), how='fit'))
    assert got == pytest.approx([30, 60, 60, 60], abs=0.011)
    learn = small_learner()
    got = epoch_lines(run(learn, 4, SparsifyCallback(sparsity=60, granularity='weight', context='local',
                                                     criteria=large_final, schedule=one_shot), how='fit'))
    assert got == [0, 60, 60, 60]  # half of 4 epochs done at the end of epoch 1
