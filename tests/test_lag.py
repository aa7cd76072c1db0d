"""Gradual means gradual: after every training step the weights hold the target within `max_lag` of the schedule's
span, for every schedule, and the epoch lines stay exact without a large catch-up at an epoch's last step."""
import pytest, torch
from fastai.callback.core import Callback
from conftest import small_learner, small_dls, fit_capture, epoch_lines, conv_sparsity
import fasterai_sched as fs
from fasterai_sched import SparsifyCallback

SCHEDULES = ['one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd']
N_EPOCH, START, END = 4, 1, 3


class AfterEveryStep(Callback):
    "After each training step (masks applied): the convolutions' sparsity measured from the weights, and the masks'."
    order = 100

    def before_fit(self): self.measured, self.masked = [], []

    def after_step(self):
        self.measured.append(conv_sparsity(self.learn.model))
        self.masked.append(next(cb for cb in self.learn.cbs if isinstance(cb, SparsifyCallback)).sparsifier.masked_sparsity())


def n_weights(learn): return sum(m.weight.numel() for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))


def run(schedule, sparsity=80, start_sparsity=0, **kw):
    learn = small_learner()
    learn.dls = small_dls(n=160, bs=20)  # 6 training steps per epoch
    cb = SparsifyCallback(sparsity=sparsity, start_sparsity=start_sparsity, schedule=getattr(fs, schedule),
                          start_epoch=START, end_epoch=END, **kw)
    probe = AfterEveryStep()
    text = fit_capture(learn, N_EPOCH, [cb, probe])
    return learn, cb, probe, epoch_lines(text)


@pytest.mark.parametrize('schedule', SCHEDULES)
@pytest.mark.parametrize('max_lag', [0.02, 0.1])
def test_weights_hold_the_target_within_max_lag_after_every_step(schedule, max_lag):
    learn, cb, probe, lines = run(schedule, start_sparsity=10, max_lag=max_lag)
    measured, n_iter = probe.measured, len(learn.dls.train)
    assert n_iter == 6 and len(measured) == N_EPOCH * n_iter
    bound = max_lag * (80 - 10) + 100 * 3 / n_weights(learn)  # + each of the 3 layers' count rounding down
    targets = [cb._target(step) for step in range(1, len(measured) + 1)]
    assert max(abs(m - t) for m, t in zip(probe.masked, targets)) <= bound  # the masks follow the target
    # the weights hold what the masks zero; where the target falls (dsd's second half) regrown weights restart at
    # zero and leave it as they train, so there the weights may hold more zeros than the masks
    assert all(m >= z - 1e-9 for m, z in zip(measured, probe.masked))
    peak = len(targets) if schedule != 'dsd' else targets.index(max(targets)) + 1  # the steps before any fall
    assert max(abs(m - t) for m, t in zip(measured[:peak], targets[:peak])) <= bound, schedule
    per_layer_floor = 100 * 3 / n_weights(learn)
    # the epoch lines are exact: each equals the target at the epoch's end, and the weights hold it
    for e, line in enumerate(lines):
        assert line == pytest.approx(measured[(e + 1) * n_iter - 1], abs=0.005)
        if (e + 1) * n_iter <= peak:  # after dsd's peak the weights hold regrown zeros too (checked above)
            assert line == pytest.approx(cb._target((e + 1) * n_iter), abs=per_layer_floor + 0.005)


@pytest.mark.parametrize('schedule', ['agp', 'cos', 'lin', 'one_cycle'])
def test_no_large_catch_up_at_an_epochs_last_step(schedule):
    "The last step of an epoch moves the masks by at most max_lag of the span: they were following already."
    learn, cb, probe, _ = run(schedule, max_lag=0.02)
    measured, n_iter = probe.measured, len(learn.dls.train)
    for e in range(N_EPOCH):
        last = (e + 1) * n_iter - 1
        if last == 0: continue
        move = abs(measured[last] - measured[last - 1])
        target_move = abs(cb._target(last + 1) - cb._target(last))
        assert move <= target_move + 0.02 * 80 + 0.01, (schedule, e, move)


def test_the_bound_holds_with_many_steps_per_epoch_too():
    """Large data sets alike: 48 steps per epoch, agp, the default max_lag; the masks lead the target as well as
    trail it, so a recompute covers twice max_lag of the span and they take about half as many as steps of max_lag."""
    from unittest import mock
    import fasterai_sched.sparsifier as S
    from fasterai_sched.callback import MAX_LAG
    learn = small_learner()
    learn.dls = small_dls(n=1200, bs=20)
    cb, probe = SparsifyCallback(sparsity=90, schedule=fs.agp, start_epoch=0), AfterEveryStep()
    calls, prune = [], S.Sparsifier.prune
    def counting(self, *a, **k): calls.append(1); return prune(self, *a, **k)
    with mock.patch.object(S.Sparsifier, 'prune', counting): fit_capture(learn, 2, [cb, probe])
    gaps = [m - cb._target(s) for s, m in enumerate(probe.measured, 1)]
    floor = 100 * 3 / n_weights(learn)  # each layer's count rounds down
    assert max(abs(g) for g in gaps) <= MAX_LAG * 90 + floor
    assert max(gaps) > MAX_LAG * 90 / 2 and min(gaps) < -MAX_LAG * 90 / 2  # ahead, then behind
    assert len(calls) <= round(0.6 / MAX_LAG)  # trailing alone takes 1 / MAX_LAG (more where one step moves further)


