"""The benchmark runs end to end on tiny configurations; the fast CPU selection is exact; CPU re-masking is exact."""
import contextlib, io, json
from unittest import mock
import pytest, torch, torch.nn as nn
from hypothesis import given, settings, strategies as st
import fasterai_sched.sparsifier as S
import fasterai_sched.selection as SEL
from fasterai_sched import bench

OURS = ['dense', 'agp local', 'agp global', 'steady']


def reference_lowest_k(scores, k):
    "The k lowest by a stable sort: among equal scores the lower index first."
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[scores.sort(stable=True).indices[:max(k, 0)]] = True
    return out


def run_main(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out): res = bench.main(list(args))
    return res, out.getvalue()


def check_rows(res, variants):
    rows = {r['variant']: r for r in res['rows']}
    expected = ['dense'] + ['dense, after first'] * ('steady' in variants) + variants[1:]
    assert list(rows) == expected
    assert rows['dense']['ratio'] == 1.0 and rows['dense']['memory_bytes'] is None
    for v in expected:
        for clk in ['', 'cpu_']:  # wall clock and CPU time
            r, n = rows[v], res['config']['repeats']
            assert r[clk + 'seconds'] > 0 and r[clk + 'ratio'] > 0 and len(r[clk + 'ratios']) == n
            assert all(x > 0 for x in r[clk + 'ratios'])
        if v.startswith('dense'): assert rows[v]['callback_share'] == 0 and rows[v]['sparsity'] == 0
        else:
            assert rows[v]['sparsity'] == pytest.approx(90, abs=0.01)  # the fit really pruned
            assert 0 < rows[v]['callback_share'] < 1
            mem = rows[v]['memory_bytes']
            assert mem['masks'] > 0 and mem['weight_copies'] == 0  # large_final keeps no copy of the weights


def test_step_mode_json():
    threads = torch.get_num_threads()
    try:
        res, text = run_main('--mode', 'step', '--arch', 'resnet18', '--size', '16', '--bs', '4', '--steps', '3',
                             '--repeats', '2', '--device', 'cpu', '--no-warmup', '--json', '--variants', ','.join(OURS),
                             '--interleave', 'run', '--threads', '1')
    finally: torch.set_num_threads(threads)
    assert res['config']['interleave'] == 'run' and res['config']['threads'] == 1
    assert json.loads(text) == json.loads(json.dumps(res))
    check_rows(res, OURS)
    c = res['config']
    assert (c['mode'], c['arch'], c['size'], c['bs'], c['steps'], c['repeats'], c['device']) == \
        ('step', 'resnet18', 16, 4, 3, 2, 'cpu')
    rows = {r['variant']: r for r in res['rows']}
    assert rows['steady']['timed'] == 'after the pruning step' and rows['agp local']['timed'] == 'all'
    # one byte per weight of the pruned layers (every Conv2d of the body)
    n_conv = sum(m.weight.numel() for m in bench.build_model('resnet18', 10).modules() if isinstance(m, nn.Conv2d))
    assert rows['agp global']['memory_bytes']['masks'] == n_conv


def test_fit_mode_table():
    variants = ['dense', 'agp global', 'steady', 'agp global (f=100)']
    res, text = run_main('--arch', 'resnet18', '--size', '8', '--bs', '256', '--epochs', '2', '--repeats', '1',
                         '--device', 'cpu', '--no-warmup', '--variants', ','.join(variants))
    check_rows(res, variants)
    assert res['config']['mode'] == 'fit'  # the default on CPU
    lines = text.splitlines()
    assert 'resnet18 at 8 px, batch 256, fastai fit of 2 epochs on digits' in lines[0]
    assert 'median of 1 repeats, variants interleaved batch by batch' in lines[1] and 'max_lag=0.05 of its span' in lines[1]
    assert "'(f=100)': every 100 steps and at each epoch's end, no lag bound (the old default)" in lines[1]
    assert res['config']['interleave'] == 'batch'  # the default on CPU
    assert lines[2].split() == ['variant', 's/epoch', 'x', 'dense', 'cpu', 's/epoch', 'x', 'dense', 'in', 'callback',
                                'sparsity', 'mask', 'bytes', 'copy', 'bytes']
    for v in variants + ['dense, after first']: assert any(line.startswith(v + ' ') for line in lines)


