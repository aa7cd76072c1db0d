"""Issue 3, SparsifyCallback: the seed's tutorial on real fastai Learners over small in-memory data."""
import contextlib, io, math, re
from fractions import Fraction
from functools import partial
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest, torch, torch.nn as nn
from fastai.callback.core import Callback, CancelStepException
from fastai.callback.fp16 import MixedPrecision
from fastai.optimizer import SGD, Adam, OptimWrapper
from fastai.torch_core import params
from fastai.vision.all import vision_learner, resnet18, CrossEntropyLossFlat
import fasterai_sched as fs
from fasterai_sched import SparsifyCallback, sparsity_report
from conftest import small_learner, small_dls, small_net, even_net, epoch_lines, conv_sparsity, cuda

SCHEDULES = [fs.one_shot, fs.iterative, fs.agp, fs.one_cycle, fs.cos, fs.lin, fs.dsd]
RULE = '-' * 80
ROUND = 0.0051  # a printed line is the measured percent to 2 decimals: half a unit, and float noise


# ---- helpers ----
def tens_net():
    "Two convolutions of 270 and 1,800 weights: 30, 60 and 90% of each are whole numbers of weights."
    return nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                         nn.Conv2d(10, 20, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 2))


def learner(model_fn=small_net, seed=0, c=3, device='cpu', **kw):
    "A small Learner whose data loaders run in this process (forking a worker per epoch would dominate the time)."
    torch.manual_seed(seed)
    learn = small_learner(seed=seed, model=model_fn(), c=c, device=device, **kw)
    for dl in learn.dls.loaders: dl.fake_l.num_workers = 0
    return learn


def run(learn, n, cbs, how='fit', lr=1e-3, **kw):
    "Train with `learn.fit`, `fit_one_cycle` or `fine_tune`, without progress bar or recorder rows; return what was printed."
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(), learn.no_logging():
        getattr(learn, how)(n, lr, cbs=cbs, **kw)
    return out.getvalue()


def convs(model, layer_type=nn.Conv2d):
    return {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}


def conv_weights(model):
    return {n: m.weight.detach().clone() for n, m in convs(model).items()}


def all_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "weights changed before the error"


def local_pct(target, sizes):
    "Measured percent of a local, per-weight target: floor(target% of each layer), summed (the contract's exact counts)."
    return 100 * sum(math.floor(Fraction(target) * n / 100) for n in sizes) / sum(sizes)


def expected_epoch_lines(schedule, sparsity, n_epoch, sizes, start_epoch=0, end_epoch=None, start_sparsity=0):
    "The contract's epoch lines: the target at p = (epoch+1)/n_epoch, measured as exact counts."
    end_epoch = end_epoch or n_epoch
    out = []
    for e in range(n_epoch):
        pos = min(1, max(0, (e + 1 - start_epoch) / (end_epoch - start_epoch)))
        out.append(local_pct(schedule(start_sparsity, sparsity, pos) if pos > 0 else start_sparsity, sizes))
    return out


def overall_line(text):
    "The (zeros, percent) of the report's Overall line in printed text."
    m = re.search(r"^Overall\s+all\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)%$", text, re.M)
    assert m, f"no Overall line in:\n{text}"
    return int(m[2].replace(',', '')), float(m[3])


class Probe(Callback):
    "Measures the conv weights after every other callback: after each training step and at each epoch's end."
    order = 100
    def before_fit(self): self.steps, self.epochs = [], []
    def after_batch(self):
        if self.training: self.steps.append(conv_sparsity(self.learn.model))
    def after_epoch(self): self.epochs.append(conv_sparsity(self.learn.model))


# ---- the seed's epoch lines ----
SEED_CASES = {
    'agp': (fs.agp, 2, [0, 0, 29.71, 52.03, 68.03, 78.75, 85.25, 88.59, 89.82, 90.00]),
    'iterative': (fs.iterative, 2, [0, 0, 30, 30, 60, 60, 60, 90, 90, 90]),
    'iterative5': (partial(fs.iterative, n_steps=5), 2, [0, 0, 18, 36, 36, 54, 72, 72, 90, 90]),
    'one_shot': (fs.one_shot, 4, [0, 0, 0, 0, 90, 90, 90, 90, 90, 90]),
}


