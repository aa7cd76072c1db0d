"""sparsity_report: the seed's table row for row on resnet18 pruned to 90% local, and the returned rows."""
from pathlib import Path
import pytest, torch, torch.nn as nn
from fastai.vision.all import create_body, create_head
from torchvision.models import resnet18
from fasterai_sched import Sparsifier, sparsity_report, large_final
from fasterai_sched.report import ReportRow
from conftest import small_net

SEED = Path(__file__).resolve().parents[2] / 'shared' / 'seed' / 'schedules_tutorial.txt'

# The first "Sparsity Report:" block of seed/schedules_tutorial.txt (before "Iterative Pruning"), as the seed
# prints it (its columns collapsed to single spaces). Kept here so the test runs without the seed beside it.
SEED_TABLE = """\
0.0 Conv2d 9,408 8,467 90.00%
0.4.0.conv1 Conv2d 36,864 33,177 90.00%
0.4.0.conv2 Conv2d 36,864 33,177 90.00%
0.4.1.conv1 Conv2d 36,864 33,177 90.00%
0.4.1.conv2 Conv2d 36,864 33,177 90.00%
0.5.0.conv1 Conv2d 73,728 66,355 90.00%
0.5.0.conv2 Conv2d 147,456 132,710 90.00%
0.5.0.downsample.0 Conv2d 8,192 7,372 89.99%
0.5.1.conv1 Conv2d 147,456 132,710 90.00%
0.5.1.conv2 Conv2d 147,456 132,710 90.00%
0.6.0.conv1 Conv2d 294,912 265,420 90.00%
0.6.0.conv2 Conv2d 589,824 530,841 90.00%
0.6.0.downsample.0 Conv2d 32,768 29,491 90.00%
0.6.1.conv1 Conv2d 589,824 530,841 90.00%
0.6.1.conv2 Conv2d 589,824 530,841 90.00%
0.7.0.conv1 Conv2d 1,179,648 1,061,683 90.00%
0.7.0.conv2 Conv2d 2,359,296 2,123,366 90.00%
0.7.0.downsample.0 Conv2d 131,072 117,964 90.00%
0.7.1.conv1 Conv2d 2,359,296 2,123,366 90.00%
0.7.1.conv2 Conv2d 2,359,296 2,123,366 90.00%
Overall all 11,166,912 10,050,211 90.00%"""
RULE = '-' * 80


def seed_rows():
    return [line.split() for line in SEED_TABLE.splitlines()]


def test_embedded_table_is_the_seeds():
    if not SEED.exists(): pytest.skip(f"the seed is not beside this checkout ({SEED})")
    text = SEED.read_text()
    block = text[text.index('Sparsity Report:'):text.index('Iterative Pruning')].splitlines()
    rows = [l.split() for l in block if l.split() and l.split()[0] not in ('Sparsity', 'Layer') and set(l) != {'-'}]
    assert rows == seed_rows()


@pytest.fixture(scope='module')
def pruned_resnet():
    torch.manual_seed(0)
    model = nn.Sequential(create_body(resnet18(), pretrained=False), create_head(1024, 2))
    sp = Sparsifier(model, 'weight', 'local', large_final)
    sp.prune(90)
    return model, sp


def test_seed_report_row_for_row(pruned_resnet, capsys):
    model, sp = pruned_resnet
    rows = sparsity_report(model)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ['Sparsity Report:', RULE, 'Layer                          Type            Params     Zeros      Sparsity', RULE]
    assert lines[-2] == RULE and len(lines) == 4 + 20 + 2
    printed = [l.split() for l in lines[4:-2] + lines[-1:]]
    assert printed == seed_rows()  # every layer name, type, Params, Zeros and Sparsity, in order
    assert lines[-1] == 'Overall                        all             11,166,912 10,050,211     90.00%'
    assert lines[4] == '0.0                            Conv2d          9,408      8,467          90.00%'
    # the returned rows hold the same numbers, measured from the weights
    assert all(isinstance(r, ReportRow) for r in rows) and len(rows) == 21
    for r, s in zip(rows, seed_rows()):
        assert (r.layer, r.type, f'{r.params:,}', f'{r.zeros:,}', f'{r.sparsity:.2f}%') == tuple(s)
    assert rows[-1] == ReportRow('Overall', 'all', 11_166_912, 10_050_211, 100 * 10_050_211 / 11_166_912)
    assert rows[7].sparsity == 100 * 7372 / 8192 and rows[7]._fields == ('layer', 'type', 'params', 'zeros', 'sparsity')
    for r in rows[:-1]:
        assert r.zeros == int((model.get_submodule(r.layer).weight == 0).sum())
    assert sum(sp.n_pruned.values()) == 10_050_211


def test_report_is_measured_from_the_weights(pruned_resnet, capsys):
    model, sp = pruned_resnet
    conv = model.get_submodule('0.4.0.conv1')
    saved = conv.weight.detach().clone()
    try:
        with torch.no_grad(): conv.weight.zero_()
        rows = sparsity_report(model, verbose=False)
        assert capsys.readouterr().out == ''
        assert rows[1] == ReportRow('0.4.0.conv1', 'Conv2d', 36_864, 36_864, 100.0)
        assert rows[-1].zeros == 10_050_211 + 36_864 - 33_177
    finally:
        with torch.no_grad(): conv.weight.copy_(saved)


def test_report_other_layer_type_and_unpruned_model(capsys):
    model = small_net()
    rows = sparsity_report(model, layer_type=nn.Linear)
    assert rows == [ReportRow('10', 'Linear', 128, 0, 0.0), ReportRow('Overall', 'all', 128, 0, 0.0)]
    out = capsys.readouterr().out.splitlines()
    assert out[4].split() == ['10', 'Linear', '128', '0', '0.00%'] and out[-1].split() == ['Overall', 'all', '128', '0', '0.00%']
    Sparsifier(model, 'filter', 'local', large_final).prune(50)
    rows = sparsity_report(model, verbose=False)
    assert [(r.layer, r.zeros) for r in rows] == [('0', 432), ('3', 9216), ('6', 18432), ('Overall', 28080)]


def test_report_without_layers_raises():
    with pytest.raises(ValueError, match='layer_type=Conv2d'): sparsity_report(nn.Sequential(nn.Linear(2, 2)))


def test_a_layer_type_that_is_not_a_module_class_is_named():
    import torch.nn as nn
    from fasterai_sched import sparsity_report
    with pytest.raises(TypeError, match="layer_type='Conv2d' must be an nn.Module subclass such as nn.Conv2d"):
        sparsity_report(nn.Sequential(nn.Conv2d(3, 8, 3)), 'Conv2d')