@pytest.mark.skipif(bench.fasterai_available()[0], reason="fasterai is installed: its rows are not skipped")
def test_fasterai_rows_skipped_with_a_note():
    res = bench.run_train_bench('step', 'resnet18', 8, 2, 'cpu', steps=2, repeats=1, warmup=False,
                                variants=['dense', 'fasterai agp global'])
    assert [r['variant'] for r in res['rows']] == ['dense']
    assert any('fasterai not installed' in n and 'fasterai agp global' in n for n in res['notes'])
    assert 'fasterai not installed' in bench.format_train(res)


def test_variants_recompute_policy():
    "'(f=100)' variants keep the old policy whatever the command line says; the others take the command line's."
    old = bench.make_callback('agp local (f=100)', frequency=5, max_lag=0.5)
    assert (old.max_lag, old.frequency, old.context) == (None, 100, 'local')
    new = bench.make_callback('agp global', max_lag=0.05)
    assert (new.max_lag, new.frequency, new.context) == (0.05, None, 'global')
    assert bench.make_callback('agp local').max_lag == 0.05 and bench.make_callback('dense') is None


def test_bad_arguments():
    with pytest.raises(ValueError, match='nope'): bench.run_train_bench(variants=['nope'], device='cpu')
    with pytest.raises(ValueError, match="mode='walk'"): bench.run_train_bench('walk', device='cpu')
    with pytest.raises(ValueError, match="arch='vgg'"): bench.build_model('vgg', 10)
    with pytest.raises(ValueError, match="device='tpu'"): bench.pick_device('tpu')
    with pytest.raises(ValueError, match="interleave='zigzag'"): bench.run_train_bench(device='cpu', interleave='zigzag')
    with pytest.raises(SystemExit, match='--threads=0 must be at least 1'): bench.main(['--threads', '0'])


@pytest.mark.parametrize('args, match', [
    (['select', '--sparsity', '50'], "--sparsity=50.0 does not apply to 'select'; it reads --device, --json, --n"),
    (['train', '--sparsity', '50'], "--sparsity=50.0 does not apply to 'train'"),  # the train bench prunes to 90%
    (['compact', '--device', 'cuda'], "--device='cuda' does not apply to 'compact'"),
    (['train', '--mode', 'fit', '--steps', '5'], "--steps=5 does not apply to 'train' in mode 'fit'"),
    (['train', '--mode', 'step', '--epochs', '5'], "--epochs=5 does not apply to 'train' in mode 'step'"),
    (['select', '--repeats', '0'], '--repeats=0 must be at least 1'), (['compact', '--runs', '-3'], '--runs=-3 must be'),
    (['train', '--bs', '0'], '--bs=0 must be at least 1'), (['compact', '--sparsity', '100'], r'--sparsity=100 must be'),
    (['train', '--variants', 'dense,agp local (f=100)', '--max-lag', '0.2'],
     r"--max-lag=0.2 does not apply to variant 'agp local \(f=100\)', which has its own policy"),
])
def test_an_option_the_command_would_not_read_or_out_of_range_is_refused(args, match):
    "Before anything runs: nothing is ignored or clamped."
    with pytest.raises(SystemExit, match=match): bench.main(args)


def test_select_bench():
    res, text = run_main('select', '--n', '600000', '--device', 'cpu', '--repeats', '2')
    assert [r['method'] for r in res['rows']] == \
        ['threshold (_kth_smallest)', 'exact mask (lowest_k)', 'reference (torch.kthvalue)']
    assert all(r['ms'] > 0 for r in res['rows']) and res['config']['k'] == 540_000
    assert 'exact mask (lowest_k)' in text


# ---- exactness of the CPU selection ----
def tricky_scores(n, kind, g):
    if kind == 'uniform': return torch.rand(n, generator=g)
    if kind == 'few values': return torch.randint(0, 4, (n,), generator=g).float()  # ties everywhere
    if kind == 'mostly zero':  # pruned weights score 0
        s = torch.rand(n, generator=g); s[torch.rand(n, generator=g) < .8] = 0; return s
    if kind == 'inf held':  # global context holds units back with +inf
        s = torch.randint(0, 50, (n,), generator=g).float(); s[torch.rand(n, generator=g) < .3] = float('inf'); return s
    if kind == 'float64 rounded': return torch.randn(n, generator=g, dtype=torch.float64).round(decimals=1)
    raise ValueError(kind)


