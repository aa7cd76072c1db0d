"""fasterai's granularity API page: the Granularities registry and the meaning of each granularity name, with only
the import changed; dims in fasterai's numbering (0 is one weight, 1 the weight's first dim)."""
import pytest, torch, torch.nn as nn
from fasterai_sched import *
from fasterai_sched.granularity import GRANULARITIES

# fasterai 0.4.1's own tables, written out
CONV2D = {'weight': 0, 'shared_weight': 1, 'channel': 2, 'column': 3, 'row': 4, 'kernel': (3, 4), 'filter': (2, 3, 4),
          'shared_channel': (1, 2), 'shared_column': (1, 3), 'shared_row': (1, 4), 'vertical_slice': (2, 3),
          'horizontal_slice': (2, 4), 'shared_vertical_slice': (1, 2, 3), 'shared_horizontal_slice': (1, 2, 4),
          'shared_kernel': (1, 3, 4), 'layer': (1, 2, 3, 4)}
CONVT2D = {'weight': 0, 'shared_weight': 2, 'channel': 1, 'column': 3, 'row': 4, 'kernel': (3, 4), 'filter': (1, 3, 4),
           'shared_channel': (1, 2), 'shared_column': (2, 3), 'shared_row': (2, 4), 'vertical_slice': (1, 3),
           'horizontal_slice': (1, 4), 'shared_vertical_slice': (1, 2, 3), 'shared_horizontal_slice': (1, 2, 4),
           'shared_kernel': (2, 3, 4), 'layer': (1, 2, 3, 4)}
LINEAR = {'weight': 0, 'column': 1, 'row': 2, 'layer': (1, 2)}


def listify(d): return [d] if isinstance(d, int) else list(d)


@pytest.mark.parametrize('layer, table', [(nn.Conv2d(4, 6, 3), CONV2D), (nn.ConvTranspose2d(4, 6, 3), CONVT2D),
                                          (nn.Linear(4, 6), LINEAR)], ids=['Conv2d', 'ConvTranspose2d', 'Linear'])
def test_get_dim_is_fasterais(layer, table):
    for g, dims in table.items(): assert Granularities.get_dim(layer, g) == listify(dims), g
    allowed = Granularities.allowed_granularities(layer)
    assert {k: allowed[k] for k in table} == table


@pytest.mark.parametrize('g', list(CONV2D))
def test_each_unit_is_what_fasterai_reduces(g):
    "A unit's score is the mean over fasterai's dims of w[None], for every name, on Conv2d."
    torch.manual_seed(0)
    m = nn.Conv2d(4, 6, 3)
    w = m.weight.detach().abs()
    want = w[None].mean(dim=listify(CONV2D[g]), keepdim=True).squeeze(0)
    assert torch.allclose(large_final(m, g), want)
    sp = Sparsifier(nn.Sequential(m), g, 'local', large_final)
    assert sp.n_units['0'] == want.numel()


def test_fasterais_channel_is_not_the_former_one():
    torch.manual_seed(0)
    m = nn.Conv2d(4, 6, 3)
    Sparsifier(nn.Sequential(m), 'channel', 'local', large_final).sparsify_model(50)
    assert int((m.weight == 0).all(1).sum()) == 27  # half of the 6*3*3 (filter, position) units: all 4 inputs each
    m2 = nn.Conv2d(4, 6, 3)
    Sparsifier(nn.Sequential(m2), 'shared_kernel', 'local', large_final).sparsify_model(50)
    assert int((m2.weight == 0).all(dim=(0, 2, 3)).sum()) == 2  # half of the 4 input channels, across every filter


def test_registry_listing_and_adding():
    assert Granularities.available_granularities() == list(GRANULARITIES)
    assert Granularities.available_modules() == tuple(GRANULARITIES)
    assert isinstance(nn.Conv2d(1, 1, 1), Granularities.available_modules())
    class Scale(nn.Module):
        def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.randn(5, 3))
    try:
        Granularities.add_granularity(Scale, {'weight': 0, 'row': 2})
        assert Granularities.get_dim(Scale(), 'row') == [2] and granularity_names(Scale) == ['weight', 'row']
        sp = Sparsifier(nn.Sequential(Scale()), 'row', 'local', large_final, layer_type=Scale)
        sp.sparsify_model(40)
        assert sp.n_pruned == {'0': 2}
    finally: GRANULARITIES.pop(Scale, None)


def test_register_on_a_subclass_adds_to_what_it_inherits():
    class MyConv(nn.Conv2d): pass
    try:
        register_granularity(MyConv, 'pairs', (0, 1))
        names = granularity_names(MyConv)
        assert 'pairs' in names and 'filter' in names and 'shared_kernel' in names
        assert 'pairs' not in granularity_names(nn.Conv2d)
    finally: GRANULARITIES.pop(MyConv, None)
