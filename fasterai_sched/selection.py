"""Exact-count selection: the k lowest scores, ties to the lower index, on any device, fast.

On CPU the passes over the scores run in numpy (single-threaded and SIMD: several times faster than torch's
two-thread comparisons on a loaded 2-core machine); on CUDA they are torch kernels with a few host reads."""
from __future__ import annotations
import functools, math
import numpy as np
import torch

__all__ = ['lowest_k', 'lowest_k_held', 'count_true']

_SAMPLE = 1 << 16  # scores drawn to bracket the k-th smallest (at most, on CPU)
_DIRECT = 1 << 19  # below this many scores, bracketing saves nothing on CUDA
_DIRECT_CPU = 1 << 15  # on CPU it pays from here
_SORT_MAX = 1 << 17  # on CPU, numpy sorts up to this many scores to find a k-th smallest


def _small_kth(x: torch.Tensor, k: int) -> torch.Tensor:
    "The k-th smallest (1-based) of a tensor of moderate size: kthvalue on CPU, a sort on CUDA (kthvalue is slow there)."
    return x.kthvalue(k).values if x.device.type == 'cpu' else x.sort().values[k - 1]


@functools.lru_cache(maxsize=512)  # one per layer size: a model's layers all stay cached
def _sample_positions(n: int, m: int, device: torch.device) -> torch.Tensor:
    "The m fixed random positions `_bracketed_kth` samples from n scores, drawn once per size and device."
    return torch.randint(n, (m,), generator=torch.Generator().manual_seed(n)).to(device)


def _bracketed_kth(scores: torch.Tensor, k: int):
    """The k-th smallest found from a bracket [lo, hi] estimated from a fixed random sample: (value, count of scores
    <= lo, indices and values of the scores in (lo, hi]), with None for the last three when the k-th smallest is lo
    itself, or None when the bracket misses it. The scores equal to lo are counted, not gathered: after a recompute the
    k-th smallest often sits at the edge of the block of zeros of the weights pruned so far. A few host syncs, once per
    selection; every pass over all scores is a comparison or a count."""
    n, m = scores.numel(), _SAMPLE
    sample = scores[_sample_positions(n, m, scores.device)]
    # the k-th smallest sits near rank k*m/n of the sample; 4 standard deviations of that rank either side
    lo_r, hi_r = _sample_bracket(k, n, m)
    if sample.device.type == 'cpu':
        lo = sample.kthvalue(lo_r + 1).values.item() if lo_r >= 0 else -math.inf
        hi = sample.kthvalue(hi_r + 1).values.item() if hi_r < m else math.inf
    else:  # one sort and one read back for both ends
        ends = sample.sort().values[torch.tensor([max(lo_r, 0), min(hi_r, m - 1)], device=sample.device)].tolist()
        lo, hi = (ends[0] if lo_r >= 0 else -math.inf), (ends[1] if hi_r < m else math.inf)
    at_or_below = scores <= lo
    n_le = int(at_or_below.count_nonzero())
    if n_le >= k:  # the k-th smallest is lo itself, or the bracket missed low
        if n_le - int((scores == lo).count_nonzero()) < k: return scores.new_tensor(lo), None, None, None
        return None
    idx = (scores <= hi).logical_xor_(at_or_below).nonzero().squeeze(1)  # lo < s <= hi
    if n_le + idx.numel() < k: return None
    inside = scores[idx]
    return _small_kth(inside, k - n_le), n_le, idx, inside


def _lowest_k_bracketed(scores: torch.Tensor, k: int) -> torch.Tensor:
    "`lowest_k` for 0 < k < n: a single comparison pass over all scores unless ties straddle the k-th smallest."
    got = _bracketed_kth(scores, k) if scores.numel() >= _DIRECT else None
    if got is not None and got[1] is not None:
        t, n_le, idx, inside = got
        if n_le + int((inside <= t).count_nonzero()) == k: return scores <= t
        out = scores < t  # every score equal to t (> lo) is inside the bracket: the lowest indices complete the count
        out[idx[inside == t][:k - n_le - int((inside < t).count_nonzero())]] = True
        return out
    t = _kth_direct(scores, k) if got is None else got[0]
    out = scores <= t
    if out.count_nonzero() == k: return out
    below = scores < t  # ties: the lowest indices among the scores equal to t complete the count
    below[(scores == t).nonzero().squeeze(1)[:k - int(below.count_nonzero())]] = True
    return below