KINDS = ['uniform', 'few values', 'mostly zero', 'inf held', 'float64 rounded']


@pytest.mark.parametrize('kind', KINDS)
def test_fast_selection_matches_stable_sort(kind):
    g = torch.Generator().manual_seed(KINDS.index(kind))
    with mock.patch.object(SEL, '_DIRECT', 64), mock.patch.object(SEL, '_DIRECT_CPU', 64), mock.patch.object(SEL, '_SAMPLE', 256):  # bracket small inputs too
        for n in [64, 1000, 20_000]:
            s = tricky_scores(n, kind, g)
            if n >= 1000: assert SEL._bracketed_kth(s, n // 2) is not None  # the fast path is what is tested
            for k in [0, 1, 2, n // 10, n // 2, n - n // 10, n - 2, n - 1, n, n + 3]:
                got = SEL.lowest_k(s, k)
                assert got.dtype == torch.bool and int(got.sum()) == min(max(k, 0), n)
                assert torch.equal(got, reference_lowest_k(s, k)), (kind, n, k)
                if 0 < k <= n:
                    assert SEL._kth_smallest(s, k) == s.sort().values[k - 1]
                    assert SEL._kth_direct(s, k, topk=True) == s.sort().values[k - 1]  # CUDA's way, run on CPU


def test_bracket_is_taken_and_its_miss_falls_back():
    n, k = 1 << 20, 700_000
    s = torch.rand(n, generator=torch.Generator().manual_seed(0))
    assert SEL._bracketed_kth(s, k) is not None  # the fast path, at the default sizes
    assert n >= SEL._DIRECT
    # scores at exactly the sampled positions made huge: the sample misleads, the bracket misses, the answer stays
    picked = torch.randint(n, (SEL._SAMPLE,), generator=torch.Generator().manual_seed(n))
    s[picked] = 10 + s[picked]
    assert SEL._bracketed_kth(s, k) is None
    assert torch.equal(SEL.lowest_k(s, k), reference_lowest_k(s, k))
    assert SEL._kth_smallest(s, k) == s.kthvalue(k).values == SEL._kth_direct(s, k, topk=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=300), st.data())
def test_fast_selection_property(values, data):
    s = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(-1, len(values) + 1))
    with mock.patch.object(SEL, '_DIRECT', 1), mock.patch.object(SEL, '_DIRECT_CPU', 1), mock.patch.object(SEL, '_SAMPLE', data.draw(st.sampled_from([1, 4, 64]))):
        got = SEL.lowest_k(s, k)
    assert torch.equal(got, reference_lowest_k(s, k))


# ---- CPU re-masking ----
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('granularity', ['weight', 'filter'])
def test_cpu_apply_equals_multiplying_by_the_mask(dtype, granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)).to(dtype)
    sp = S.Sparsifier(model, granularity=granularity, context='global')
    sp.prune(50)
    with torch.no_grad():
        for p in model.parameters(): p.add_(1)  # an optimizer step revives every pruned weight
    expected = [p.detach() * m for p, m in zip(*sp._targets)]
    versions = [p._version for p in sp._targets[0]]
    sp.apply()
    for p, e in zip(sp._targets[0], expected): assert torch.equal(p.detach(), e) and p.dtype == dtype
    assert all(p._version > v for p, v in zip(sp._targets[0], versions))  # autograd sees the in-place change


# ---- how often masks are recomputed ----
def recomputes(frequency=None, schedule=None, n_epoch=3, probe=None, raw=False, **kw):
    "Fit 15 steps per epoch; the global steps at which the masks were recomputed, the epoch lines and the callback."
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from conftest import small_dls, small_net, fit_capture, epoch_lines
    from fasterai_sched import SparsifyCallback, agp
    torch.manual_seed(0)
    learn = Learner(small_dls(n=400, bs=20), small_net(), loss_func=CrossEntropyLossFlat())
    kw = {'sparsity': 80, 'start_epoch': 0, **kw}  # pruning from the first step (agp's own window opens at a fifth)
    cb = SparsifyCallback(schedule=schedule or agp, frequency=frequency, **kw)
    steps, prune = [], S.Sparsifier.prune
    def counting(self, *a, **k):
        steps.append(learn.epoch * len(learn.dls.train) + learn.iter + 1)
        return prune(self, *a, **k)
    with mock.patch.object(S.Sparsifier, 'prune', counting): text = fit_capture(learn, n_epoch, [cb] + [probe] * bool(probe))
    assert len(learn.dls.train) == 15
    return steps, text if raw else epoch_lines(text), cb


