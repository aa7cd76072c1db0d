"""The main job, `python -m fasterai_sched`: a tiny real run end to end, and bad options refused with nothing written."""
import csv, os, re, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from fasterai_sched.demo import main, resolve_data, digits_folder, UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--epochs', '2', '--start-epoch', '1', '--size', '16', '--max-images', '100', '--bs', '32',
        '--schedules', 'one_shot,agp', '--seed', '0', '--device', 'cpu']
ROW = re.compile(r"^(dense|one_shot|iterative|agp|one_cycle|cos|lin|dsd)\s+([\d.]+)%\s+([\d.]+)%\s+(\S+)\s+(\d\d:\d\d)$", re.M)


def run_cli(*args, cwd=ROOT):
    # an idle wait for PyTorch's threads: on a busy machine spinning makes this test several times slower
    env = {**os.environ, 'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}
    return subprocess.run([sys.executable, '-m', 'fasterai_sched', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'out'
    res = run_cli(*TINY, '--out', str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, out


def test_table_lists_every_run(tiny_run):
    stdout, _ = tiny_run
    table = stdout[stdout.index('Comparison'):]
    assert re.search(r"^schedule\s+sparsity\s+accuracy\s+vs dense\s+time$", table, re.M)
    rows = {m[0]: m[1:] for m in ROW.findall(table)}
    assert list(rows) == ['dense', 'one_shot', 'agp']
    dense_acc = float(rows['dense'][1])
    assert rows['dense'][0] == '0.00' and rows['dense'][2] == '—'
    for name in ('one_shot', 'agp'):
        sparsity, acc, delta, _ = rows[name]
        assert sparsity == '90.00'
        assert 0 <= float(acc) <= 100
        assert float(delta) == pytest.approx(float(acc) - dense_acc, abs=0.011)


def test_prints_sparsity_lines_and_reports(tiny_run):
    stdout, _ = tiny_run
    # one_shot: nothing before epoch 1, 90% from its first step; agp reaches 90% at the last step
    lines = re.findall(r"Sparsity at the end of epoch (\d): ([\d.]+)%", stdout)
    assert lines == [('0', '0.00'), ('1', '90.00'), ('0', '0.00'), ('1', '90.00')]
    assert stdout.count('Pruning of weight until a sparsity of 90%') == 2
    assert stdout.count('Final Sparsity: 90.00%') == 2
    assert len(re.findall(r"^Overall\s+all\s+11,166,912\s+10,050,211\s+90.00%$", stdout, re.M)) == 2
    assert re.search(r"^epoch\s+train_loss\s+valid_loss\s+accuracy\s+time$", stdout, re.M)  # fastai's table


def test_writes_plots_and_csv_to_the_named_folder(tiny_run):
    stdout, out = tiny_run
    assert f"output folder: {out}" in stdout
    for name in ('sparsity.png', 'accuracy.png'):
        with Image.open(out / name) as im:
            assert im.format == 'PNG' and im.width > 300 and im.height > 200
            pixels = np.asarray(im.convert('L'))
        assert pixels.std() > 5  # something was drawn
    rows = list(csv.DictReader(open(out / 'results.csv')))
    assert [r['schedule'] for r in rows] == ['dense', 'one_shot', 'agp']
    table = {m[0]: m[1:] for m in ROW.findall(stdout)}
    for r in rows:
        assert f"{float(r['accuracy']):.2f}" == table[r['schedule']][1]
        assert f"{float(r['sparsity']):.2f}" == table[r['schedule']][0]


def test_bad_option_exits_2_from_the_command_line(tmp_path):
    out = tmp_path / 'out'
    res = run_cli('--sparsity', '120', '--out', str(out))
    assert res.returncode == 2
    assert res.stdout == ''
    assert len(res.stderr.strip().splitlines()) == 1 and '--sparsity' in res.stderr
    assert not out.exists()


def _one_class_folder(tmp_path):
    d = tmp_path / 'flat'; d.mkdir()
    for i in range(12): Image.new('RGB', (8, 8), (i, i, i)).save(d / f"dog_{i}.png")  # all lowercase: one class
    return d


def _few_images_folder(tmp_path):
    d = tmp_path / 'few'
    for c in 'ab':
        (d / c).mkdir(parents=True)
        for i in range(2): Image.new('RGB', (8, 8)).save(d / c / f"{i}.png")
    return d


BAD = [
    (['--epochs', '0'], '--epochs'),
    (['--epochs', 'ten'], '--epochs'),
    (['--sparsity', '-5'], '--sparsity'),
    (['--sparsity', 'nan'], '--sparsity'),
    (['--schedules', 'agp,steep'], '--schedules'),
    (['--schedules', 'agp,agp'], '--schedules'),
    (['--schedules', ','], '--schedules'),
    (['--granularity', 'blob'], '--granularity'),
    (['--granularity', '2:4'], '--granularity'),  # resnet18's first convolution has 3 inputs: no 2:4 groups
    (['--context', 'everywhere'], '--context'),
    (['--criteria', 'largest'], '--criteria'),
    (['--arch', 'resnet9000'], '--arch'),
    (['--size', '0'], '--size'),
    (['--arch', 'alexnet', '--size', '16'], '--size'),
    (['--epochs', '3', '--start-epoch', '3'], '--start-epoch'),
    (['--start-epoch', '2', '--end-epoch', '2'], '--end-epoch'),
    (['--end-epoch', '7'], '--end-epoch'),
    (['--lr', '0'], '--lr'),
    (['--bs', '500', '--max-images', '100'], '--bs'),
    (['--max-images', '3'], '--max-images'),
    (['--data', 'no/such/folder'], '--data'),
    (['--data', '{one_class}'], '--data'),
    (['--data', '{few}'], '--data'),
    (['--device', 'tpu'], '--device'),
    (['--out', '{a_file}'], '--out'),
    (['--frobnicate'], '--frobnicate'),
    (['--max-lag', '1.5'], '--max-lag'), (['--max-lag', 'soon'], '--max-lag'),
    # an option the method would not use (it has its own), refused before the dense run
    (['--schedules', 'agp+erk', '--context', 'global'], '--context'),
    (['--schedules', 'agp', '--allocation', 'lamp', '--context', 'local'], '--context'),
    (['--schedules', 'one_shot,agp+lamp', '--criteria', 'taylor'], '--criteria'),
    (['--schedules', 'rigl', '--reduction', 'sum'], '--reduction'),
    (['--schedules', 'rigl', '--allocation', 'lamp'], '--allocation'),
    (['--schedules', 'agp+erk,rigl+erk', '--allocation', 'lamp'], '--allocation'),
    (['--schedules', 'agp,rigl', '--max-lag', '0.1'], '--max-lag'),
] + ([(['--device', 'cuda'], '--device')] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize('args,option', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_options_are_refused_naming_the_option(tmp_path, capsys, args, option):
    a_file = tmp_path / 'a_file'; a_file.write_text('')
    subs = {'{one_class}': str(_one_class_folder(tmp_path)), '{few}': str(_few_images_folder(tmp_path)),
            '{a_file}': str(a_file)}
    args = [subs.get(a, a) for a in args]
    out = tmp_path / 'out'
    before = sorted(tmp_path.rglob('*'))
    if '--out' not in args: args += ['--out', str(out)]
    try: code = main(args)
    except SystemExit as e: code = e.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and lines[0].startswith('fasterai-sched: error:'), captured.err
    assert sorted(tmp_path.rglob('*')) == before  # nothing written


def test_folder_data_labels_by_subfolder_or_by_the_seed_rule(tmp_path):
    by_folder = resolve_data(str(digits_folder(tmp_path / 'digits', max_images=40, seed=1)), None, 0)
    assert not by_folder.by_name and len(by_folder.files) == 40
    assert {f.parent.name for f in by_folder.files} <= set('0123456789')
    flat = tmp_path / 'pets_like'; flat.mkdir()
    for i in range(6):
        Image.new('RGB', (8, 8)).save(flat / f"Bengal_{i}.jpg")
        Image.new('RGB', (8, 8)).save(flat / f"beagle_{i}.jpg")
    by_name = resolve_data(str(flat), None, 0)
    assert by_name.by_name and 'first letter uppercase' in by_name.labelling
    assert len(resolve_data(str(flat), 10, 0).files) == 10
    with pytest.raises(UsageError, match='--data'): resolve_data(str(flat / 'Bengal_0.jpg'), None, 0)


@pytest.mark.parametrize('args, window', [
    ([], (6, 1, 4)), (['--quick'], (3, 1, 2)),
    (['--start-epoch', '5'], (6, 5, 6)),          # a later start moves the end with it, not an error
    (['--epochs', '12'], (12, 2, 8)),             # a sixth of the epochs dense, a third to fine-tune
    (['--epochs', '1'], (1, 0, 1)), (['--end-epoch', '5'], (6, 1, 5)),
    (['--quick', '--epochs', '3'], (3, 1, 2)),    # the same window as --quick alone
    (['--epochs', '10', '--end-epoch', '2'], (10, 1, 2)),  # an early end pulls the default start before it
])
def test_the_pruning_window_follows_the_options(args, window):
    from fasterai_sched.demo import build_parser, make_config
    cfg = make_config(build_parser().parse_args(args))
    assert (cfg.epochs, cfg.start_epoch, cfg.end_epoch) == window


@pytest.mark.parametrize('reduction', [None, 'sum', 'mean'])
def test_reduction_option_sets_the_criterias_reducer(reduction):
    "--reduction (issue 10): the unit reduction of the run's criteria; the named criteria itself is left as it is."
    from fasterai_sched.demo import build_parser, make_config, make_callback
    from fasterai_sched.criteria import Reducer, large_final
    cfg = make_config(build_parser().parse_args(['--granularity', 'filter'] + (['--reduction', reduction] if reduction else [])))
    crit = make_callback(cfg, 'agp').criteria
    if reduction is None: assert crit is large_final and crit.reducer is None  # the library's default, the mean
    else: assert crit.reducer is {'sum': Reducer.sum, 'mean': Reducer.mean}[reduction] and large_final.reducer is None


@pytest.mark.parametrize('value,policy', [(None, {}), ('0.1', {'max_lag': 0.1}), ('none', {'max_lag': None}),
                                          ('None', {'max_lag': None}), ('0', {'max_lag': 0.0})])
def test_max_lag_option_reaches_the_callback(value, policy):
    "--max-lag: a share of the span, or 'none' (no band: the policy before max_lag) passed on as max_lag=None."
    from fasterai_sched.demo import build_parser, make_config, make_callback
    cfg = make_config(build_parser().parse_args(['--frequency', '7'] + (['--max-lag', value] if value else [])))
    cb = make_callback(cfg, 'agp')
    assert cb.frequency == 7 and cb.max_lag == policy.get('max_lag', 0.05)
