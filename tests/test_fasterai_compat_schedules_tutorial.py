"""fasterai's schedules tutorial (the seed): its cells with only the import and the data changed, printing the
seed's lines, each true to the weights."""
import re
from functools import partial
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
from fasterai_sched import *
from fasterai_sched.schedules import window_target
from conftest import small_learner, fit_capture, epoch_lines, conv_sparsity
from fastai.callback.core import Callback


class Measure(Callback):
    "The weights' sparsity at each epoch's end, measured after everything else."
    order = 100
    def before_fit(self): self.seen = []
    def after_epoch(self): self.seen.append(conv_sparsity(self.learn.model))


# ---- the tutorial (the seed): its cells verbatim, 10 epochs ----
SEED_LINES = {'one_shot': [0, 0, 0, 0, 90, 90, 90, 90, 90, 90],
              'iterative': [0, 0, 30, 30, 60, 60, 60, 90, 90, 90],
              'agp': [0, 0, 29.71, 52.03, 68.03, 78.75, 85.25, 88.59, 89.82, 90.00],
              'iterative5': [0, 0, 18, 36, 36, 54, 72, 72, 90, 90]}


def _seed_cell(schedule):
    sp_cb=SparsifyCallback(sparsity=90, granularity='weight', context='local', criteria=large_final, schedule=schedule)
    return sp_cb


@pytest.mark.parametrize('name', list(SEED_LINES))
def test_tutorial_cells_print_the_seeds_lines_true_to_the_weights(name):
    global iterative
    schedule = {'one_shot': one_shot, 'iterative': iterative, 'agp': agp,
                'iterative5': partial(iterative, n_steps=5)}[name]
    learn, m = small_learner(), Measure()
    text = fit_capture(learn, 10, [_seed_cell(schedule), m])
    got = epoch_lines(text)
    assert got == pytest.approx(SEED_LINES[name], abs=0.011)
    assert got == pytest.approx(m.seen, abs=0.006)  # each line is what the weights hold
    assert 'Pruning of weight until a sparsity of 90%' in text and 'Final Sparsity: 90.00%' in text


def test_given_start_epoch_wins_over_the_window():
    learn = small_learner()
    got = epoch_lines(fit_capture(learn, 10, [SparsifyCallback(sparsity=90, schedule=one_shot, start_epoch=3)]))
    assert got == [0, 0, 0] + [90.] * 7
