"""Launched by test_distributed.py: `torchrun --nproc_per_node 2 dist_script.py OUT_DIR`, on CPU over gloo.

Each rank trains a fastai Learner whose model is wrapped in DistributedDataParallel, with its own data and its own
torch random state, and checks after every mask change that all ranks hold the same masks. Results go to
OUT_DIR/rank{r}.json; what the callback prints goes to the rank's stdout."""
import json, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.callback.core import Callback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from issue6_helpers import fast_learner
from fasterai_sched import SparsifyCallback, Criteria, random, agp, iterative

torch.set_num_threads(1)
# scores that differ on every rank: only the broadcast from rank 0 can make the masks agree
unseeded = Criteria(lambda w: torch.rand_like(w), name='unseeded')
# pruning from the first step (start_epoch=0; agp's and iterative's own windows would open at a fifth of the fit)
CASES = {'random': dict(sparsity=70, criteria=random, schedule=agp, context='global', start_epoch=0),
         'unseeded': dict(sparsity=50, criteria=unseeded, schedule=iterative, granularity='filter', start_epoch=0),
         # issue 12: channels of coupled groups, traced from one batch on each rank; the masks broadcast from rank 0
         'coupled': dict(sparsity=50, criteria=unseeded, schedule=iterative, granularity='filter', start_epoch=0,
                         coupled=True)}


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def flat(tensors) -> torch.Tensor: return torch.cat([t.detach().flatten().float() for t in tensors])


class SameOnEveryRank(Callback):
    "After every mask change, all-gather the masks (and the scores each rank computes) and compare them."
    order = 75  # after SparsifyCallback
    def before_fit(self):
        self.masks, self.changes, self.masks_differ, self.scores_differ = None, 0, 0, 0
    def after_step(self): self.check()
    def check(self):
        sp = self.learn.sparsify.sparsifier
        if sp.masks is self.masks: return
        self.masks, self.changes = sp.masks, self.changes + 1
        ms = gather(flat(sp.masks.values()).to(torch.uint8))
        self.masks_differ += any(not torch.equal(ms[0], m) for m in ms[1:])
        sc = gather(flat(sp.scores().values()))
        self.scores_differ += any(not torch.equal(sc[0], s) for s in sc[1:])


def run(name: str, rank: int) -> dict:
    learn = fast_learner(seed=rank)  # each rank its own data (and init, which DDP replaces by rank 0's)
    learn.model = DDP(learn.model)
    torch.manual_seed(1000 + rank)   # a different random state on every rank
    cb, check = SparsifyCallback(**CASES[name]), SameOnEveryRank()
    with learn.no_bar(): learn.fit(4, 1e-3, cbs=[cb, check])
    weights = gather(flat(learn.model.module.parameters()))
    return dict(changes=check.changes, masks_differ=check.masks_differ, scores_differ=check.scores_differ,
                weights_differ=any(not torch.equal(weights[0], w) for w in weights[1:]),
                final=cb.sparsifier.sparsity(), masked=cb.sparsifier.masked_sparsity(), target=CASES[name]['sparsity'])


if __name__ == '__main__':
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    results = {name: run(name, rank) for name in CASES}
    with open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w') as f: json.dump(results, f)
    dist.barrier()  # every rank is past its last collective
    # leave without destroy_process_group and the interpreter's teardown: there, a gloo thread still joinable once
    # aborted a rank that had done and written everything ('terminate called without an active exception')
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