@pytest.mark.parametrize('case', list(SEED_CASES))
def test_seed_epoch_lines_are_the_weights_sparsity(case):
    schedule, start, want = SEED_CASES[case]
    learn, probe = learner(), Probe()
    cb = SparsifyCallback(sparsity=90, granularity='weight', context='local', criteria=fs.large_final,
                          schedule=schedule, start_epoch=start)
    text = run(learn, 10, [cb, probe])
    got = epoch_lines(text)
    assert len(got) == 10
    assert got == pytest.approx(want, abs=0.011)
    assert got == pytest.approx(probe.epochs, abs=ROUND)  # the line is the weights, rounded to 2 decimals
    assert 'Final Sparsity: 90.00%' in text


def test_window_opens_with_the_first_step_of_start_epoch():
    # 6 epochs of 3 steps: fastai's float pct_train, summed step by step, passes 2/6 one step early
    learn, probe = learner(tens_net), Probe()
    cb = SparsifyCallback(sparsity=90, schedule=fs.one_shot, start_epoch=2)
    run(learn, 6, [cb, probe])
    n_iter = len(learn.dls.train)
    assert n_iter == 3
    assert probe.steps == [0.] * 2 * n_iter + [90.] * 4 * n_iter
    assert [h['target'] for h in cb.history] == [0.] * 2 * n_iter + [90.] * 4 * n_iter


def test_start_sparsity_and_end_epoch_shape_the_window():
    learn, probe = learner(even_net, c=8), Probe()
    cb = SparsifyCallback(sparsity=75, schedule=fs.lin, start_sparsity=25, start_epoch=1, end_epoch=3)
    got = epoch_lines(run(learn, 5, [cb, probe]))
    want = expected_epoch_lines(fs.lin, 75, 5, [576, 576], start_epoch=1, end_epoch=3, start_sparsity=25)
    assert want == [25, 50, 75, 75, 75]
    assert got == pytest.approx(want, abs=ROUND) and probe.epochs == pytest.approx(want, abs=1e-9)


# ---- every schedule, both contexts, weight and filter ----
@pytest.mark.parametrize('granularity', ['weight', 'filter'])
@pytest.mark.parametrize('context', ['local', 'global'])
@pytest.mark.parametrize('schedule', SCHEDULES, ids=lambda f: f.__name__)
def test_every_schedule_ends_at_its_target(schedule, context, granularity):
    # even_net: two layers of 8 filters of 72 weights each, so 75% of units is 75% of weights exactly
    learn, probe = learner(even_net, c=8), Probe()
    cb = SparsifyCallback(sparsity=75, granularity=granularity, context=context, schedule=schedule)
    text = run(learn, 2, [cb, probe])
    final = 0. if schedule is fs.dsd else 75.
    assert f"Final Sparsity: {final:.2f}%" in text
    assert overall_line(text) == (round(1152 * final / 100), final)
    assert conv_sparsity(learn.model) == final
    assert sparsity_report(learn.model, verbose=False)[-1].sparsity == final
    if schedule is fs.dsd: assert max(probe.steps) > 0  # dense again after being sparse, not dense throughout
    if granularity == 'filter':  # whole filters are zero, not scattered weights
        for m in convs(learn.model).values():
            zero_filters = (m.weight.flatten(1) == 0).all(1)
            assert int(zero_filters.sum()) * m.weight[0].numel() == int((m.weight == 0).sum())


# ---- what is printed ----
def _report_lines(rows):
    # the percent right-aligned under the header
    line = lambda n, t, p, z, s: f"{n:<30} {t:<15} {p:<10,} {z:<10,} {s:>9.2f}%"
    head = f"{'Layer':<30} {'Type':<15} {'Params':<10} {'Zeros':<10} Sparsity"
    return ['Sparsity Report:', RULE, head, RULE, *[line(*r) for r in rows[:-1]], RULE, line(*rows[-1])]


