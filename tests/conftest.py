"""Small real fastai learners over in-memory data, shared by the tests."""
import contextlib, io, re, warnings
import pytest, torch, torch.nn as nn
from fastai.vision.all import DataLoaders, Learner, CrossEntropyLossFlat, accuracy

warnings.filterwarnings('ignore')
torch.set_num_threads(1)
EPOCH_RE = re.compile(r"Sparsity at the end of epoch (\d+): ([\d.]+)%")


def small_net(c=3):
    "Three convolutions, BatchNorms after the first two, and a linear head."
    return nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))


def even_net(c=8):
    "Convolutions whose filters all hold the same number of weights, so unit and weight fractions agree."
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 2))


def small_dls(n=96, bs=24, size=8, c=3, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g); y = (x.mean((1, 2, 3)) > 0).long()
    ds = list(zip(x, y)); cut = int(n * .75)
    return DataLoaders.from_dsets(ds[:cut], ds[cut:], bs=bs, num_workers=0, device=torch.device(device))


def small_learner(seed=0, model=None, c=3, device='cpu', **kw):
    torch.manual_seed(seed)
    return Learner(small_dls(seed=seed, c=c, device=device), model or small_net(c), loss_func=CrossEntropyLossFlat(),
                   metrics=accuracy, **kw)


def fit_capture(learn, n, cbs, lr=1e-3, **kw):
    "Fit without a progress bar; return what was printed."
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar():
        learn.fit(n, lr, cbs=cbs, **kw)
    return out.getvalue()


def epoch_lines(text):
    return [float(v) for _, v in EPOCH_RE.findall(text)]


def printed(f):
    "What calling `f()` prints."
    out = io.StringIO()
    with contextlib.redirect_stdout(out): f()
    return out.getvalue()


def filters_gone(m): return int((m.weight == 0).all(dim=(1, 2, 3)).sum())


def conv_sparsity(model, layer_type=nn.Conv2d):
    ws = [m.weight for m in model.modules() if isinstance(m, layer_type)]
    return 100. * sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
