"""fasterai's Sparsifier API page: round_to, dict sparsity keyed by modules or names, the positional order, nm,
the fraction warning; with only the import changed."""
import contextlib, io, warnings
import pytest, torch, torch.nn as nn
from torchvision.models import resnet18
from fasterai_sched import *
from conftest import printed, filters_gone


@pytest.fixture
def model():
    torch.manual_seed(0)
    return resnet18()


def test_api_round_to_and_dict(model):
    sp = Sparsifier(model, 'filter', 'local', large_final)
    sp.sparsify_model(30, round_to=8)
    for m in model.modules():
        if isinstance(m, nn.Conv2d): assert (m.out_channels - filters_gone(m)) % 8 == 0
    sp.sparsify_model({model.layer4[1].conv2: 50, 'layer4.1.conv1': 25})  # modules or names, as fasterai takes
    assert filters_gone(model.layer4[1].conv2) == 256 and filters_gone(model.layer4[1].conv1) == 128
    assert filters_gone(model.conv1) == 0  # layers the dict does not name stay dense
    sp.sparsify_layer(model.conv1, 50, round_to=16)
    assert filters_gone(model.conv1) == 32
    with pytest.raises(ValueError, match='is not one of the pruned Conv2d layers'): sp.sparsify_layer(model.fc, 50)


def test_api_fasterais_positional_order_and_nm():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        sp = Sparsifier(m, 'weight', 'local', large_final, True)  # (model, granularity, context, criteria, nm)
    assert sp.granularity_name == '2:4' and list(sp.layers) == ['1']
    sp.sparsify_model(100)
    assert bool(((m[1].weight != 0).movedim(1, -1).reshape(-1, 4).sum(-1) == 2).all())
    sp = Sparsifier(nn.Sequential(nn.Linear(8, 4)), 'weight', 'local', large_final, False, nn.Linear)
    assert sp.layer_type is nn.Linear


def test_api_a_fraction_warns():
    m = nn.Sequential(nn.Conv2d(3, 8, 3))
    sp = Sparsifier(m, 'weight', 'local', large_final)
    with pytest.warns(UserWarning, match='sparsity=0.4 is a percent here'): sp.sparsify_model(0.4)
    with pytest.warns(UserWarning, match='sparsity=0.4 is a percent here'): sp.sparsify_layer(m[0], 0.4)