@pytest.mark.parametrize('flags, saving', [
    (dict(), None),
    (dict(lth=True), 0),
    (dict(reset_end=True, rewind_epoch=1), 1),
], ids=['plain', 'lth', 'reset_end'])
def test_printed_lines_exactly(flags, saving):
    learn = learner(tens_net)
    cb = SparsifyCallback(sparsity=90, granularity='weight', context='local', criteria=fs.large_final,
                          schedule=fs.one_shot, start_epoch=1, **flags)
    lines = run(learn, 3, [cb]).splitlines()
    want = ['Pruning of weight until a sparsity of 90%',
            'Sparsity at the end of epoch 0: 0.00%',
            'Sparsity at the end of epoch 1: 90.00%',
            'Sparsity at the end of epoch 2: 90.00%',
            'Final Sparsity: 90.00%',
            *_report_lines([('0', 'Conv2d', 270, 243, 90.), ('3', 'Conv2d', 1800, 1620, 90.),
                            ('Overall', 'all', 2070, 1863, 90.)])]
    if flags.get('lth'):  # fasterai's line at each rewind (issue 10), printed when the masks change in epoch 1
        want.insert(2, 'Resetting Weights to their epoch 0 values')
    if saving is not None: want.insert(1 + saving, f'Saving Weights at epoch {saving}')
    assert lines == want
    # weights are copied only when a rewind needs them
    assert bool(cb.sparsifier.rewind_weights) == (saving is not None)


def test_verbose_false_prints_nothing():
    learn = learner(tens_net)
    cb = SparsifyCallback(sparsity=90, schedule=fs.agp, lth=True, verbose=False)
    assert run(learn, 2, [cb]) == ''
    assert conv_sparsity(learn.model) == 90.


def test_sparsity_report_after_training_prints_the_callbacks_table():
    learn = learner()  # uneven layers: the table's rows differ from each other
    cb = SparsifyCallback(sparsity=90, schedule=fs.agp, context='global')
    text = run(learn, 2, [cb])
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rows = sparsity_report(learn.model)
    report = out.getvalue()
    assert report.startswith('Sparsity Report:') and text.endswith(report)
    assert text[:-len(report)].splitlines()[-1] == f"Final Sparsity: {rows[-1].sparsity:.2f}%"
    assert len({r.sparsity for r in rows[:-1]}) > 1  # global: layers end at different sparsities


# ---- pruned weights stay zero ----
OPTIMIZERS = {
    'sgd_momentum': partial(SGD, mom=0.9),
    'adam_l2': partial(Adam, decouple_wd=False),
    'adamw': Adam,  # fastai's Adam decouples weight decay by default
    'torch_adamw': partial(OptimWrapper, opt=torch.optim.AdamW),
    'torch_sgd_momentum': partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9)),
}


class ZeroAtForward:
    "Forward pre-hooks on each conv: are the masked weights (and for filters, their bias and BatchNorm) zero?"
    def __init__(self, learn, cb):
        self.cb, self.checked, self.bad = cb, {True: 0, False: 0}, []
        model = learn.model
        self.bn = {n: model[int(n) + 1] for n in convs(model) if isinstance(model[int(n) + 1], nn.BatchNorm2d)}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in convs(model).items()]

    def _hook(self, name):
        def hook(mod, args):
            sp = self.cb.sparsifier
            if sp is None or name not in sp.masks: return
            keep = sp.masks[name]
            pruned = ~keep.expand_as(mod.weight)
            tensors = [mod.weight[pruned]]
            if keep.shape[1:].numel() == 1:  # a mask per filter: its bias and BatchNorm too
                gone = ~keep.flatten()
                tensors.append(mod.bias[gone])
                if name in self.bn: tensors += [self.bn[name].weight[gone], self.bn[name].bias[gone]]
            if any((t != 0).any() for t in tensors): self.bad.append((name, mod.training))
            self.checked[mod.training] += 1
        return hook

    def remove(self):
        for h in self.handles: h.remove()


