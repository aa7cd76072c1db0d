"""Issue 13: the accuracy-vs-sparsity sweep (`--sweep`), methods by name, and the new methods in the main job."""
import csv, re
import pytest, torch
from fasterai_sched import SparsifyCallback, RigLCallback, lamp, acdc, agp
from fasterai_sched.sweep import (parse_method, build_callback, sweep_cnn, sweep_dls, SweepConfig, run_sweep,
                                  sweep_table, SWEEP_METHODS)
from fasterai_sched.demo import main
from test_demo import run_cli


def test_parse_method():
    assert parse_method('agp') == ('agp', 'uniform')
    assert parse_method('agp+erk') == ('agp', 'erk') and parse_method('rigl+dense_first') == ('rigl', 'dense_first')
    for bad, match in [('steep', "'steep' is not a schedule"), ('agp+wide', "'wide' is not an allocation"),
                       ('rigl+lamp', 'RigL keeps per-layer counts')]:
        with pytest.raises(ValueError, match=match): parse_method(bad)
    with pytest.raises(TypeError, match='method=3'): parse_method(3)


def test_method_name_and_own_options():
    from fasterai_sched.sweep import method_name, own_options
    assert method_name('agp', 'erk') == 'agp+erk' and method_name('agp', 'uniform') == 'agp'
    assert method_name('rigl+erk', 'lamp') == 'rigl+erk' and method_name('rigl') == 'rigl'
    assert [own_options(m) for m in ('agp', 'agp+erk', 'agp+lamp', 'rigl', 'rigl+erk')] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="'steep' is not a schedule"): own_options('steep')


def test_build_callback_per_method():
    model = sweep_cnn()
    cb = build_callback('agp', 90, model, start_epoch=1)
    assert type(cb) is SparsifyCallback and cb.sparsity == 90 and cb.context == 'local' and cb.schedule is agp
    cb = build_callback('agp+lamp', 90, model)
    assert cb.context == 'global' and cb.criteria is lamp
    cb = build_callback('acdc+erk', 95, model, end_epoch=4)
    assert isinstance(cb.sparsity, dict) and list(cb.sparsity) == ['0', '3', '6'] and cb.schedule is acdc
    cb = build_callback('rigl+erk', 95, model, delta=7)
    assert isinstance(cb, RigLCallback) and cb.delta == 7 and isinstance(cb.sparsity, dict)
    cb = build_callback('agp', 90, model, criteria='taylor', context='global')
    assert cb.context == 'global' and cb.criteria.name == 'taylor'
    with pytest.raises(ValueError, match='sparsity=101'): build_callback('agp', 101, model)
    with pytest.raises(ValueError, match="granularity='filter'"): build_callback('rigl', 90, model, granularity='filter')


@pytest.mark.parametrize('method, kw, match', [
    ('agp+erk', dict(context='global'), "context='global' does not apply to method='agp\\+erk': the erk allocation"),
    ('agp+lamp', dict(context='local'), "context='local' does not apply to method='agp\\+lamp': LAMP ranks"),
    ('agp+lamp', dict(criteria='taylor'), "criteria='taylor' does not apply to method='agp\\+lamp'"),
    ('rigl', dict(context='global'), "context='global' does not apply to method='rigl': RigL drops"),
    ('rigl+erk', dict(criteria='large_init'), "criteria='large_init' does not apply to method='rigl\\+erk'"),
    ('rigl', dict(start_epoch=1), "start_epoch=1 does not apply to method='rigl': RigL updates"),
])
def test_build_callback_refuses_options_the_method_would_not_use(method, kw, match):
    "Nothing given is ignored: a context or criteria the method replaces, or a window for RigL, is an error."
    with pytest.raises(ValueError, match=match): build_callback(method, 90, sweep_cnn(), **kw)
    # the method's own values are accepted when given
    assert build_callback('agp+lamp', 90, sweep_cnn(), context='global', criteria=lamp).context == 'global'
    assert build_callback('agp+erk', 90, sweep_cnn(), context='local', criteria='taylor').criteria.name == 'taylor'
    assert build_callback('agp+lamp', 90, sweep_cnn(), criteria='lamp').criteria.name == 'lamp'
    assert isinstance(build_callback('rigl', 90, sweep_cnn(), start_epoch=None, end_epoch=None), RigLCallback)


@pytest.mark.parametrize('method', ['agp', 'agp+erk', 'agp+lamp', 'rigl'])
def test_unknown_names_get_the_librarys_message_whatever_the_method(method):
    with pytest.raises(ValueError, match=r"criteria='biggest' is not known; valid: \["):
        build_callback(method, 90, sweep_cnn(), criteria='biggest')
    with pytest.raises(ValueError, match="context='glob' is not allowed; use 'local' or 'global'"):
        build_callback(method, 90, sweep_cnn(), context='glob')


def test_the_printed_call_of_a_method_shows_what_it_was_given():
    from fasterai_sched.demo import build_parser, make_config, callback_call
    cfg = make_config(build_parser().parse_args(['--schedules', 'agp+erk', '--criteria', 'taylor', '--max-lag', '0.1']))
    assert callback_call(cfg, 'agp+erk') == ("build_callback('agp+erk', 90, learn.model, criteria='taylor', start_epoch=1, "
                                            "end_epoch=4, max_lag=0.1)")
    cfg = make_config(build_parser().parse_args(['--schedules', 'agp+lamp', '--granularity', 'kernel']))
    assert callback_call(cfg, 'agp+lamp') == ("build_callback('agp+lamp', 90, learn.model, granularity='kernel', "
                                             "start_epoch=1, end_epoch=4)")