def _kth_direct(scores: torch.Tensor, k: int, topk: bool | None = None) -> torch.Tensor:
    """The k-th smallest (1-based) over all scores, as a 0-d tensor: kthvalue on CPU; on CUDA (or `topk=True`) topk of
    the smaller side, since kthvalue is slow there and quantile refuses large inputs."""
    if not (scores.device.type == 'cuda' if topk is None else topk): return scores.kthvalue(k).values
    n = scores.numel()
    if k <= n - k + 1: return scores.topk(k, largest=False, sorted=False).values.max()
    return scores.topk(n - k + 1, sorted=False).values.min()


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    "The k-th smallest of a 1-d tensor (1-based), as a 0-d tensor: bracketed when the tensor is large."
    got = _bracketed_kth(scores, k) if scores.numel() >= _DIRECT else None
    return _kth_direct(scores, k) if got is None else got[0]


_NUMPY_SCORES = (torch.float32, torch.float64)


def _sample_bracket(k: int, n: int, m: int) -> tuple[int, int]:
    "Ranks in a sample of m (of n scores) that bracket the k-th smallest: 4 standard deviations either side."
    p = k / n
    rank, spread = p * m, 4 * math.sqrt(m * p * (1 - p)) + 2
    return math.floor(rank - spread), math.ceil(rank + spread)


def _nth(a: np.ndarray, r: int, inside: bool = False):
    """The r-th smallest (0-based) of a 1-d array. Inside a bracket (no block of equal scores at its low end):
    np.partition, three times faster than a sort there. Otherwise numpy's SIMD sort for up to a few ten thousand
    scores (np.partition slows down on many equal scores, such as the zeros of pruned weights, and torch.kthvalue is
    5x slower there); torch.kthvalue over more (only when a bracket missed)."""
    if inside: return np.partition(a, r)[r]
    if a.size <= _SORT_MAX: return np.sort(a)[r]
    return torch.from_numpy(a).kthvalue(r + 1).values.item()


def _lowest_k_numpy(x: np.ndarray, k: int) -> np.ndarray:
    "`lowest_k` for 0 < k < n over a 1-d numpy array."
    return _lowest_k_parts([x], k)[0]


def lowest_k_held(scores: list[torch.Tensor], k: int) -> list[torch.Tensor] | None:
    """Global selection on CPU without concatenating: boolean masks, one per 1-d tensor, of exactly the k lowest scores
    over all of them once each tensor's highest (its first, if tied) is held back as if infinite, so no layer empties;
    ties to the lower index in the order given. For k at most the scores left; None where the numpy path does not
    apply (CUDA, other dtypes): the caller concatenates."""
    if not scores or not all(x.device.type == 'cpu' and x.dtype in _NUMPY_SCORES for x in scores): return None
    xs = [x.detach().contiguous().numpy() for x in scores]
    n = sum(x.size for x in xs)
    if not 0 <= k <= n - len(xs): raise ValueError(f"k={k} must be in [0, {n - len(xs)}]: one score per tensor is held back")
    if k == 0: return [torch.zeros(x.size, dtype=torch.bool) for x in xs]
    return [torch.from_numpy(o) for o in _lowest_k_parts(xs, k, [int(np.argmax(x)) for x in xs])]


