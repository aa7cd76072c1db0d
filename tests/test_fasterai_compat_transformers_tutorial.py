"""fasterai's transformers tutorial: a custom `Conv1D` layer (GPT-2's, a Linear whose weight is stored (nx, nf))
taught to the Granularities registry, then pruned by the callback; its calls with only the import and the data (a
tiny in-memory model instead of GPT-2 on WikiText) changed."""
import contextlib, io
import pytest, torch, torch.nn as nn
from fastai.vision.all import DataLoaders, Learner, CrossEntropyLossFlat, accuracy
from fasterai_sched import *
from fasterai_sched.granularity import GRANULARITIES


class Conv1D(nn.Module):
    "GPT-2's layer: y = x @ W + b with W of shape (nx, nf)."
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))
    def forward(self, x): return x @ self.weight + self.bias


def lm_learner():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 16, generator=g); y = (x.mean((1, 2)) > 0).long()
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:48], ds[48:], bs=16, num_workers=0, device=torch.device('cpu'))
    model = nn.Sequential(Conv1D(32, 16), nn.GELU(), Conv1D(16, 32), nn.Flatten(), nn.Linear(80, 2))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)


@pytest.fixture
def registered():
    yield
    GRANULARITIES.pop(Conv1D, None)


def test_conv1d_made_sparse(registered):
    learn = lm_learner()
    with pytest.raises(ValueError, match='Conv1D has no registered granularity'):
        SparsifyCallback(sparsity=30, granularity='weight', context='local', criteria=large_final, schedule=one_cycle,
                         layer_type=Conv1D)
    Granularities.add_granularity(Conv1D, Granularities._granularities_Linear)
    sp_cb = SparsifyCallback(sparsity=30, granularity='weight', context='local', criteria=large_final, schedule=one_cycle,
                             layer_type=Conv1D)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar(): learn.fit_one_cycle(1, 1e-4, cbs=sp_cb)
    text = out.getvalue()
    # measured: floor(0.3 * 512) = 153 weights of each 512-weight layer, 29.88% (fasterai prints its target, 30%)
    assert 'Final Sparsity: 29.88%' in text and 'Conv1D' in text  # the report lists the Conv1D layers
    for m in (learn.model[0], learn.model[2]):
        assert float((m.weight == 0).float().mean()) == pytest.approx(0.3, abs=1 / m.weight.numel())
    assert bool((learn.model[4].weight != 0).all())  # only the Conv1D layers


def test_conv1d_granularities_are_linears_by_position(registered):
    Granularities.add_granularity(Conv1D, Granularities._granularities_Linear)
    m = Conv1D(8, 4)
    assert Granularities.get_dim(m, 'row') == [2] and Granularities.get_dim(m, 'column') == [1]
    sp = Sparsifier(nn.Sequential(m), 'row', 'local', large_final, layer_type=Conv1D)
    sp.sparsify_model(50)
    assert int((m.weight == 0).all(1).sum()) == 2  # 'row' (fasterai's dim 2) sums the nf dim: 2 of the 4 rows go