def test_default_recomputes_follow_the_target():
    """agp to 80% over 45 steps: after every step the masks are within 5% of 80 points (4) of the target, ahead or
    behind; a recompute leaves the band's width for the target to cross, so far fewer than trailing alone takes."""
    steps, lines, cb = recomputes()
    assert cb.max_lag == 0.05 and cb.frequency is None
    gaps = [h['actual'] - h['target'] for h in cb.history]
    assert len(gaps) == 45 and max(map(abs, gaps)) <= 4 + 0.1 and max(gaps) > 1 and min(gaps) < -1
    trailing, last = 0, 0.  # recomputes of masks that only trail: each time the target moved 4 points
    for s in range(1, 46):
        if abs(cb._target(s) - last) > 4: trailing, last = trailing + 1, cb._target(s)
    assert steps[0] == 1 and {15, 30, 45} <= set(steps) and len(steps) < trailing  # with 3 epoch ends
    every, lines_every, _ = recomputes(max_lag=0)  # every step where the count changes
    assert len(every) >= 40 and every[:2] == [1, 2]
    assert lines == lines_every and lines[-1] == 80.0  # the epoch lines do not depend on the policy


def test_frequency_adds_recomputes_and_epoch_ends_stay():
    steps, lines, _ = recomputes(frequency=4, max_lag=None)  # the step rule alone
    assert steps == [1, 4, 8, 12, 15, 16, 20, 24, 28, 30, 32, 36, 40, 44, 45]
    assert lines == recomputes(frequency=1)[1]
    both = recomputes(frequency=4)[0]  # both rules at once: every fourth step, and wherever the lag asks
    assert {4, 8, 12} <= set(both) and len(both) > len(recomputes()[0])


def test_frequency_ranks_anew_at_a_constant_target():
    """With `frequency`, a criteria whose ranking changes (here a random one) gets new masks every `frequency` steps after
    the target has settled, at the same exact counts; without it the settled masks stay. No lth rewind at a rerank."""
    from fastai.callback.core import Callback
    from fasterai_sched import one_shot, Criteria
    shuffled = Criteria(torch.rand_like, name='shuffled')  # a new ranking at every call

    class Masks(Callback):
        order = 100
        def before_fit(self): self.seen = []
        def after_batch(self):
            sp = next(c for c in self.learn.cbs if hasattr(c, 'sparsifier')).sparsifier
            if self.training: self.seen.append(torch.cat([~sp.masks[n].flatten() for n in sp.layers]))

    for frequency, changes in ((10, [10, 20, 30]), (None, [])):
        probe = Masks()
        steps, lines, cb = recomputes(frequency=frequency, schedule=one_shot, criteria=shuffled, n_epoch=2, probe=probe)
        # the lines measure zeros: weights regrown at the last step restart at zero (docs/errors.md, "Allowed")
        assert steps == [1] + changes and lines == pytest.approx([80.0, 80.0], abs=1)
        assert [s + 1 for s in range(1, 30) if not torch.equal(probe.seen[s], probe.seen[s - 1])] == changes
        assert len({int(m.sum()) for m in probe.seen}) == 1  # the same exact count of masked weights at every step
    steps, text, cb = recomputes(frequency=10, schedule=one_shot, n_epoch=2, lth=True, start_epoch=1, raw=True)
    assert steps == [16, 20, 30] and text.count('Resetting Weights') == 1  # the prune at step 16, not the reranks


def test_recompute_when_pruning_ends():
    "A schedule that switches pruning off mid-epoch: the masks are released at once, not at the epoch's end."
    def on_then_off(start, end, pos): return end if pos < 0.6 else start
    steps, lines, _ = recomputes(schedule=on_then_off)
    assert steps == [1, 27] and lines[0] == 80.0  # 27 = 0.6 * 45 steps: not an epoch end