@pytest.mark.parametrize('granularity', ['weight', 'filter'])
@pytest.mark.parametrize('opt', list(OPTIMIZERS))
def test_pruned_weights_are_zero_at_every_forward(opt, granularity):
    learn = learner(opt_func=OPTIMIZERS[opt], wd=0.1)
    cb = SparsifyCallback(sparsity=50, granularity=granularity, schedule=fs.agp)
    watch = ZeroAtForward(learn, cb)
    try: run(learn, 3, [cb], lr=3e-2)
    finally: watch.remove()
    assert watch.bad == []
    assert watch.checked[True] > 0 and watch.checked[False] > 0  # training and validation passes were seen


def _state(opt, p):
    "The optimizer's per-element state tensors of `p` (fastai's Optimizer, or the torch optimizer an OptimWrapper holds)."
    state = opt.opt.state if isinstance(opt, OptimWrapper) else opt.state
    return {k: v for k, v in state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.shape == p.shape}


class StateBefore(Callback):
    order = 60  # before the SparsifyCallback's before_step
    def __init__(self, cb): self.cb = cb
    def before_step(self):
        sp = self.cb.sparsifier
        self.masks = sp.masks
        self.state = {n: {k: v.clone() for k, v in _state(self.opt, m.weight).items()} for n, m in sp.layers.items()}


class RegrowthCheck(Callback):
    order = 80  # right after the SparsifyCallback changed the masks, before the optimizer step
    def __init__(self, cb, before): self.cb, self.before, self.events, self.bad, self.stale_before = cb, before, 0, [], 0
    def before_step(self):
        sp = self.cb.sparsifier
        if sp.masks is self.before.masks or not self.before.masks: return
        for n, m in sp.layers.items():
            regrown = (sp.masks[n] & ~self.before.masks[n]).expand_as(m.weight)
            if not regrown.any(): continue
            self.events += 1
            if sp.granularity[n].name == 'filter':  # whole filters start as new ones: a fresh draw, BatchNorm at (1, 0)
                bound, w = 1 / m.weight[0].numel() ** .5, m.weight[regrown]
                if not (w.abs() <= bound).all() or (w == 0).all(): self.bad.append((n, 'fresh weight'))
                bn, ch = sp._bn.get(m), regrown.flatten(1).any(1)
                if bn is not None and not ((bn.weight[ch] == 1).all() and (bn.bias[ch] == 0).all()
                                           and (bn.running_var[ch] == 1).all()):
                    self.bad.append((n, 'batchnorm'))
            elif (m.weight[regrown] != 0).any(): self.bad.append((n, 'weight'))
            for k, v in _state(self.opt, m.weight).items():
                if (v[regrown] != 0).any(): self.bad.append((n, k))
                if (self.before.state[n][k][regrown] != 0).any(): self.stale_before += 1


@pytest.mark.parametrize('opt, granularity', [('sgd_momentum', 'weight'), ('adamw', 'weight'), ('torch_adamw', 'weight'),
                                              ('adamw', 'filter')])
def test_dsd_regrown_weights_restart_with_fresh_optimizer_state(opt, granularity):
    "Regrown weights restart from zero; regrown whole filters as new filters. Optimizer state starts afresh."
    learn = learner(opt_func=OPTIMIZERS[opt], wd=0.01)
    cb = SparsifyCallback(sparsity=80, granularity=granularity, schedule=fs.dsd)
    before = StateBefore(cb)
    check = RegrowthCheck(cb, before)
    text = run(learn, 3, [cb, before, check], lr=1e-2)
    assert check.events > 0 and check.bad == []
    assert check.stale_before > 0  # there was state at the regrown positions to reset
    assert cb.sparsifier.masked_sparsity() == 0 and 'Final Sparsity' in text  # dense again, as far as masks go


