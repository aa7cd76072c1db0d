"""fasterai's SparsifyCallback tutorial: its calls with only the import and the data changed, against the lines
fasterai documents (here measured from the weights)."""
import warnings
import pytest, torch, torch.nn as nn
from fastai.callback.core import Callback
from fasterai_sched import *
from conftest import small_learner, epoch_lines, conv_sparsity
import contextlib, io


def run(learn, n, cbs=None, how='fit_one_cycle'):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(): getattr(learn, how)(n, cbs=cbs)
    return out.getvalue()


class PerLayer(Callback):
    "Each conv's measured sparsity at each epoch's end."
    order = 100
    def before_fit(self): self.seen = []
    def after_epoch(self):
        self.seen.append([100 * float((m.weight == 0).float().mean()) for m in self.learn.model.modules()
                          if isinstance(m, nn.Conv2d)])


def test_tutorial_one_cycle_to_50_percent():
    learn = small_learner()
    run(learn, 5)                                      # the dense baseline cell
    learn = small_learner()
    sp_cb = SparsifyCallback(sparsity=50, granularity='weight', context='local', criteria=large_final, schedule=one_cycle)
    text = run(learn, 5, sp_cb)
    # fasterai's page prints 1.96, 20.07, 45.86, 49.74, 50.0: the targets; here the weights hold them
    assert epoch_lines(text) == pytest.approx([1.96, 20.07, 45.86, 49.74, 50.0], abs=0.011)
    assert 'Pruning of weight until a sparsity of 50%' in text and 'Final Sparsity: 50.00%' in text
    assert 'Sparsity Report:' in text and conv_sparsity(learn.model) == pytest.approx(50, abs=0.01)


def test_tutorial_a_sparsity_per_layer_as_a_list():
    learn = small_learner()
    sparsities = [0, 50, 0]                            # resnet18's 20 layers on the page; this net has 3
    sp_cb = SparsifyCallback(sparsity=sparsities, granularity='weight', context='local', criteria=large_final, schedule=cos)
    probe = PerLayer()
    run(learn, 5, [sp_cb, probe])
    # the page prints 4.77, 17.27, 32.73, 45.23, 50.0 for the pruned layers and 0 for the others
    assert [round(s[1], 2) for s in probe.seen] == pytest.approx([4.77, 17.27, 32.73, 45.23, 50.0], abs=0.01)
    assert all(s[0] == 0 and s[2] == 0 for s in probe.seen)
    with pytest.raises(ValueError, match='sparsity is a list of 2 percents'):
        run(small_learner(), 1, SparsifyCallback(sparsity=[0, 50], granularity='weight', context='local',
                                                  criteria=large_final, schedule=cos))
