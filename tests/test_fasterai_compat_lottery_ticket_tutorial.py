"""fasterai's lottery ticket tutorial: lth with and without rewinding, tickets saved; its calls with only the import
and the data changed, and the lines fasterai prints."""
import contextlib, io
import pytest, torch, torch.nn as nn
from fastai.callback.core import Callback
from fasterai_sched import *
from conftest import small_learner, epoch_lines, conv_sparsity


def run(learn, n, cbs=None):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(): learn.fit(n, 1e-3, cbs=cbs)
    return out.getvalue()


class Weights(Callback):
    "The conv weights at the start of `epoch`, and at each step once the masks are set (before the optimizer's step)."
    order = 100
    def __init__(self, epoch): self.epoch_, self.at, self.after = epoch, None, []
    def before_epoch(self):
        if self.epoch == self.epoch_: self.at = [m.weight.detach().clone() for m in convs(self.learn.model)]
    def before_step(self): self.after.append([m.weight.detach().clone() for m in convs(self.learn.model)])


def convs(model): return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_lottery_ticket_rewinds_to_the_initial_weights():
    learn = small_learner()
    w = Weights(0)
    sp_cb = SparsifyCallback(50, 'weight', 'local', large_final, iterative, lth=True)
    text = run(learn, 10, [sp_cb, w])
    lines = text.splitlines()
    assert lines[:2] == ['Pruning of weight until a sparsity of 50%', 'Saving Weights at epoch 0']
    assert text.count('Resetting Weights to their epoch 0 values') == 3  # one per iterative step
    assert epoch_lines(text) == pytest.approx([0, 0, 16.67, 16.67, 33.33, 33.33, 33.33, 50, 50, 50], abs=0.011)
    # at the last rewind (the step reaching 50%), every surviving weight is back at its initial value
    pct = lambda ws: 100 * sum(int((x == 0).sum()) for x in ws) / sum(x.numel() for x in ws)
    rewound = next(ws for ws in w.after if pct(ws) == pytest.approx(50, abs=0.01))
    for now, init in zip(rewound, w.at):
        kept = now != 0
        assert torch.equal(now[kept], init[kept])


def test_lottery_ticket_with_rewinding():
    learn = small_learner()
    w = Weights(1)
    sp_cb = SparsifyCallback(50, 'weight', 'local', large_final, iterative, lth=True, rewind_epoch=1)
    text = run(learn, 10, [sp_cb, w])
    assert 'Saving Weights at epoch 1' in text and text.count('Resetting Weights to their epoch 1 values') == 3
    n = len(learn.dls.train)
    for now, ref in zip(w.after[2 * n], w.at):  # the step that first pruned (epoch 2's first): rewound to epoch 1
        kept = now != 0
        assert torch.equal(now[kept], ref[kept])


def test_rewinding_after_the_window_opens_is_refused():
    learn = small_learner()
    sp_cb = SparsifyCallback(50, 'weight', 'local', large_final, iterative, lth=True, rewind_epoch=3)
    with pytest.raises(ValueError, match='rewind_epoch=3 must be <= 2'): run(learn, 10, sp_cb)


def test_saving_tickets(tmp_path):
    learn = small_learner(path=tmp_path)
    sp_cb = SparsifyCallback(50, 'weight', 'local', large_final, iterative, lth=True, save_tickets=True)
    text = run(learn, 10, sp_cb)
    assert text.count('Saving Intermediate Ticket') == 3 and text.count('Saving Final Ticket') == 1
    names = sorted(p.name for p in (tmp_path / learn.model_dir).glob('ticket*'))
    assert names == ['ticket_final_sparsity_050.00.pth', 'ticket_sparsity_016.67.pth', 'ticket_sparsity_033.33.pth',
                     'ticket_sparsity_050.00.pth']
    assert conv_sparsity(learn.model) == pytest.approx(50, abs=0.01)