# ---- lottery tickets ----
class Snapshot(Callback):
    "The conv weights at the start of `epoch`; at each mask change, whether survivors equal them."
    order = 100
    def __init__(self, cb, epoch): self.cb, self.epoch_to_keep, self.changes, self.rewound = cb, epoch, 0, []
    def before_epoch(self):
        if self.epoch == self.epoch_to_keep: self.weights = conv_weights(self.learn.model)
    def before_batch(self): self.masks = self.cb.sparsifier.masks
    def before_step(self):
        sp = self.cb.sparsifier
        if sp.masks is self.masks: return
        self.changes += 1
        self.rewound.append(all(torch.equal(m.weight, self.weights[n] * sp.masks[n]) for n, m in sp.layers.items()))


@pytest.mark.parametrize('lth, rewind_epoch', [(True, 0), (True, 1), (False, 0)])
def test_lth_rewinds_survivors_at_each_mask_change(lth, rewind_epoch):
    learn = learner(tens_net)
    cb = SparsifyCallback(sparsity=90, schedule=fs.iterative, start_epoch=1, lth=lth, rewind_epoch=rewind_epoch)
    snap = Snapshot(cb, rewind_epoch)
    text = run(learn, 4, [cb, snap])
    assert snap.changes == 3  # 30, 60, 90
    assert snap.rewound == [lth] * 3
    assert (f'Saving Weights at epoch {rewind_epoch}' in text) == lth


def test_save_tickets_writes_each_ticket_with_its_sparsity_in_the_name(tmp_path):
    learn = learner(tens_net, path=tmp_path)
    cb = SparsifyCallback(sparsity=90, schedule=fs.iterative, start_epoch=1, lth=True, rewind_epoch=1, save_tickets=True)
    snap = Snapshot(cb, 1)
    text = run(learn, 4, [cb, snap])
    assert text.count('Saving Intermediate Ticket') == 3 and text.count('Saving Final Ticket') == 1
    assert (tmp_path / learn.model_dir / 'ticket_final_sparsity_090.00.pth').exists()
    files = sorted(f for f in (tmp_path / learn.model_dir).iterdir() if f.name.startswith('ticket_sparsity'))
    assert len(files) == 3
    for f, want in zip(files, [30., 60., 90.]):
        assert float(re.search(r"\d+(?:\.\d+)?", f.name)[0]) == want
        state = torch.load(f, weights_only=True)
        ws = {n: state[f'{n}.weight'] for n in ('0', '3')}
        assert 100 * sum(int((w == 0).sum()) for w in ws.values()) / 2070 == want
        assert all(torch.equal(w, snap.weights[n] * (w != 0)) for n, w in ws.items())  # the rewound survivors


@pytest.mark.parametrize('reset_end', [True, False])
def test_reset_end_rewinds_at_the_end(reset_end):
    learn = learner(tens_net)
    cb = SparsifyCallback(sparsity=90, schedule=fs.agp, start_epoch=1, reset_end=reset_end,
                          rewind_epoch=1 if reset_end else 0)
    snap = Snapshot(cb, 1)
    text = run(learn, 3, [cb, snap])
    sp = cb.sparsifier
    rewound = all(torch.equal(m.weight, snap.weights[n] * sp.masks[n]) for n, m in sp.layers.items())
    assert rewound == reset_end
    assert ('Saving Weights at epoch 1' in text) == reset_end
    assert conv_sparsity(learn.model) == 90. and 'Final Sparsity: 90.00%' in text


# ---- inside fastai's training loops ----
def test_fit_one_cycle_epoch_lines():
    learn, probe = learner(even_net, c=8), Probe()
    cb = SparsifyCallback(sparsity=75, schedule=fs.agp, start_epoch=1)
    got = epoch_lines(run(learn, 4, [cb, probe], how='fit_one_cycle'))
    want = expected_epoch_lines(fs.agp, 75, 4, [576, 576], start_epoch=1)
    assert got == pytest.approx(want, abs=ROUND) and probe.epochs == pytest.approx(want, abs=1e-9)


