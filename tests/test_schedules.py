"""Schedules: end points, shapes, partial(), user functions, the printed agp value and the comparison plot."""
import math, subprocess, sys
from functools import partial
import pytest
from hypothesis import given, settings, strategies as st
from fastai.callback.schedule import sched_cos, sched_lin
from fasterai_sched import one_shot, iterative, agp, one_cycle, cos, lin, dsd, plot_schedules
from fasterai_sched.schedules import SCHEDULES

RISING = [one_shot, iterative, agp, one_cycle, cos, lin, partial(iterative, n_steps=5)]
pct = st.floats(0, 100)


def test_import_star_agp_prints_seed_value():
    out = subprocess.run([sys.executable, '-c', 'from fasterai_sched import *; print(agp(0, 90, 0.125))'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == '29.70703125\n'


@pytest.mark.parametrize('f', RISING, ids=lambda f: getattr(f, '__name__', 'iterative5'))
@pytest.mark.parametrize('start,end', [(0, 90), (0, 100), (20, 80), (50, 50), (90, 10), (0.5, 99.5)])
def test_ends(f, start, end):
    assert f(start, end, 0) == start and f(start, end, 1) == end


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(RISING), pct, pct)
def test_ends_exact_for_any_percent(f, start, end):
    "Exactly `start` at pos=0 and `end` at pos=1: a target of 89.99999999999999 instead of 90 would prune a unit less."
    assert f(start, end, 0) == start and f(start, end, 1) == end


@settings(max_examples=60, deadline=None)
@given(pct, pct)
def test_dsd_ends_and_peak_exact(start, end):
    assert dsd(start, end, 0) == start and dsd(start, end, 0.5) == end and dsd(start, end, 1) == start


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(RISING + [dsd]), pct, pct, st.floats(0, 1))
def test_values_stay_between_start_and_end(f, start, end, pos):
    v = f(start, end, pos)
    assert min(start, end) - 1e-9 <= v <= max(start, end) + 1e-9