def _lowest_k_parts(xs: list[np.ndarray], k: int, held: list[int] | None = None) -> list[np.ndarray]:
    """Boolean masks, one per 1-d array, of exactly the k lowest scores over all of them (0 < k), the score at
    `held[i]` of array i left out as if infinite; ties to the lowest index, arrays in order. In few passes over the
    scores: a bracket [lo, hi] from a fixed sample, one count of the scores <= lo, the few scores inside (lo, hi]
    gathered to find the k-th smallest t, one comparison with t. The scores equal to lo are counted, not gathered:
    after a recompute the k-th smallest often sits at the edge of a large block of equal scores (the zeros of the
    weights pruned so far)."""
    n = sum(x.size for x in xs)
    top = [x[i] for x, i in zip(xs, held)] if held else []
    held_if = lambda cond: sum(bool(cond(v)) for v in top)  # held-back scores a count over all scores took in
    join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)
    t = n_le = None
    if n >= _DIRECT_CPU:
        # the sample that balances its own sort against the scores left inside the bracket grows as n^(2/3);
        # drawn from each array in proportion to its size
        m = min(_SAMPLE, max(16, int((2 * n) ** (2 / 3))))
        sample = np.sort(join([x[_sample_positions(x.size, max(1, round(m * x.size / n)), torch.device('cpu')).numpy()]
                               for x in xs]))
        lo_r, hi_r = _sample_bracket(k, n, sample.size)
        lo = sample[lo_r] if lo_r >= 0 else -np.inf
        hi = sample[hi_r] if hi_r < sample.size else np.inf
        le = [x <= lo for x in xs]
        n_le = sum(int(np.count_nonzero(b)) for b in le) - held_if(lambda v: v <= lo)
        if n_le < k:
            for j, (x, b) in enumerate(zip(xs, le)):
                np.logical_and(np.logical_not(b, out=b), x <= hi, out=b)  # lo < x <= hi
                if held: b[held[j]] = False  # a held-back score is never inside
            inside = join([np.extract(b, x) for x, b in zip(xs, le)])  # faster than x[b] for a few percent True
            if n_le + inside.size >= k:
                t = _nth(inside, k - n_le - 1, inside=True)
                n_le += int(np.count_nonzero(inside <= t))
        elif n_le - sum(int(np.count_nonzero(x == lo)) for x in xs) + held_if(lambda v: v == lo) < k:
            t = lo  # the k-th smallest is lo itself
    if t is None:  # small, or the bracket missed: the k-th smallest of all scores but the held-back ones
        t, n_le = _nth(join([np.delete(x, i) for x, i in zip(xs, held)] if held else xs), k - 1), None
    outs = [x <= t for x in xs]
    for o, i, v in zip(outs, held or [], top):
        if v <= t: o[i] = False
    if n_le is None: n_le = sum(int(np.count_nonzero(o)) for o in outs)
    if n_le != k:  # ties straddle the k-th smallest: the lowest indices among the scores equal to t complete the count
        need = k
        for j, (x, o) in enumerate(zip(xs, outs)):
            np.less(x, t, out=o)
            if held: o[held[j]] = False
            need -= int(np.count_nonzero(o))
        for j, (x, o) in enumerate(zip(xs, outs)):
            if need <= 0: break
            eq = np.flatnonzero(x == t)
            if held: eq = eq[eq != held[j]]
            o[eq[:need]] = True; need -= eq[:need].size
    return outs


def count_true(masks: list[torch.Tensor]) -> list[int]:
    "How many True each boolean tensor holds: numpy's count on CPU (torch's is 10x slower there), one host read on CUDA."
    if not masks: return []
    if all(m.device.type == 'cpu' for m in masks):
        return [int(np.count_nonzero(m.numpy())) if m.is_contiguous() else int(m.count_nonzero()) for m in masks]
    return torch.stack([m.count_nonzero() for m in masks]).tolist()


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the `k` lowest of a 1-d tensor; among equal scores the lower index goes first.
    It reads the counts it needs back to the host (masks change only at recomputes, never per step)."""
    n = scores.numel()
    if k <= 0: return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n: return torch.ones(n, dtype=torch.bool, device=scores.device)
    if scores.device.type == 'cpu' and scores.dtype in _NUMPY_SCORES:
        return torch.from_numpy(_lowest_k_numpy(scores.detach().contiguous().numpy(), k))
    return _lowest_k_bracketed(scores, k)