class PerFit(Callback):
    "Each fit's conv sparsity at its end, and whether the conv weights moved during it."
    order = 100
    def __init__(self): self.sparsity, self.moved = [], []
    def before_fit(self): self.start = conv_weights(self.learn.model)
    def after_fit(self):
        self.sparsity.append(conv_sparsity(self.learn.model))
        end = conv_weights(self.learn.model)
        self.moved.append(any(not torch.equal(end[n], w) for n, w in self.start.items()))


def body_head(m): return [params(m[:-1]), params(m[-1])]


@pytest.mark.parametrize('start_epoch', [0, 1])
def test_fine_tune_prunes_in_the_unfrozen_phase(start_epoch):
    learn, per_fit = learner(even_net, c=8, splitter=body_head), PerFit()
    cb = SparsifyCallback(sparsity=75, schedule=fs.agp, start_epoch=start_epoch)
    text = run(learn, 2, [cb, per_fit], how='fine_tune', freeze_epochs=1)
    assert per_fit.moved == [False, True] and per_fit.sparsity == [0., 75.]
    assert epoch_lines(text) == pytest.approx(expected_epoch_lines(fs.agp, 75, 2, [576, 576], start_epoch), abs=ROUND)
    assert text.count('Pruning of weight until a sparsity of 75%') == 1 and 'Final Sparsity: 75.00%' in text


def test_fine_tune_vision_learner_resnet18():
    dls = small_dls(n=32, bs=16, size=16)
    for dl in dls.loaders: dl.fake_l.num_workers = 0
    torch.manual_seed(0)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat())
    per_fit = PerFit()
    text = run(learn, 1, [SparsifyCallback(sparsity=50, schedule=fs.one_shot), per_fit], how='fine_tune')
    assert per_fit.moved == [False, True] and per_fit.sparsity == [0., 50.]
    assert overall_line(text) == (11_166_912 // 2, 50.)


@pytest.mark.parametrize('precision', ['to_fp16', 'to_bf16'])
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with CUDA present, MixedPrecision autocasts and scales for CUDA: the cuda test covers it")
def test_fastai_mixed_precision_callbacks(precision):
    # fastai 2.8's MixedPrecision autocasts with device 'cuda', so on CPU it runs in float32: this checks that the
    # callbacks work together (event order, the GradScaler's fake step); the cuda tests below check real precision.
    learn, probe = getattr(learner(even_net, c=8), precision)(), Probe()
    cb = SparsifyCallback(sparsity=75, schedule=fs.agp, start_epoch=0)
    watch = ZeroAtForward(learn, cb)
    try: got = epoch_lines(run(learn, 3, [cb, probe]))
    finally: watch.remove()
    assert any(isinstance(c, MixedPrecision) for c in learn.cbs)
    want = expected_epoch_lines(fs.agp, 75, 3, [576, 576])
    assert got == pytest.approx(want, abs=ROUND) and probe.epochs == pytest.approx(want, abs=1e-9)
    assert watch.bad == [] and watch.checked[True] > 0


class CPUBFloat16(MixedPrecision):
    "fastai's MixedPrecision with CPU autocast in bfloat16."
    def __init__(self): super().__init__('bf16')
    def before_fit(self):
        super().before_fit()
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16)


def test_cpu_bfloat16_autocast():
    learn, probe = learner(even_net, c=8, cbs=CPUBFloat16()), Probe()
    dtypes = set()
    h = learn.model[0].register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    cb = SparsifyCallback(sparsity=75, granularity='filter', schedule=fs.agp, start_epoch=0)
    watch = ZeroAtForward(learn, cb)
    try: got = epoch_lines(run(learn, 3, [cb, probe]))
    finally: h.remove(); watch.remove()
    assert torch.bfloat16 in dtypes  # really ran in bf16
    want = [100 * math.floor(Fraction(fs.agp(0, 75, (e + 1) / 3)) * 8 / 100) / 8 for e in range(3)]
    assert got == pytest.approx(want, abs=ROUND) and probe.epochs == pytest.approx(want, abs=1e-9)
    assert watch.bad == [] and watch.checked[True] > 0 and watch.checked[False] > 0


