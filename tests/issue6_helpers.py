"""Learners for the issue-6 tests: like conftest's, but exportable (fastai `Datasets`) and without loader worker processes."""
import torch
from fastai.data.core import Datasets
from fasttransform import Transform
from fastai.vision.all import Learner, CrossEntropyLossFlat, accuracy
from conftest import small_net


class Pick(Transform):
    "Item `i` of an in-memory tensor."
    def __init__(self, t): self.t = t
    def encodes(self, i: int): return self.t[i]


def fast_dls(n=96, bs=24, size=8, c=3, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g); y = (x.mean((1, 2, 3)) > 0).long()
    cut = int(n * .75)
    dsets = Datasets(range(n), [[Pick(x)], [Pick(y)]], splits=[list(range(cut)), list(range(cut, n))])
    return dsets.dataloaders(bs=bs, num_workers=0, device=torch.device(device))


def fast_learner(seed=0, model=None, c=3, device='cpu', n=96, bs=24, **kw):
    "A real fastai Learner over small random images; `seed` fixes data and init."
    torch.manual_seed(seed)
    return Learner(fast_dls(n, bs, c=c, seed=seed, device=device), model or small_net(c), loss_func=CrossEntropyLossFlat(),
                   metrics=accuracy, **kw)
