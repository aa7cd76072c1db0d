"""Launched by test_rigl.py: `torchrun --nproc_per_node 2 dist_rigl_script.py OUT_DIR`, on CPU over gloo.

Case 'ddp': RigL, the model in DistributedDataParallel (gradients averaged). Case 'local': RigL, each rank trains its
own copy on its own data, so the gradients RigL grows by differ between ranks; the masks must still agree (rank 0's).
Cases 'lamp' (agp, global LAMP scores) and 'acdc_erk' (AC/DC over ERK targets) train each rank's own copy too."""
import json, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.callback.core import Callback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from issue6_helpers import fast_learner
from functools import partial
from fasterai_sched import RigLCallback, SparsifyCallback, allocate, lamp, agp, acdc
from fasterai_sched.sparsifier import n_to_prune

torch.set_num_threads(1)


def gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


class SameOnEveryRank(Callback):
    "After every mask change: all-gather the masks and the gradients and compare them; check the counts."
    order = 75
    def __init__(self, cb): self.cb = cb
    def before_fit(self): self.last, self.changes, self.masks_differ, self.grads_differ, self.exact = None, 0, 0, 0, True
    def before_step(self):
        sp = self.cb.sparsifier
        if sp.masks is self.last or not sp.masks: return
        self.last, self.changes = sp.masks, self.changes + 1
        ms = gather(torch.cat([m.flatten() for m in sp.masks.values()]).to(torch.uint8))
        self.masks_differ += any(not torch.equal(ms[0], m) for m in ms[1:])
        gs = gather(torch.cat([m.weight.grad.flatten() for m in sp.layers.values()]))
        self.grads_differ += any(not torch.equal(gs[0], g) for g in gs[1:])
        self.exact &= sum(sp.n_pruned.values()) == self.cb.expected_pruned(self.cb._mask_target)


def expected(cb, target):
    "Units the target asks for: per layer for a number or a dict in local context, all together in global context."
    sizes = {n: m.weight.numel() for n, m in cb.sparsifier.layers.items()}
    if isinstance(target, dict): return sum(n_to_prune(target[n], k) for n, k in sizes.items())
    if cb.context == 'global': return n_to_prune(target, sum(sizes.values()))
    return sum(n_to_prune(target, k) for k in sizes.values())


def make(case, model):
    if case in ('ddp', 'local'): return RigLCallback(70, delta=2, stop=1.)
    if case == 'lamp': return SparsifyCallback(sparsity=70, context='global', criteria=lamp, schedule=agp)
    return SparsifyCallback(sparsity=allocate(model, 70, 'erk'), schedule=partial(acdc, n_cycles=2))


def run(case: str, rank: int) -> dict:
    learn = fast_learner(seed=rank)
    if case == 'ddp': learn.model = DDP(learn.model)
    torch.manual_seed(1000 + rank)
    cb = make(case, learn.model)
    cb.expected_pruned = partial(expected, cb)
    check = SameOnEveryRank(cb)
    with learn.no_bar(): learn.fit(3, 1e-2, cbs=[cb, check])
    return dict(updates=len(getattr(cb, 'updates', [])), changes=check.changes, masks_differ=check.masks_differ,
                grads_differ=check.grads_differ, counts_exact=check.exact)


if __name__ == '__main__':
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    results = {case: run(case, rank) for case in ('ddp', 'local', 'lamp', 'acdc_erk')}
    with open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w') as f: json.dump(results, f)
    dist.barrier()  # every rank is past its last collective
    # leave without destroy_process_group and the interpreter's teardown: there, a gloo thread still joinable once
    # aborted a rank that had done and written everything ('terminate called without an active exception')
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
