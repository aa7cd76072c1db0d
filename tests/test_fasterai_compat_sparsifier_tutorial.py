"""fasterai's Sparsifier tutorial: a torchvision resnet18 sparsified layer by layer and as a whole, printed, saved;
its calls with only the import changed, against what fasterai documents."""
import contextlib, io, warnings
import pytest, torch, torch.nn as nn
from torchvision.models import resnet18
from fasterai_sched import *
from conftest import printed, filters_gone


@pytest.fixture
def model():
    torch.manual_seed(0)
    return resnet18()


def test_tutorial_sparsify_a_layer_then_the_model(model):
    assert model.conv1.weight.ndim == 4
    sparsifier = Sparsifier(model, 'filter', 'local', large_final)
    sparsifier.sparsify_layer(model.conv1, 70)
    assert filters_gone(model.conv1) == 44 and filters_gone(model.layer1[0].conv1) == 0  # floor(0.7 * 64)
    sparsifier.sparsify_model(70)
    assert all(filters_gone(m) == int(0.7 * m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d))
    text = printed(sparsifier.print_sparsity)
    lines = text.splitlines()
    assert lines[:4] == ['Sparsity Report:', '-' * 80,
                         f"{'Layer':<30} {'Type':<15} {'Params':<10} {'Zeros':<10} Sparsity", '-' * 80]
    assert lines[4].split() == ['conv1', 'Conv2d', '9,408', '6,468', '68.75%']  # 44 of 64 filters of 147 weights
    assert lines[-1].split()[:2] == ['Overall', 'all'] and len(lines) == 4 + 20 + 2


def test_tutorial_weight_global_and_save(model, tmp_path):
    sparsifier = Sparsifier(model, 'weight', 'global', large_final)
    sparsifier.sparsify_model(70)
    text = printed(sparsifier.print_sparsity)
    assert text.splitlines()[-1].split() == ['Overall', 'all', '11,166,912', '7,816,838', '70.00%']  # floor(0.7 * N)
    sparsifier.save_model(tmp_path / 'sparse.pth')
    loaded = torch.load(tmp_path / 'sparse.pth', weights_only=False)
    assert isinstance(loaded, type(model)) and torch.equal(loaded.conv1.weight, model.conv1.weight)
    other = resnet18()
    sparsifier.save_model(tmp_path / 'other.pth', other)  # fasterai's second argument: which model to save
    assert torch.equal(torch.load(tmp_path / 'other.pth', weights_only=False).fc.weight, other.fc.weight)
