"""Issue 13: AC/DC, alternating compressed and decompressed phases, as a schedule function like the others."""
from functools import partial
import random
import pytest, torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fasterai_sched import SparsifyCallback, acdc
from fasterai_sched.schedules import SCHEDULES
from conftest import fit_capture, epoch_lines, conv_sparsity, small_learner
from issue6_helpers import fast_learner


@pytest.fixture(autouse=True)
def _same_batches():
    "fastai draws each loader's shuffling seed from Python's random module: fix it, so a test trains the same in any order."
    random.seed(0)


def test_acdc_phases():
    f = partial(acdc, n_cycles=2, warmup=0.2, final=0.2)
    # warm-up dense to 0.2, then C D C D over (0.2, 0.8] in phases of 0.15, then compressed to the end; a phase holds its right end
    want = {0: 0, .1: 0, .2: 0, .21: 90, .35: 90, .36: 0, .5: 0, .51: 90, .64: 90, .66: 0, .8: 0, .81: 90, .95: 90, 1: 90}
    for pos, v in want.items(): assert f(0, 90, pos) == v, pos
    assert acdc(10, 90, 0) == 10 and acdc(10, 90, 1) == 90 and SCHEDULES['acdc'] is acdc
    # the default: 3 cycles, a tenth of warm-up, the last fifth compressed
    values = [acdc(0, 80, i / 100) for i in range(101)]
    changes = [i for i in range(1, 101) if values[i] != values[i - 1]]
    assert len(changes) == 7 and values[-20:] == [80] * 20 and values[:11] == [0] * 11 and values[80] == 0


@pytest.mark.parametrize('kw, match', [(dict(n_cycles=0), 'n_cycles=0'), (dict(warmup=1), 'warmup=1'),
                                       (dict(final=-.1), 'final=-0.1'), (dict(warmup=.5, final=.5), 'leave room')])
def test_acdc_errors(kw, match):
    with pytest.raises(ValueError, match=match): acdc(0, 90, .5, **kw)


class Phases(Callback):
    "Record after every step the share the masks hold at zero and the zeros of the pruned convolutions."
    order = 80
    def __init__(self, cb): self.cb = cb
    def before_fit(self): self.masked, self.zeros = [], []
    def after_step(self):
        self.masked.append(self.cb.sparsifier.masked_sparsity())
        self.zeros.append(conv_sparsity(self.learn.model))


def test_acdc_in_the_callback_alternates_with_exact_counts():
    learn = small_learner()
    sched = partial(acdc, n_cycles=2, warmup=.25, final=.25)  # 8 epochs: D D | C D C D | C C
    cb = SparsifyCallback(sparsity=80, schedule=sched)
    rec = Phases(cb)
    lines = epoch_lines(fit_capture(learn, 8, [cb, rec], lr=1e-2))
    phases = [0, 0, 80, 0, 80, 0, 80, 80]
    per_epoch = len(rec.masked) // 8
    for e, want in enumerate(phases):
        masked = rec.masked[e * per_epoch:(e + 1) * per_epoch]
        assert masked == pytest.approx([want] * per_epoch, abs=0.005), e  # the masks follow the phase at every step
        if want: assert lines[e] == 80.0 and rec.zeros[(e + 1) * per_epoch - 1] == pytest.approx(80, abs=0.005), e  # exact in a compressed phase
        # decompressed after a compressed phase: no weight is held at zero any more; those that came back start at
        # zero, and how many leave it depends on their gradients (a dead unit's stay), so only the bound is certain
        elif e > 2: assert lines[e] <= 80 and rec.zeros[(e + 1) * per_epoch - 1] <= rec.zeros[e * per_epoch], e
    assert conv_sparsity(learn.model) == pytest.approx(80, abs=0.005)


class WatchRegrowth(Callback):
    "At each step after a mask change that brought weights back: their values and optimizer state, before the update."
    order = 80
    def __init__(self, cb): self.cb, self.seen = cb, []
    def before_step(self):
        sp = self.cb.sparsifier
        if sp is None or sp.regrown is getattr(self, '_last', None) or not sp.regrown: return
        self._last = sp.regrown
        w, r = sp.layers['3'].weight, sp.regrown['3']
        state = self.learn.opt.state[w]
        self.seen.append((float(w[r].abs().max()), [float(v[r].abs().max()) for v in state.values()
                                                    if torch.is_tensor(v) and v.shape == w.shape]))


def test_acdc_decompressed_weights_restart_from_zero_with_fresh_optimizer_state():
    learn = small_learner()
    cb = SparsifyCallback(sparsity=80, schedule=partial(acdc, n_cycles=1, warmup=0.01, final=.4))
    watch = WatchRegrowth(cb)
    fit_capture(learn, 3, [cb, watch], lr=1e-2)
    assert watch.seen  # the decompressed phase brought weights back
    for w, states in watch.seen: assert w == 0 and states and all(s == 0 for s in states)


def test_acdc_resumes_from_a_checkpoint(tmp_path):
    sched = partial(acdc, n_cycles=2, warmup=.2, final=.2)
    kw = dict(sparsity=75, schedule=sched, start_epoch=0)
    full_learn = fast_learner(path=tmp_path)
    full = fit_capture(full_learn, 6, [SparsifyCallback(**kw), SaveModelCallback(every_epoch=True)])
    lines = epoch_lines(full)
    assert 0 in lines and 75 in lines
    for k in (1, 2):  # resume after a compressed epoch and after a decompressed one
        learn = fast_learner(seed=1, path=tmp_path)
        learn.load(f'model_{k}')
        out = fit_capture(learn, 6, [SparsifyCallback(**kw)], start_epoch=k + 1)
        got = epoch_lines(out)
        assert len(got) == len(lines) - k - 1, k
        for a, b in zip(got, lines[k + 1:]):
            # compressed epochs match exactly; a decompressed one holds only the weights still at their restart zero
            assert a == b if b == 75 else (a < 1 and b < 1), (k, got, lines)
        assert conv_sparsity(learn.model) == pytest.approx(75, abs=0.005)


def test_acdc_is_a_schedule_over_the_whole_fit_and_pickles():
    import pickle
    from fasterai_sched.schedules import Schedule, schedule_window, available_schedules
    assert isinstance(acdc, Schedule) and schedule_window(acdc) == (0., 1.)
    assert pickle.loads(pickle.dumps(acdc)) is acdc
    assert 'acdc' in SCHEDULES and 'acdc' not in available_schedules()  # fasterai's list stays fasterai's
