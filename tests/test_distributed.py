"""Issue 6, distributed: two CPU processes over gloo, launched by torchrun, a DDP model in a fastai Learner."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from conftest import EPOCH_RE

SCRIPT = Path(__file__).with_name('dist_script.py')
SPARSITY_LINE = ("Pruning of", "Sparsity at the end", "Final Sparsity", "Sparsity Report")


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    "Launch the two ranks once; return each rank's results and stdout."
    out = tmp_path_factory.mktemp('dist')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '--log-dir', str(out / 'logs'), '--redirects', '3', str(SCRIPT), str(out)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    logs = {int(p.parent.name): p.read_text() for p in (out / 'logs').rglob('stdout.log')}
    errs = '\n'.join(p.read_text()[-3000:] for p in (out / 'logs').rglob('stderr.log'))
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\n{errs}"
    results = {r: json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)}
    return results, logs


def test_every_rank_holds_the_same_masks_after_every_change(dist_run):
    results, _ = dist_run
    for rank, res in results.items():
        for case, r in res.items():
            assert r['changes'] >= 3, (rank, case)       # the check ran at each mask change
            assert r['masks_differ'] == 0, (rank, case)
            assert not r['weights_differ'], (rank, case)


def test_random_criterion_is_the_same_draw_on_every_rank(dist_run):
    results, _ = dist_run
    for res in results.values():
        assert res['random']['scores_differ'] == 0  # seeded draws, whatever each rank's torch random state


def test_masks_agree_even_where_the_ranks_scores_differ(dist_run):
    "An unseeded criterion scores differently on each rank; the broadcast from rank 0 makes the masks agree."
    results, _ = dist_run
    for res in results.values():
        for case in ('unseeded', 'coupled'):
            assert res[case]['scores_differ'] == res[case]['changes']
            assert res[case]['masks_differ'] == 0


def test_final_sparsity_is_the_target(dist_run):
    results, _ = dist_run
    for res in results.values():
        assert res['random']['final'] == pytest.approx(res['random']['target'], abs=1e-9)
        assert res['unseeded']['masked'] == pytest.approx(res['unseeded']['target'], abs=1e-9)


def test_only_rank_0_prints(dist_run):
    _, logs = dist_run
    assert sorted(logs) == [0, 1]
    lines = [float(v) for _, v in EPOCH_RE.findall(logs[0])]
    assert len(lines) == 12 and lines[3] == 70.0 and "Final Sparsity: 70.00%" in logs[0]  # 4 epochs a case, 3 cases
    assert not any(s in logs[1] for s in SPARSITY_LINE), logs[1]
    assert logs[1].strip()  # rank 1 did write (fastai's metric rows): its stdout was captured