def test_max_lag_none_changes_masks_only_at_epoch_ends_and_each_frequency_steps():
    "The policy before max_lag: no band; masks at each epoch's last step and every `frequency` steps."
    learn, cb, probe, lines = run('lin', max_lag=None, frequency=4)
    n_iter = len(learn.dls.train)
    changed = [s for s in range(1, len(probe.masked)) if probe.masked[s] != probe.masked[s - 1]]
    assert changed[0] == n_iter  # pruning starts with epoch 1's first step
    assert all((s + 1) % n_iter == 0 or (s + 1) % 4 == 0 for s in changed[1:]), changed
    for e, line in enumerate(lines): assert line == pytest.approx(probe.measured[(e + 1) * n_iter - 1], abs=0.005)


@pytest.mark.parametrize('bad', [-0.1, 1.5, float('nan'), True, '0.02'])
def test_bad_max_lag(bad):
    with pytest.raises(ValueError, match=r"max_lag=.* must be a share of the schedule's span in \[0, 1\]"):
        SparsifyCallback(sparsity=90, max_lag=bad)


def test_per_layer_targets_each_stay_within_max_lag_of_their_span():
    "A dict of per-layer targets (an allocation): every layer's masks within max_lag of its own span, after every step."
    learn = small_learner()
    learn.dls = small_dls(n=160, bs=20)  # 6 training steps per epoch
    targets = {'0': 50., '3': 80., '6': 95.}
    cb = SparsifyCallback(sparsity=targets, schedule=fs.agp, start_epoch=START, end_epoch=END, max_lag=0.1)
    per_layer = []

    class PerLayer(Callback):
        order = 100
        def after_step(self):
            per_layer.append({n: 100 * float((learn.model[int(n)].weight == 0).float().mean()) for n in targets})

    lines = epoch_lines(fit_capture(learn, N_EPOCH, [cb, PerLayer()]))
    assert len(per_layer) == N_EPOCH * 6 and len(lines) == N_EPOCH
    ahead = behind = False
    for step, got in enumerate(per_layer, 1):
        want = cb._target(step)
        for n, end in targets.items():
            size = learn.model[int(n)].weight.numel()
            assert abs(got[n] - want[n]) <= 0.1 * end + 100 / size, (step, n, got[n], want[n])
            ahead |= got[n] > want[n] + 100 / size; behind |= got[n] < want[n] - 100 / size
    assert ahead and behind
    assert per_layer[-1] == pytest.approx(targets, abs=0.01)  # the epoch lines' exact end


def test_criteria_against_the_previous_weights_see_pruned_weights_at_zero():
    """updating_movement compares with the weights at the last recompute: those must hold the pruned weights at zero,
    or pruned weights score high and come back at the next recompute (on a rising schedule nothing should regrow)."""
    from unittest import mock
    import fasterai_sched.sparsifier as S
    learn = small_learner()
    learn.dls = small_dls(n=160, bs=20)
    cb = SparsifyCallback(sparsity=80, schedule=fs.lin, start_epoch=0, criteria=fs.updating_movement)
    seen, prune = [], S.Sparsifier.prune
    def spy(self, *a, **k):
        out = prune(self, *a, **k)
        left = sum(int((self.reference[n][~self.masks[n].expand_as(self.reference[n])] != 0).sum()) for n in self.layers)
        seen.append((left, sum(int(r.sum()) for r in self.regrown.values())))
        return out
    with mock.patch.object(S.Sparsifier, 'prune', spy): fit_capture(learn, 3, [cb])
    assert len(seen) > 5 and all(left == 0 and back == 0 for left, back in seen), seen


def test_a_target_falling_to_zero_does_not_rescan_every_step():
    """dsd ends at 0: once the masks are released within the band, the last steps neither prune nor look ahead again
    (each look ahead is followed by new masks; it used to run at every step of that tail, to no effect)."""
    from unittest import mock
    import fasterai_sched.sparsifier as S
    learn = small_learner()
    learn.dls = small_dls(n=2400, bs=20)  # 90 steps an epoch
    cb = SparsifyCallback(sparsity=80, schedule=fs.dsd, start_epoch=0)
    leads, prunes, lead, prune = [], [], SparsifyCallback._lead, S.Sparsifier.prune
    def counting_lead(self, *a, **k): leads.append(1); return lead(self, *a, **k)
    def counting_prune(self, *a, **k): prunes.append(1); return prune(self, *a, **k)
    with mock.patch.object(SparsifyCallback, '_lead', counting_lead), mock.patch.object(S.Sparsifier, 'prune', counting_prune):
        fit_capture(learn, 2, [cb])
    assert len(leads) == len(prunes) <= 30