class SkipLastStep(Callback):
    "Cancels each epoch's last optimizer step, as MixedPrecision does when float16 gradients overflow."
    order = 10
    def before_step(self):
        if self.iter == self.n_iter - 1: raise CancelStepException()


def test_epoch_lines_exact_when_the_last_step_is_skipped():
    learn, probe = learner(even_net, c=8), Probe()
    cb = SparsifyCallback(sparsity=75, schedule=fs.agp, start_epoch=0)
    got = epoch_lines(run(learn, 3, [cb, SkipLastStep(), probe]))
    want = expected_epoch_lines(fs.agp, 75, 3, [576, 576])
    assert got == pytest.approx(want, abs=ROUND) and probe.epochs == pytest.approx(want, abs=1e-9)
    assert len(cb.history) == 3 * len(learn.dls.train)


@cuda
@pytest.mark.parametrize('precision, kw', [('to_fp16', {}), ('to_fp16', dict(init_scale=2. ** 40)), ('to_bf16', {})],
                         ids=['fp16', 'fp16_overflowing', 'bf16'])
def test_mixed_precision_on_cuda(precision, kw):
    learn, probe = learner(even_net, c=8, device='cuda'), Probe()
    learn = getattr(learn, precision)(**kw)
    cb = SparsifyCallback(sparsity=75, schedule=fs.agp, start_epoch=0)
    watch = ZeroAtForward(learn, cb)
    try: got = epoch_lines(run(learn, 3, [cb, probe]))
    finally: watch.remove()
    want = expected_epoch_lines(fs.agp, 75, 3, [576, 576])
    assert got == pytest.approx(want, abs=ROUND) and probe.epochs == pytest.approx(want, abs=1e-9)
    assert watch.bad == [] and watch.checked[True] > 0 and watch.checked[False] > 0
    assert all(m.device.type == 'cuda' and m.dtype == torch.bool for m in cb.sparsifier.masks.values())


# ---- the plot ----
def test_plot_draws_target_and_actual_and_saves_png(tmp_path):
    learn = learner(tens_net)
    cb = SparsifyCallback(sparsity=90, schedule=fs.iterative, start_epoch=1)
    with pytest.raises(RuntimeError, match='plot'): cb.plot()
    run(learn, 3, [cb])
    n_steps = 3 * len(learn.dls.train)
    assert len(cb.history) == n_steps
    ax = cb.plot()
    lines = ax.get_lines()
    assert len(lines) == 2 and all(len(l.get_ydata()) == n_steps for l in lines)
    target, actual = (list(l.get_ydata()) for l in lines)
    assert target[:3] == [0.] * 3 and target[-1] == 90. and actual[-1] == 90.
    assert sorted(set(target)) == [0., 30., 60., 90.]
    png = tmp_path / 'sparsity.png'
    ax.figure.savefig(png)
    plt.close(ax.figure)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000


def test_no_sparsity_column_in_the_progress_table():
    # a column would have to be a metric, changing learn.metrics: we chose not to add one (the epoch lines say it)
    learn = learner(tens_net)
    metrics = list(learn.metrics)
    run(learn, 1, [SparsifyCallback(sparsity=50)])
    assert list(learn.metrics) == metrics
    assert not any('sparsity' in str(n) for n in learn.recorder.metric_names)


# ---- other arguments of the callback ----
def test_aliases_end_sparsity_and_sched_func():
    texts = []
    for kw in (dict(sparsity=90, schedule=fs.agp), dict(end_sparsity=90, sched_func=fs.agp)):
        cb = SparsifyCallback(**kw)
        assert cb.sparsity == 90 and cb.schedule is fs.agp
        texts.append(run(learner(tens_net), 2, [cb]))
    assert texts[0] == texts[1] and 'Final Sparsity: 90.00%' in texts[0]
    with pytest.raises(TypeError, match='end_sparsity'): SparsifyCallback(sparsity=90, end_sparsity=80)
    with pytest.raises(TypeError, match='sched_func'): SparsifyCallback(sparsity=90, schedule=fs.agp, sched_func=fs.cos)
    with pytest.raises(TypeError, match='sparsity'): SparsifyCallback(schedule=fs.agp)


