"""Issue 13: RigL, drop-and-grow at a constant count, connectivity moving at update steps only."""
import json, math, os, subprocess, sys
from pathlib import Path
import random
import pytest, torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fasterai_sched import RigLCallback, allocate
from fasterai_sched.rigl import drop_fraction_at
from fasterai_sched.sparsifier import n_to_prune
from conftest import small_learner, fit_capture, epoch_lines, conv_sparsity
from issue6_helpers import fast_learner


@pytest.fixture(autouse=True)
def _same_batches():
    "fastai draws each loader's shuffling seed from Python's random module: fix it, so a test trains the same in any order."
    random.seed(0)


class Before(Callback):
    "Before RigL's before_step: the masks, weights and gradients it will see."
    order = 60
    def __init__(self, cb): self.cb, self.seen = cb, {}
    def before_step(self):
        sp = self.cb.sparsifier
        if not sp.masks: return
        step = self.epoch * self.n_iter + self.iter + 1
        self.seen[step] = {n: (sp.masks[n].clone(), m.weight.detach().clone(), m.weight.grad.detach().clone())
                           for n, m in sp.layers.items()}


class After(Callback):
    "After RigL's before_step (new masks in place, before the optimizer step) and after each step."
    order = 80
    def __init__(self, cb): self.cb, self.masks, self.grown, self.kept = cb, {}, [], []
    def before_step(self):
        sp = self.cb.sparsifier
        step = self.epoch * self.n_iter + self.iter + 1
        self.masks[step] = {n: m.clone() for n, m in sp.masks.items()}
        for n, r in sp.regrown.items() if sp.masks is not getattr(self, '_last', None) else ():
            w = sp.layers[n].weight
            state = [v for v in self.learn.opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape]
            self.grown.append((step, float(w[r].abs().max()), [float(v[r].abs().max()) for v in state]))
        self._last = sp.masks
    def after_step(self):
        self.kept.append({n: int((m.weight != 0).sum()) for n, m in self.cb.sparsifier.layers.items()})


def run_rigl(n_epoch=4, **kw):
    learn = small_learner()
    cb = RigLCallback(**{'sparsity': 80, 'delta': 2, **kw})
    before, after = Before(cb), After(cb)
    text = fit_capture(learn, n_epoch, [cb, before, after], lr=1e-2)
    return learn, cb, before, after, text


def test_exact_count_every_step_and_changes_only_at_update_steps():
    learn, cb, before, after, text = run_rigl(n_epoch=4, sparsity=80, delta=2, stop=0.75)
    sizes = {n: m.weight.numel() for n, m in cb.sparsifier.layers.items()}
    for kept in after.kept: assert kept == {n: s - n_to_prune(80, s) for n, s in sizes.items()}
    assert epoch_lines(text) == [80.0] * 4
    steps = sorted(after.masks)
    total = 4 * cb.n_iter_fit
    assert cb._stop_step == int(0.75 * total) == 9
    changed = [s for a, s in zip(steps, steps[1:]) if any(not torch.equal(after.masks[a][n], after.masks[s][n])
                                                          for n in sizes)]
    assert changed == [2, 4, 6, 8]  # every delta steps until stop, never elsewhere
    assert [s for s, _ in cb.updates] == [2, 4, 6, 8] and all(moved > 0 for _, moved in cb.updates)


def test_drop_lowest_magnitude_grow_largest_gradient():
    learn, cb, before, after, _ = run_rigl(n_epoch=3, sparsity=70, delta=3, drop_fraction=0.5, stop=1.)
    step = 3
    frac = drop_fraction_at(step, cb._stop_step, 0.5)
    for n, (mask, w, g) in before.seen[step].items():
        keep, new = mask.flatten(), after.masks[step][n].flatten()
        k = math.floor(frac * int(keep.sum()))
        assert k > 0
        mag = torch.where(keep, w.abs().flatten(), torch.tensor(math.inf))
        dropped = torch.zeros_like(keep); dropped[mag.argsort(stable=True)[:k]] = True
        kept = keep & ~dropped
        score = torch.where(kept, torch.tensor(-1.), g.abs().flatten())
        grown = torch.zeros_like(keep); grown[score.argsort(descending=True, stable=True)[:k]] = True
        assert torch.equal(new, kept | grown), n
        assert int(new.sum()) == int(keep.sum())


def test_grown_weights_start_at_zero_with_fresh_optimizer_state():
    _, cb, _, after, _ = run_rigl(n_epoch=3, sparsity=80, delta=2)
    assert after.grown
    for step, w, states in after.grown: assert w == 0 and states and all(s == 0 for s in states), step