@pytest.mark.parametrize('f', [agp, one_cycle, cos, lin, iterative], ids=lambda f: f.__name__)
def test_rising_is_monotone(f):
    vals = [f(0, 90, i / 200) for i in range(201)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[0] == 0 and vals[-1] == 90


def test_one_shot():
    assert [one_shot(0, 90, p) for p in (0, 1e-9, 0.3, 1)] == [0, 90, 90, 90]


def test_iterative_default_three_steps():
    assert [iterative(0, 90, p) for p in (0, 0.1, 1 / 3, 0.34, 0.6, 2 / 3, 0.7, 1)] == [0, 30, 30, 60, 60, 60, 90, 90]


def test_partial_iterative_five_steps():
    it5 = partial(iterative, n_steps=5)
    assert [it5(0, 90, p) for p in (0, 0.01, 0.2, 0.21, 0.4, 0.41, 0.6, 0.8, 0.81, 1)] == \
           [0, 18, 18, 36, 36, 54, 54, 72, 90, 90]
    # a boundary hit with float error (3 * 0.2 = 0.6000000000000001) does not take the next step early
    assert it5(0, 90, 3 * 0.2) == 54
    assert len({it5(0, 90, i / 100) for i in range(101)}) == 6  # 0 and five steps


def test_iterative_rejects_bad_n_steps():
    for bad in (0, -1, 2.5, '3'):
        with pytest.raises(ValueError, match='n_steps'): iterative(0, 90, 0.5, n_steps=bad)


def test_agp_is_cubic():
    for p in (0, 0.125, 0.25, 0.5, 0.9, 1):
        assert agp(0, 90, p) == pytest.approx(90 + (0 - 90) * (1 - p) ** 3, abs=1e-12)
    assert agp(0, 90, 0.125) == 29.70703125
    # the seed's epoch lines for agp, start_epoch=2 of 10: targets at the end of epochs 2..9
    assert [round(agp(0, 90, (e - 1) / 8), 2) for e in range(2, 10)] == [29.71, 52.03, 68.03, 78.75, 85.25, 88.59,
                                                                          89.82, 90.0]


def test_one_cycle_is_fasterais_logistic():
    "fasterai's curve (1 + e^(β-α)) / (1 + e^(β-α·pos)) of the span for pos > 0 (changed from a rescaled logistic in"
    " issue 10, so that fasterai's printed lines come out the same); exactly `start` at pos=0 and `end` at pos=1."
    s = lambda p: (1 + math.exp(6 - 14)) / (1 + math.exp(6 - 14 * p))
    for p in (0.1, 0.3, 0.43, 0.7):
        assert one_cycle(0, 90, p) == pytest.approx(90 * s(p), rel=1e-12)
    assert one_cycle(0, 90, 0) == 0 and one_cycle(0, 90, 1) == 90
    # fasterai's sparsify_callback tutorial: one_cycle to 50% over 5 epochs prints 1.96, 20.07, 45.86, 49.74, 50.0
    assert [round(one_cycle(0, 50, e / 5), 2) for e in range(1, 6)] == [1.96, 20.07, 45.86, 49.74, 50.0]
    assert one_cycle(0, 90, 0.2, α=20, β=4) != one_cycle(0, 90, 0.2)


def test_cos_and_lin_are_fastais():
    for p in (0.1, 0.25, 0.5, 0.8):
        assert cos(0, 90, p) == pytest.approx(float(sched_cos(0, 90, p)), rel=1e-12)
        assert lin(10, 90, p) == pytest.approx(float(sched_lin(10, 90, p)), rel=1e-12)
    assert lin(0, 90, 0.5) == 45 and cos(0, 90, 0.5) == pytest.approx(45)


def test_dsd_rises_then_falls():
    assert dsd(0, 90, 0.25) == pytest.approx(45) and dsd(0, 90, 0.75) == pytest.approx(45)
    assert dsd(0, 90, 0.5) == 90 and dsd(0, 90, 1) == 0
    vals = [dsd(0, 90, i / 100) for i in range(101)]
    assert max(vals) == 90 and vals.index(90) == 50


def test_user_schedule_of_the_same_shape_is_plotted():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    def square(start, end, pos): return start + (end - start) * pos ** 2
    ax = plot_schedules([square, partial(one_cycle, α=20)], sparsity=80, start_sparsity=10, n_epoch=4, n_points=8)
    (l1, l2) = ax.get_lines()
    assert l1.get_label() == 'square' and l2.get_label() == 'one_cycle(α=20)'
    assert list(l1.get_xdata()) == [i / 2 for i in range(9)]
    assert list(l1.get_ydata()) == [10 + 70 * (i / 8) ** 2 for i in range(9)]
    plt.close(ax.figure)


def test_schedules_registry():
    # issue 13 registers acdc after the seven
    assert list(SCHEDULES) == ['one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd', 'acdc']


def test_plot_schedules_draws_all_seven(tmp_path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fs = [one_shot, partial(iterative, n_steps=5), agp, one_cycle, cos, lin, dsd]
    ax = plot_schedules(fs, sparsity=90, start_epoch=2, n_epoch=10)
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == ['one_shot', 'iterative(n_steps=5)', 'agp', 'one_cycle', 'cos', 'lin', 'dsd']
    for f, l in zip(fs, lines):
        xs, ys = l.get_xdata(), l.get_ydata()
        assert xs[0] == 0 and xs[-1] == 10
        assert all(y == 0 for x, y in zip(xs, ys) if x <= 2)  # flat before the window opens
        assert ys[-1] == (0 if f is dsd else 90)
    path = tmp_path / 'schedules.png'
    ax.figure.savefig(path)
    plt.close(ax.figure)
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000


def test_plot_one_schedule_on_given_axes():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    assert plot_schedules(agp, ax=ax) is ax and len(ax.get_lines()) == 1
    with pytest.raises(ValueError, match='start_epoch'): plot_schedules(agp, start_epoch=10, n_epoch=10)
    plt.close(fig)


@pytest.mark.parametrize('window', [dict(), dict(start_epoch=0), dict(start_epoch=1, end_epoch=3)])
def test_a_schedules_end_val_holds_whether_epochs_are_given_or_not(window):
    "Schedule(..., end_val=0.5) prunes to half the target: alone, in a list, with or without the callback's epochs."
    import contextlib, io, torch.nn as nn
    from fasterai_sched import Schedule, SparsifyCallback
    from issue6_helpers import fast_learner
    half = Schedule(sched_lin, start_pct=0.5, end_pct=1, end_val=0.5)
    for schedule in (half, [half]):
        learn = fast_learner()
        cb = SparsifyCallback(sparsity=80, schedule=schedule, verbose=False, **window)
        with learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(io.StringIO()): learn.fit(4, 1e-3, cbs=cb)
        convs = [m.weight for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
        assert cb.history[-1]['target'] == pytest.approx(40)
        assert 100 * sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs) == pytest.approx(40, abs=1)