def test_sparsity_per_layer_dict():
    learn = learner()
    run(learn, 2, [SparsifyCallback(sparsity={'0': 50, '3': 90}, schedule=fs.agp)])
    rows = {r.layer: r for r in sparsity_report(learn.model, verbose=False)}
    assert rows['0'].zeros == 864 // 2 and rows['3'].zeros == math.floor(18432 * 0.9) and rows['6'].zeros == 0
    with pytest.raises(ValueError, match='context'): SparsifyCallback(sparsity={'0': 50}, context='global')


def test_round_to_keeps_multiples():
    learn = learner(even_net, c=8)
    run(learn, 1, [SparsifyCallback(sparsity=50, granularity='filter', round_to=3)])
    for m in convs(learn.model).values():
        kept = int((m.weight.flatten(1) != 0).any(1).sum())
        assert kept == 3  # 4 kept at 50%, rounded to the nearest multiple of 3


def test_model_argument_prunes_only_that_module():
    learn = learner()
    run(learn, 1, [SparsifyCallback(sparsity=50, model=learn.model[3])])
    assert not (learn.model[0].weight == 0).any() and not (learn.model[6].weight == 0).any()
    assert int((learn.model[3].weight == 0).sum()) == 18432 // 2


# ---- errors ----
@pytest.mark.parametrize('kw, err, match', [
    (dict(start_epoch=5), ValueError, r'start_epoch=5'),
    (dict(start_epoch=1, end_epoch=8), ValueError, r'end_epoch=8'),
    (dict(layer_type=nn.Conv3d), ValueError, r'layer_type=Conv3d'),
    (dict(sparsity={'nope': 50}), ValueError, r'nope'),
], ids=['start_epoch_past_fit', 'end_epoch_past_fit', 'no_layer', 'unknown_layer_name'])
def test_errors_that_need_the_learner_come_before_any_weight_changes(kw, err, match):
    learn = learner()
    before = all_tensors(learn.model)
    cb = SparsifyCallback(**{'sparsity': 90, **kw})
    with pytest.raises(err, match=match): run(learn, 5, [cb])
    assert_untouched(learn.model, before)


@pytest.mark.parametrize('schedule, value', [(lambda s, e, p: 150 * p, '100.5'), (lambda s, e, p: -5, '-5'),
                                            (lambda s, e, p: float('nan'), 'nan')], ids=['150', 'negative', 'nan'])
def test_schedule_outside_0_100_raises(schedule, value):
    learn = learner()
    before = all_tensors(learn.model)
    with pytest.raises(ValueError, match=rf"schedule=.*returned {value}.*\[0, 100\]"):
        run(learn, 2, [SparsifyCallback(sparsity=90, schedule=schedule)])
    assert_untouched(learn.model, before)


@pytest.mark.parametrize('kw, err, match', [
    (dict(sparsity=150), ValueError, r'sparsity=150'),
    (dict(sparsity=-1), ValueError, r'sparsity=-1'),
    (dict(sparsity='90'), TypeError, r"sparsity='90'"),
    (dict(sparsity=90, start_sparsity=101), ValueError, r'start_sparsity=101'),
    (dict(sparsity=90, context='both'), ValueError, r"context='both'"),
    (dict(sparsity=90, granularity='blob'), ValueError, r"granularity='blob'"),
    (dict(sparsity=90, criteria='nope'), ValueError, r"criteria='nope'"),
    (dict(sparsity=90, frequency=0), ValueError, r'frequency=0'),
    (dict(sparsity=90, start_epoch=-1), ValueError, r'start_epoch=-1'),
    (dict(sparsity=90, start_epoch=3, end_epoch=2), ValueError, r'end_epoch=2'),
    (dict(sparsity=90, schedule=90), TypeError, r'schedule=90'),
])
def test_bad_arguments_raise_at_construction(kw, err, match):
    with pytest.raises(err, match=match): SparsifyCallback(**kw)