def test_drop_fraction_decays_by_cosine():
    assert drop_fraction_at(0, 100) == pytest.approx(0.3)
    assert drop_fraction_at(50, 100) == pytest.approx(0.15)
    assert drop_fraction_at(100, 100) == 0 and drop_fraction_at(150, 100) == 0
    vals = [drop_fraction_at(s, 100, 0.5) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_rigl_with_erk_keeps_each_layers_allocation():
    learn = small_learner()
    targets = allocate(learn.model, 90, 'erk')
    cb = RigLCallback(targets, delta=1)
    text = fit_capture(learn, 2, [cb], lr=1e-2)
    assert 'until a sparsity of 90%' in text and epoch_lines(text) == [90.0, 90.0]
    for n, m in cb.sparsifier.layers.items():
        assert int((m.weight == 0).sum()) == n_to_prune(targets[n], m.weight.numel()), n
    assert len(cb.updates) == int(0.75 * 2 * cb.n_iter_fit) - 1  # steps 1..stop-1 (step 1 makes the masks first)
    import matplotlib; matplotlib.use('Agg')
    ax = cb.plot()
    assert ax.get_title() == 'RigL, drop-and-grow every 1 steps' and max(ax.get_lines()[0].get_ydata()) == 90


@pytest.mark.parametrize('kw, match', [(dict(delta=0), 'delta=0'), (dict(drop_fraction=0), 'drop_fraction=0'),
                                       (dict(stop=1.5), 'stop=1.5'), (dict(sparsity=101), 'sparsity=101'),
                                       (dict(delta=True), 'delta=True')])
def test_errors(kw, match):
    with pytest.raises(ValueError, match=match): RigLCallback(**{'sparsity': 80, **kw})


def test_resume_from_a_checkpoint(tmp_path):
    kw = dict(sparsity=80, delta=2, stop=1.)
    learn = fast_learner(path=tmp_path)
    full_cb = RigLCallback(**kw)
    full = fit_capture(learn, 4, [full_cb, SaveModelCallback(every_epoch=True)], lr=1e-2)
    k = 1
    resumed = fast_learner(seed=1, path=tmp_path)
    resumed.load(f'model_{k}')
    at_save = {n: (m.weight == 0).clone() for n, m in resumed.model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    cb = RigLCallback(**kw)
    after = After(cb)
    out = fit_capture(resumed, 4, [cb, after], start_epoch=k + 1, lr=1e-2)
    assert epoch_lines(out) == epoch_lines(full)[k + 1:] == [80.0, 80.0]
    # the masks at the resumed start are the checkpoint's zeros; updates happen at the uninterrupted run's steps
    first = min(after.masks)
    assert first % 2 == 1  # not an update step
    for n, z in at_save.items(): assert torch.equal(~after.masks[first][n], z), n
    assert [s for s, _ in cb.updates] == [s for s, _ in full_cb.updates if s > (k + 1) * cb.n_iter_fit]
    assert conv_sparsity(resumed.model) == pytest.approx(80, abs=0.005)


SCRIPT = Path(__file__).with_name('dist_rigl_script.py')


def test_identical_masks_on_every_rank(tmp_path):
    """Two CPU processes (gloo): RigL with DDP, and RigL, agp+LAMP and AC/DC+ERK with each rank's own gradients, where
    only the broadcast from rank 0 can make the masks agree."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '--log-dir', str(tmp_path / 'logs'), '--redirects', '3', str(SCRIPT), str(tmp_path)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    errs = '\n'.join(p.read_text()[-3000:] for p in (tmp_path / 'logs').rglob('stderr.log'))
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\n{errs}"
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for res in results:
        assert sorted(res) == ['acdc_erk', 'ddp', 'lamp', 'local']
        for case, r in res.items():
            assert r['changes'] >= 3 and r['masks_differ'] == 0 and r['counts_exact'], case
        assert res['ddp']['updates'] >= 3 and res['local']['updates'] >= 3
    # each rank's own gradients (and weights) would have picked other weights: the check can fail
    for case in ('local', 'lamp', 'acdc_erk'): assert any(r[case]['grads_differ'] for r in results), case


class FewGradients(Callback):
    "Before RigL's update: the gradient of layer '3' is zero except at `n` pruned positions."
    order = 60
    def __init__(self, cb, n): self.cb, self.n, self.where = cb, n, {}
    def before_step(self):
        sp = self.cb.sparsifier
        if not sp.masks: return
        w = sp.layers['3'].weight
        pruned = (~sp.masks['3']).flatten().nonzero().squeeze(1)[:self.n]
        keep_grad = torch.zeros(w.numel(), dtype=torch.bool); keep_grad[pruned] = True
        w.grad.view(-1)[~keep_grad & ~sp.masks['3'].flatten()] = 0
        self.where[self.epoch * self.n_iter + self.iter + 1] = keep_grad.view_as(w)


def test_grows_only_where_the_gradient_moves_the_weight():
    "With 5 pruned weights of a layer carrying a gradient, at most 5 move there, and the count stays exact."
    learn = small_learner()
    cb = RigLCallback(80, delta=2, stop=1.)
    few, after = FewGradients(cb, 5), After(cb)
    text = fit_capture(learn, 2, [cb, few, after], lr=1e-2)
    assert epoch_lines(text) == [80.0, 80.0]
    n = learn.model[3].weight.numel()
    for kept in after.kept: assert kept['3'] == n - n_to_prune(80, n)
    steps = [s for s, _ in cb.updates]
    assert steps == [2, 4]
    for s in steps:
        old, new = after.masks[s - 1]['3'], after.masks[s]['3']
        grown = new & ~old
        assert 0 < int(grown.sum()) <= 5 and bool(few.where[s][grown].all()), s