def test_sweep_cnn_and_data():
    model = sweep_cnn()
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d)) == 23_184
    dls = sweep_dls(bs=64, seed=0)
    assert len(dls.train_ds) == 1438 and len(dls.valid_ds) == 359
    assert tuple(dls.one_batch()[0].shape) == (64, 1, 8, 8)
    # the held-out images do not depend on the seed
    assert torch.equal(torch.stack([x for x, _ in sweep_dls(seed=1).valid_ds]), torch.stack([x for x, _ in dls.valid_ds]))


def test_run_sweep_and_table():
    cfg = SweepConfig([90], ['agp+erk', 'rigl'], epochs=2, seeds=2, seed=0)
    lines = []
    res = run_sweep(cfg, log=lines.append)
    assert len(res) == len(lines) == 2 + 2 * 2
    assert [r['method'] for r in res] == ['dense', 'dense', 'agp+erk', 'agp+erk', 'rigl', 'rigl']
    # ERK's counts add up to the budget's floor(0.9 * 23,184) = 20,865; uniform RigL floors each layer: 20,864
    assert [round(r['measured'] * 23_184 / 100) for r in res[2:]] == [20_865, 20_865, 20_864, 20_864]
    assert all(0 <= r['accuracy'] <= 100 for r in res)
    table = sweep_table(res, [90], cfg.methods)
    rows = table.splitlines()
    assert rows[0] == '| method | 90% |' and rows[2].startswith('| dense (0%) |')
    mean = sum(r['accuracy'] for r in res[2:4]) / 2
    assert re.match(rf"\| agp\+erk \| {mean:.2f} ± \d+\.\d\d \|$", rows[3])
    assert 'over 2 seeds' in table


def test_cli_sweep_end_to_end(tmp_path):
    out = tmp_path / 'out'
    res = run_cli('--sweep', '80,95', '--schedules', 'agp,acdc', '--allocation', 'erk', '--epochs', '2',
                  '--seeds', '1', '--seed', '0', '--out', str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'methods agp+erk, acdc+erk at 80%, 95%' in res.stdout
    assert re.search(r"^\| acdc\+erk \| [\d.]+ ± 0\.00 \| [\d.]+ ± 0\.00 \|$", res.stdout, re.M)
    with open(out / 'sweep.csv') as f: rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 2 * 2 and {r['method'] for r in rows} == {'dense', 'agp+erk', 'acdc+erk'}
    assert (out / 'sweep.png').stat().st_size > 10_000


@pytest.mark.parametrize('args, option', [
    (['--sweep', '80,x'], '--sweep'), (['--sweep', '120'], '--sweep'), (['--sweep', ''], '--sweep'),
    (['--sweep', '90', '--arch', 'resnet34'], '--arch'), (['--sweep', '90', '--schedules', 'rigl+lamp'], '--schedules'),
    (['--sweep', '90', '--schedules', 'agp,agp'], '--schedules'), (['--seeds', '2'], '--seeds'),
    (['--schedules', 'agp+wide'], '--schedules'), (['--schedules', 'rigl', '--max-lag', '0.1'], '--max-lag'),
    (['--sweep', '90', '--max-lag', '0.1'], '--max-lag'),
])
def test_sweep_usage_errors(args, option, capsys, tmp_path):
    assert main([*args, '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fasterai-sched: error: {option}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'o').exists()


def test_main_job_runs_rigl_and_an_allocation(tmp_path):
    res = run_cli('--epochs', '2', '--start-epoch', '1', '--size', '16', '--max-images', '100', '--bs', '32',
                  '--schedules', 'rigl,agp+lamp', '--allocation', 'erk', '--sparsity', '80', '--seed', '0',
                  '--device', 'cpu', '--pretrained', 'no', '--out', str(tmp_path / 'out'))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "build_callback('rigl+erk', 80, learn.model, delta=1)" in res.stdout  # two updates an epoch of 2 steps
    assert "build_callback('agp+lamp', 80, learn.model, start_epoch=1, end_epoch=2)" in res.stdout
    assert res.stdout.count('Final Sparsity: 80.00%') == 2
    assert re.search(r"^rigl\s+80\.00%", res.stdout, re.M) and re.search(r"^agp\+lamp\s+80\.00%", res.stdout, re.M)


def test_the_sweep_keeps_the_values_typed_even_when_they_equal_the_main_jobs_defaults():
    "--bs 32 and --schedules one_shot,iterative,agp are the main job's defaults; typed after --sweep, they hold."
    from fasterai_sched.demo import build_parser, sweep_config
    cfg = sweep_config(build_parser().parse_args(['--sweep', '90', '--bs', '32', '--lr', '0.01',
                                                  '--schedules', 'one_shot,iterative,agp']))
    assert (cfg.bs, cfg.lr, cfg.methods) == (32, 0.01, ['one_shot', 'iterative', 'agp'])
    cfg = sweep_config(build_parser().parse_args(['--sweep', '90']))
    assert (cfg.bs, cfg.methods) == (64, SWEEP_METHODS.split(','))