def test_recompute_when_the_target_settles():
    """A target that stops moving mid-epoch: the masks hold it exactly from the step it settles (step 23, no epoch
    end), reached by the recompute whose band covers it, and are never ahead of it by more than max_lag."""
    def twice_as_fast(start, end, pos): return start + (end - start) * min(1., 2 * pos)
    steps, lines, cb = recomputes(schedule=twice_as_fast, max_lag=0.3)
    assert cb._target(23) == 80 and cb._target(22) < 80
    actual = [h['actual'] for h in cb.history]
    assert all(a == pytest.approx(80, abs=0.01) for a in actual[22:]) and 30 not in steps and 45 not in steps
    reached = next(i for i, a in enumerate(actual) if a == pytest.approx(80, abs=0.01))
    assert 1 <= reached < 22 and 80 - cb._target(reached + 1) <= 0.3 * 80


def test_a_schedules_step_is_never_delayed():
    "iterative's jumps are recomputed at the step they happen, though not at an epoch end."
    from fasterai_sched import iterative
    steps, lines, cb = recomputes(schedule=iterative, n_epoch=2)
    targets = [cb._target(s) for s in range(0, 31)]
    jumps = [s for s in range(1, 31) if targets[s] != targets[s - 1]]
    assert len(jumps) == 3 and any(s % 15 for s in jumps)  # 3 steps, some inside an epoch
    assert steps == jumps  # and nowhere else: the epoch ends find the counts unchanged
    assert lines == recomputes(schedule=iterative, n_epoch=2, frequency=1)[1]


@pytest.mark.parametrize('kw', [dict(schedule='iterative', sparsity=20), dict(schedule='one_shot', sparsity=12,
                                                                               start_sparsity=5, start_epoch=1)])
def test_small_schedule_steps_are_not_delayed_either(kw):
    "The jump rule is relative to the schedule's span: steps of 6.67 points (iterative to 20%) or 7 (5% to 12%) count."
    import fasterai_sched as fs
    kw = {**kw, 'schedule': getattr(fs, kw['schedule'])}
    steps, lines, cb = recomputes(n_epoch=2, **kw)
    targets = [cb._target(s) for s in range(0, 31)]
    moves = [s for s in range(1, 31) if targets[s] != targets[s - 1]]
    assert moves and all(s in steps for s in moves) and any(s % 15 for s in moves)


@pytest.mark.parametrize('kind', KINDS)
def test_numpy_and_torch_selection_agree(kind):
    "The CPU path (numpy passes) and the torch path CUDA takes pick the same weights, bracketed or not."
    g = torch.Generator().manual_seed(10 + KINDS.index(kind))
    for n in [1000, SEL._DIRECT + 5_000]:
        s = tricky_scores(n, kind, g)
        for k in [1, n // 3, n - 7]:
            assert torch.equal(SEL.lowest_k(s, k), SEL._lowest_k_bracketed(s, k)), (kind, n, k)


def test_issue13_variants_time_the_new_methods():
    "RigL, AC/DC, agp with ERK and with LAMP have bench rows: their callbacks, built for the learner's model."
    from fasterai_sched import RigLCallback, lamp
    model = bench.build_model('resnet18', 10)
    rigl = bench.make_callback('rigl', model=model)
    assert isinstance(rigl, RigLCallback) and rigl.delta == 10 and isinstance(rigl.sparsity, dict)
    assert bench.make_callback('agp lamp', model=model).criteria is lamp
    assert isinstance(bench.make_callback('agp erk', model=model).sparsity, dict)
    assert bench.make_callback('acdc', model=model).schedule.__name__ == 'acdc'
    with pytest.raises(ValueError, match='needs the model'): bench.make_callback('rigl')
    res = bench.run_train_bench('step', 'resnet18', 8, 2, 'cpu', steps=15, repeats=1, warmup=False,
                                variants=['dense', 'rigl', 'acdc', 'agp erk', 'agp lamp'])
    rows = {r['variant']: r for r in res['rows']}
    assert list(rows) == ['dense', 'rigl', 'acdc', 'agp erk', 'agp lamp']
    assert rows['rigl']['sparsity'] == pytest.approx(90, abs=0.01) and rows['rigl']['ratio'] > 0
