"""fasterai's schedules API page (core/schedules): `Schedule`, the `sched_*` functions, `progress`, `plot`,
`available_schedules`, lists of schedules; with only the import changed, against what fasterai documents."""
import re
from functools import partial
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
from fasterai_sched import *
from fasterai_sched.schedules import window_target
from conftest import small_learner, fit_capture, epoch_lines, conv_sparsity
from fastai.callback.core import Callback


from test_fasterai_compat_schedules_tutorial import SEED_LINES


# ---- the API page ----
def test_schedule_class_and_windows():
    assert (one_shot.start_pct, iterative.start_pct, agp.start_pct) == (0.5, 0.2, 0.2)
    for s in (one_cycle, cos, lin, dsd): assert (s.start_pct, s.end_pct) == (0, 1)
    # progress (0 -> 1) at a fraction of training, as fasterai's Schedule.progress
    assert [one_shot.progress(p) for p in (0, 0.49, 0.5, 1)] == [0, 0, 1, 1]
    assert [iterative.progress(p) for p in (0.1, 0.2, 0.21, 0.5, 1)] == pytest.approx([0, 0, 1 / 3, 2 / 3, 1])
    assert agp.progress(0.3) == pytest.approx(1 - 0.875 ** 3)
    assert dsd.progress(0.5) == pytest.approx(1) and dsd.progress(1) == pytest.approx(0)
    assert one_cycle.progress(0.2) == pytest.approx(0.0392, abs=1e-4)  # 1.96 of 50, as the callback tutorial prints


def test_sched_functions_are_fasterais():
    assert sched_oneshot(0, 90, 0) == 90 and sched_oneshot(0, 90, 0.7) == 90
    assert [sched_iterative(0, 90, p) for p in (0, 0.3, 0.5, 1)] == [0, 30, 60, 90]
    assert sched_agp(0, 90, 0.125) == pytest.approx(29.70703125)
    assert sched_dsd(0, 50, 0.25) == pytest.approx(25) and sched_dsd(0, 50, 0.5) == pytest.approx(50)
    assert sched_onecycle(0, 50, 1) == 50


def test_partial_of_the_function_in_a_new_schedule():
    iterative = Schedule(partial(sched_iterative, n_steps=5), start_pct=0.2)
    assert [round(iterative.progress(p), 6) for p in (0.2, 0.3, 0.5, 0.8, 1)] == [0, 0.2, 0.4, 0.8, 1]
    learn = small_learner()
    got = epoch_lines(fit_capture(learn, 10, [SparsifyCallback(sparsity=90, schedule=iterative)]))
    assert got == pytest.approx(SEED_LINES['iterative5'], abs=0.011)


@pytest.mark.parametrize('s', [one_shot, iterative, agp, one_cycle, cos, lin, dsd], ids=lambda s: s.__name__)
def test_plot_each(s):
    ax = s.plot(50)
    ys = ax.get_lines()[0].get_ydata()
    assert ys[0] == 0 and ys[-1] == (0 if s is dsd else 50)
    plt.close(ax.figure)


def test_available_schedules():
    assert available_schedules() == ['one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd']
    assert schedules == ('one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd')


def test_schedules_still_plain_functions():
    assert one_shot(0, 90, 0) == 0 and one_shot(0, 90, 0.01) == 90  # f(start, end, pos) as before
    assert agp(0, 90, 0.125) == pytest.approx(29.70703125) and partial(iterative, n_steps=5)(0, 90, 0.3) == 36


def test_a_list_of_schedules_composes():
    "Consecutive windows, each rising over its share of the target: gradual to half, then linear to the end."
    sched = [Schedule(sched_agp, 0, 0.5, 0, 0.5), Schedule(lin.sched_func, 0.5, 1, 0.5, 1)]
    assert window_target(sched, 0, 80, 0.25) == pytest.approx(80 * sched_agp(0, 0.5, 0.5))
    assert window_target(sched, 0, 80, 0.75) == pytest.approx(60) and window_target(sched, 0, 80, 1) == 80
    learn = small_learner()
    got = epoch_lines(fit_capture(learn, 4, [SparsifyCallback(sparsity=80, schedule=sched)]))
    assert got == pytest.approx([80 * sched_agp(0, 0.5, 0.5), 40, 60, 80], abs=0.011)
    with pytest.raises(ValueError, match='follow each other'):
        SparsifyCallback(sparsity=80, schedule=[Schedule(sched_agp, 0, 0.4), Schedule(lin.sched_func, 0.5, 1)])


def test_one_schedule_two_callbacks_at_once_do_not_interfere():
    "No state in a schedule: two learners sharing `agp` in alternation print what each prints alone."
    alone = epoch_lines(fit_capture(small_learner(), 5, [SparsifyCallback(sparsity=60, schedule=agp)]))
    a, b = small_learner(), small_learner(seed=1)
    cb_a, cb_b = SparsifyCallback(sparsity=60, schedule=agp), SparsifyCallback(sparsity=30, schedule=agp)
    assert epoch_lines(fit_capture(a, 5, [cb_a])) == alone
    fit_capture(b, 3, [cb_b])
    assert epoch_lines(fit_capture(small_learner(), 5, [SparsifyCallback(sparsity=60, schedule=agp)])) == alone


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match='start_pct=0.6'): Schedule(sched_agp, 0.6, 0.5)
    with pytest.raises(ValueError, match='end_val=2'): Schedule(sched_agp, end_val=2)
    with pytest.raises(TypeError, match='sched_func'): Schedule(3)


def test_schedules_pickle():
    "learn.export pickles the callback with its schedule: the built-ins come back as themselves."
    import pickle
    assert pickle.loads(pickle.dumps(agp)) is agp and pickle.loads(pickle.dumps(one_shot)) is one_shot
    mine = Schedule(sched_agp, 0.1, 0.9)
    back = pickle.loads(pickle.dumps(mine))
    assert (back.start_pct, back.end_pct, back.__name__) == (0.1, 0.9, 'sched_agp') and back.progress(0.5) == mine.progress(0.5)
    five = pickle.loads(pickle.dumps(partial(iterative, n_steps=5)))
    assert five(0, 90, 0.3) == 36 and five.func is iterative
