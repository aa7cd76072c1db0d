"""Sparsifier: masks, apply, BatchNorm, dtypes, state, exact selection, CUDA, and every bad argument."""
import copy, io, math
import pytest, torch, torch.nn as nn
from hypothesis import given, settings, strategies as st
from fasterai_sched import Sparsifier, Criteria, large_final, random
from fasterai_sched.sparsifier import lowest_k, n_to_prune
from conftest import small_net, cuda

CONVS = ['0', '3', '6']


def randomize_bn_(model):
    "BatchNorm starts at weight 1, bias 0: give it values a zeroing can be seen against."
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm): m.weight.uniform_(0.5, 1.5); m.bias.uniform_(0.5, 1.5)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, snap):
    "Every parameter and buffer bit-equal to the snapshot (NaN equal to NaN)."
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        torch.equal(now[k].isnan(), snap[k].isnan()) and torch.equal(now[k].nan_to_num(), snap[k].nan_to_num())
        if now[k].is_floating_point() else torch.equal(now[k], snap[k]) for k in snap)


# ---- masks ----
@pytest.mark.parametrize('gran,shape', [('weight', (64, 32, 3, 3)), ('kernel', (64, 32, 1, 1)),
                                        ('filter', (64, 1, 1, 1)), ('channel', (64, 1, 3, 3)),
                                        ('shared_kernel', (1, 32, 1, 1)), ('2:4', (64, 32, 3, 3))])
def test_masks_are_boolean_on_the_weight_device(gran, shape):
    model = small_net(c=4)
    sp = Sparsifier(model, gran, 'local', large_final)
    assert sp.masks == {}
    sp.prune(50)
    assert list(sp.masks) == CONVS
    for n, mask in sp.masks.items():
        assert mask.dtype == torch.bool and mask.device == sp.layers[n].weight.device
    assert tuple(sp.masks['3'].shape) == shape


def test_filter_zeroes_bias_and_following_batchnorm():
    model = randomize_bn_(small_net())
    snap = snapshot(model)
    # the BatchNorm a filter feeds is found in the graph traced from example inputs (issue 12)
    sp = Sparsifier(model, 'filter', 'local', large_final, example_inputs=torch.randn(2, 3, 8, 8))
    sp.prune(50)
    assert sp.n_pruned == {'0': 16, '3': 32, '6': 32}
    for conv, bn in [('0', '1'), ('3', '4'), ('6', None)]:
        c = model.get_submodule(conv)
        gone = (c.weight == 0).all(dim=(1, 2, 3))
        assert int(gone.sum()) == sp.n_pruned[conv]
        assert torch.equal(sp.masks[conv].flatten(), ~gone)
        assert not bool(c.bias[gone].any()) and torch.equal(c.bias[~gone], snap[f'{conv}.bias'][~gone])
        if bn:
            b = model.get_submodule(bn)
            for p in ('weight', 'bias'):
                t = getattr(b, p)
                assert not bool(t[gone].any()) and torch.equal(t[~gone], snap[f'{bn}.{p}'][~gone])
            assert torch.equal(b.running_mean, snap[f'{bn}.running_mean'])  # buffers are left alone
    assert torch.equal(model[10].weight, snap['10.weight'])  # the Linear head is no Conv2d: untouched


def test_linear_row_zeroes_bias_and_batchnorm1d():
    model = randomize_bn_(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)))
    sp = Sparsifier(model, 'row', 'local', large_final, layer_type=nn.Linear, example_inputs=torch.randn(2, 6))
    sp.prune(50)
    gone = (model[0].weight == 0).all(1)
    assert int(gone.sum()) == 4
    assert not model[0].bias[gone].any() and not model[1].weight[gone].any() and not model[1].bias[gone].any()
    assert model[1].weight[~gone].all()


@pytest.mark.parametrize('gran', ['weight', 'kernel', 'channel', '1:2'])
def test_other_granularities_leave_bias_and_batchnorm_alone(gran):
    model = randomize_bn_(small_net(c=4))
    snap = snapshot(model)
    Sparsifier(model, gran, 'local', large_final).prune(100)
    for k in snap:
        if not (k.endswith('weight') and k.split('.')[0] in CONVS): assert torch.equal(model.state_dict()[k], snap[k]), k
    for n in CONVS:
        w = model.get_submodule(n).weight
        assert int((w == 0).sum()) == (w.numel() if gran != '1:2' else w.numel() // 2)


def test_apply_restores_zeros_after_weights_change():
    model = randomize_bn_(small_net())
    sp = Sparsifier(model, 'filter', 'global', large_final, example_inputs=torch.randn(2, 3, 8, 8))
    sp.prune(40)
    zero = {k: v == 0 for k, v in snapshot(model).items() if v.is_floating_point() and k.split('.')[0] in '013456'}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):  # real optimizer steps; the extra term gives every parameter a gradient, dead filters too
        loss = model(torch.randn(4, 3, 8, 8)).sum() + sum(p.sum() for p in model.parameters())
        loss.backward(); opt.step(); opt.zero_grad()
    changed = snapshot(model)
    assert any(bool(changed[k][z].any()) for k, z in zero.items() if 'running' not in k)
    sp.apply()
    now = model.state_dict()
    for n in CONVS:
        m = sp.masks[n].expand_as(now[f'{n}.weight'])
        assert not now[f'{n}.weight'][~m].any() and torch.equal(now[f'{n}.weight'][m], changed[f'{n}.weight'][m])
    for k in ['0.bias', '1.weight', '1.bias', '3.bias', '4.weight', '4.bias', '6.bias']:
        keep = sp.masks[{'0': '0', '1': '0', '3': '3', '4': '3', '6': '6'}[k[0]]].flatten()
        assert not now[k][~keep].any() and torch.equal(now[k][keep], changed[k][keep])
    assert sp.sparsity() == pytest.approx(sp.masked_sparsity())


def test_prune_by_dict_in_local_context():
    model = small_net()
    sp = Sparsifier(model, 'weight', 'local', large_final)
    sp.prune({'0': 50, '3': 12.5})
    assert sp.n_pruned == {'0': 432, '3': 2304, '6': 0}
    assert int((model[0].weight == 0).sum()) == 432 and int((model[6].weight == 0).sum()) == 0
    assert sp.sparsity_target == {'0': 50, '3': 12.5}


def test_sparsity_measures_the_weights():
    model = small_net()
    sp = Sparsifier(model, 'weight', 'global', large_final)
    assert sp.sparsity() == 0
    sp.prune(90)
    n = sum(m.weight.numel() for m in sp.layers.values())
    assert sp.sparsity() == 100 * math.floor(0.9 * n) / n == sp.masked_sparsity()
    with torch.no_grad(): model[0].weight.zero_()
    assert sp.sparsity() > sp.masked_sparsity()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('gran,context', [('weight', 'local'), ('filter', 'global'), ('2:4', 'local')])
def test_half_precision_weights(dtype, gran, context):
    model = randomize_bn_(small_net(c=4)).to(dtype)
    sp = Sparsifier(model, gran, context, large_final)
    sp.prune(75)
    units = {n: sp.n_units[n] for n in CONVS}
    if context == 'local': assert sp.n_pruned == {n: n_to_prune(75, u) for n, u in units.items()}
    else: assert sum(sp.n_pruned.values()) == n_to_prune(75, sum(units.values()))
    for n in CONVS:
        w = sp.layers[n].weight
        assert w.dtype == dtype and sp.masks[n].dtype == torch.bool
        per_unit = w.numel() // sp.n_units[n] if gran != '2:4' else 2
        assert int((w == 0).sum()) == sp.n_pruned[n] * per_unit
    with torch.no_grad():
        for p in model.parameters(): p.add_(1)
    sp.apply()
    for n in CONVS:
        w = sp.layers[n].weight
        assert w.dtype == dtype and not w[~sp.masks[n].expand_as(w)].any()
        assert bool((w[sp.masks[n].expand_as(w)] != 0).all())
    assert sp.sparsity() == pytest.approx({'weight': 75, '2:4': 37.5, 'filter': sp.masked_sparsity()}[gran])
    assert sp.sparsity() == pytest.approx(sp.masked_sparsity())


# ---- regrowth, state ----
def test_regrown_weights_restart_from_zero_with_fresh_optimizer_state():
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 8, 8)).sum().backward(); opt.step()
    sp = Sparsifier(model, 'weight', 'local', random, seed=1)
    sp.prune(60, optimizer=opt)
    first = {n: m.clone() for n, m in sp.masks.items()}
    w = model[3].weight
    assert opt.state[w]['exp_avg'][~first['3']].any()  # pruning itself does not clear momentum
    sp.seed = 2  # a criterion that changes its mind: other draws, same target
    sp.prune(60, optimizer=opt)
    regrown = sp.masks['3'] & ~first['3']
    assert int(regrown.sum()) > 0 and torch.equal(sp.regrown['3'], regrown)
    assert not w[regrown].any()
    for v in ('exp_avg', 'exp_avg_sq'): assert not opt.state[w][v][regrown].any()
    kept_both = sp.masks['3'] & first['3']
    assert opt.state[w]['exp_avg'][kept_both].any()


def test_regrown_filters_start_as_new_filters_the_same_in_every_process():
    "A whole filter back from pruning: fresh weights within PyTorch's init bound, bias 0, BatchNorm (1, 0), fresh stats."
    def regrow():
        torch.manual_seed(0)
        model = randomize_bn_(small_net())
        model.train(); model(torch.randn(8, 3, 8, 8))  # running statistics away from (0, 1)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        model(torch.randn(4, 3, 8, 8)).sum().backward(); opt.step()
        sp = Sparsifier(model, 'filter', 'local', random, seed=1, example_inputs=torch.randn(2, 3, 8, 8))
        sp.prune(50, optimizer=opt)
        first = {n: m.clone() for n, m in sp.masks.items()}
        sp.seed = 2  # other draws, same target: some filters come back
        sp.prune(50, optimizer=opt)
        return model, sp, first, opt
    model, sp, first, opt = regrow()
    conv, bn = model[3], model[4]
    back = (sp.masks['3'] & ~first['3']).flatten()
    assert int(back.sum()) > 0
    w = conv.weight[back]
    assert (w != 0).all() and (w.abs() <= 1 / math.sqrt(conv.weight[0].numel())).all()
    assert not conv.bias[back].any() and (bn.weight[back] == 1).all() and not bn.bias[back].any()
    assert not bn.running_mean[back].any() and (bn.running_var[back] == 1).all()
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        for v in ('exp_avg', 'exp_avg_sq'): assert not opt.state[p][v][back].any()
    stayed = (sp.masks['3'] & first['3']).flatten()  # filters kept throughout are untouched by the restart
    assert (bn.weight[stayed] != 1).all() and opt.state[conv.weight]['exp_avg'][stayed].any()
    assert torch.equal(regrow()[0][3].weight, conv.weight)  # seeded draws: every process restarts them alike
    opt.zero_grad(); model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert conv.weight.grad[back].abs().sum() > 0  # and they learn again


def test_any_integer_seed_drives_random_scores_and_restarted_filters():
    for seed in (2 ** 36, -5, 2 ** 70):
        model = small_net()
        sp = Sparsifier(model, 'filter', 'local', random, seed=seed)
        sp.prune(50); sp.seed += 1; sp.prune(50)  # some filters come back, drawn afresh
        assert sp.n_pruned == {n: n_to_prune(50, sp.n_units[n]) for n in CONVS}


def test_grouped_conv_transpose_filters_zero_their_channel_in_every_group():
    "Column j of a grouped ConvTranspose's weight feeds channel j of each group: its bias and BatchNorm go with it."
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)))
    sp = Sparsifier(model, 'filter', 'local', random, layer_type=nn.ConvTranspose2d, seed=3,
                    example_inputs=torch.randn(2, 4, 5, 5))
    sp.prune(34)  # one of the 3 columns
    dead = (~sp.masks['0'].flatten()).repeat(2)
    assert int(dead.sum()) == 2
    model.eval()
    out = model(torch.randn(2, 4, 5, 5))
    assert not out[:, dead].any() and out[:, ~dead].abs().sum((0, 2, 3)).gt(0).all()
    sp.seed = 4; sp.prune(34)  # another column: the first comes back as a new filter, BatchNorm at (1, 0)
    back = sp.masks['0'].flatten().repeat(2) & dead
    assert int(back.sum()) == 2 and (model[1].weight[back] == 1).all() and not model[1].bias[back].any()


def test_state_dict_round_trip_into_a_fresh_sparsifier():
    model = randomize_bn_(small_net())
    sp = Sparsifier(model, 'filter', 'global', 'large_init')
    with torch.no_grad():  # 'training' after set-up: the reference now differs from the weights
        for m in sp.layers.values(): m.weight.mul_(torch.rand_like(m.weight))
    fresh = copy.deepcopy(model)  # the same weights, unpruned
    sp.prune(45)
    sp.save_rewind()
    buf = io.BytesIO(); torch.save(sp.state_dict(), buf); buf.seek(0)
    state = torch.load(buf)
    sp2 = Sparsifier(fresh, 'filter', 'global', 'large_init')
    assert not any(torch.equal(sp2.reference[n], sp.reference[n]) for n in CONVS)
    sp2.load_state_dict(state)
    assert unchanged(fresh, snapshot(model))  # weights, biases and BatchNorms pruned exactly as the original
    assert sp2.masks.keys() == sp.masks.keys() and all(torch.equal(sp2.masks[n], sp.masks[n]) for n in sp.masks)
    assert all(m.dtype == torch.bool for m in sp2.masks.values())
    assert sp2.n_pruned == sp.n_pruned and sp2.sparsity_target == 45
    assert all(torch.equal(sp2.reference[n], sp.reference[n]) for n in sp.reference)
    assert all(torch.equal(sp2.rewind_weights[n], sp.rewind_weights[n]) for n in sp.rewind_weights)
    for n in CONVS:  # biases the load had not seen are zeroed for the pruned filters
        keep = sp.masks[n].flatten()
        assert not fresh.get_submodule(n).bias[~keep].any() and fresh.get_submodule(n).bias[keep].all()
    assert sp2.sparsity() == sp.sparsity() and sp2.masked_sparsity() == pytest.approx(sp.masked_sparsity())
    # the loaded Sparsifier keeps working: apply, and a further prune from the loaded reference
    with torch.no_grad(): fresh[0].weight.add_(1)
    sp2.apply()
    assert not fresh[0].weight[~sp2.masks['0'].expand_as(fresh[0].weight)].any()
    sp.prune(60); sp2.prune(60)
    assert all(torch.equal(sp2.masks[n], sp.masks[n]) for n in sp.masks)
    with pytest.raises(ValueError, match='layers'):
        Sparsifier(small_net()).load_state_dict({'masks': {'9': torch.ones(1, dtype=torch.bool)}})


def test_rewind_resets_surviving_weights():
    model = small_net()
    sp = Sparsifier(model, 'weight', 'local', large_final)
    with pytest.raises(RuntimeError, match='save_rewind'): sp.rewind()
    sp.save_rewind()
    w0 = model[3].weight.detach().clone()
    sp.prune(50)
    with torch.no_grad(): model[3].weight.add_(3)
    sp.rewind()
    m = sp.masks['3']
    assert torch.equal(model[3].weight[m], w0[m]) and not model[3].weight[~m].any()


def test_masks_from_weights_rebuilds_masks_of_a_pruned_model():
    for gran in ['weight', 'filter', '2:4']:
        model = small_net(c=4)
        sp = Sparsifier(model, gran, 'global', large_final); sp.prune(70)
        sp2 = Sparsifier(model, gran, 'global', large_final); sp2.masks_from_weights()
        assert sp2.n_pruned == sp.n_pruned
        assert all(torch.equal(sp2.masks[n].expand_as(sp.layers[n].weight), sp.masks[n].expand_as(sp.layers[n].weight))
                   for n in CONVS)


# ---- exact selection ----
def test_lowest_k_two_million_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 1000, (2_000_000,), generator=g).float()
    order = scores.argsort(stable=True)  # the reference: lower score first, then lower index
    for k in [1, 999, 1_000_000, 1_800_000, 1_999_999]:
        mask = lowest_k(scores, k)
        expected = torch.zeros(2_000_000, dtype=torch.bool); expected[order[:k]] = True
        assert mask.dtype == torch.bool and int(mask.sum()) == k and torch.equal(mask, expected)


def test_lowest_k_edges():
    s = torch.tensor([3., 1., 2., 1.])
    assert torch.equal(lowest_k(s, 0), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(lowest_k(s, 4), torch.ones(4, dtype=torch.bool))
    assert torch.equal(lowest_k(s, 1), torch.tensor([False, True, False, False]))
    assert torch.equal(lowest_k(s, 3), torch.tensor([False, True, True, True]))
    assert torch.equal(lowest_k(torch.tensor([5.]), 1), torch.tensor([True]))
    assert torch.equal(lowest_k(torch.full((5,), 7.), 2), torch.tensor([True, True, False, False, False]))
    assert torch.equal(lowest_k(torch.tensor([0., -0., 0.]), 2), torch.tensor([True, True, False]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=200), st.data())
def test_lowest_k_matches_a_stable_sort(values, data):
    scores = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, len(values)))
    expected = torch.zeros(len(values), dtype=torch.bool); expected[scores.argsort(stable=True)[:k]] = True
    assert torch.equal(lowest_k(scores, k), expected)


def stable_lowest(scores, k):
    "The reference: the k lowest by a stable sort (lower score first, then lower index)."
    out = torch.zeros(scores.numel(), dtype=torch.bool); out[scores.argsort(stable=True)[:k]] = True
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=60), min_size=1, max_size=5), st.data())
def test_global_selection_layer_by_layer_holds_each_best_back(layers, data):
    "lowest_k_held (CPU, no concatenated copy) prunes the k lowest over all layers once each layer's best is held back."
    from fasterai_sched.selection import lowest_k_held
    flat = [torch.tensor(v, dtype=torch.float32) for v in layers]
    k = data.draw(st.integers(0, sum(map(len, layers)) - len(layers)))
    allv = torch.cat(flat)
    starts = torch.tensor([0] + [len(v) for v in layers[:-1]]).cumsum(0)
    allv[starts + torch.stack([v.argmax() for v in flat])] = math.inf  # argmax: the first of equal maxima
    expected = stable_lowest(allv, k).split([len(v) for v in layers])
    got = lowest_k_held(flat, k)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_global_selection_layer_by_layer_large_with_ties():
    "Past the bracketing size too: 3 layers, 1.2M scores with many ties and a block of zeros."
    from fasterai_sched.selection import lowest_k_held
    g = torch.Generator().manual_seed(1)
    flat = [torch.randint(0, 300, (n,), generator=g).float() for n in (600_000, 400_000, 200_000)]
    flat[1][:250_000] = 0
    sizes = [v.numel() for v in flat]
    for k in (1, 250_000, 700_000, 1_199_997):
        allv = torch.cat(flat)
        allv[torch.tensor([0, 600_000, 1_000_000]) + torch.stack([v.argmax() for v in flat])] = math.inf
        assert all(torch.equal(a, b) for a, b in zip(lowest_k_held(flat, k), stable_lowest(allv, k).split(sizes)))


def test_n_to_prune_is_exact():
    assert n_to_prune(90, 8192) == 7372 and n_to_prune(90, 11_166_912) == 10_050_220
    assert n_to_prune(29.70703125, 1024) == 304 and n_to_prune(100, 7) == 7 and n_to_prune(0, 7) == 0
    assert n_to_prune(0.1 * 3 * 100 / 3, 10) == 1  # 10.000000000000002% of 10: floor(1.0000000000000002)
    assert n_to_prune(70, 10) == 7 and n_to_prune(57, 100) == 57  # 57/100*100 is 56.99999999999999 in floats
    assert n_to_prune(0.57 * 100, 100) == 56  # the float 56.99999999999999 itself is below 57


def test_the_same_selection_every_run():
    def masks():
        torch.manual_seed(0); model = small_net()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d): m.weight.copy_(torch.randint(-2, 3, m.weight.shape).float())
        sp = Sparsifier(model, 'kernel', 'global', large_final); sp.prune(55)
        return sp.masks
    a, b = masks(), masks()
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---- CUDA (skipped without a GPU) ----
def int_valued_net(seed=0):
    "Small integer weights: exact in every dtype and in any summation order, with many ties."
    torch.manual_seed(seed)
    model = randomize_bn_(small_net(c=4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d): m.weight.copy_(torch.randint(-8, 9, m.weight.shape).float())
    return model


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('gran,context', [('weight', 'local'), ('weight', 'global'), ('filter', 'global'),
                                          ('kernel', 'local'), ('2:4', 'global')])
def test_cuda_prune_apply_counts_match_cpu(dtype, gran, context):
    cpu_model = int_valued_net().to(dtype)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    sp_cpu = Sparsifier(cpu_model, gran, context, large_final)
    sp_gpu = Sparsifier(gpu_model, gran, context, large_final)
    sp_cpu.prune(70); sp_gpu.prune(70)
    units = sum(sp_gpu.n_units.values())
    if context == 'global': assert sum(sp_gpu.n_pruned.values()) == n_to_prune(70, units)
    else: assert sp_gpu.n_pruned == {n: n_to_prune(70, sp_gpu.n_units[n]) for n in CONVS}
    assert sp_gpu.n_pruned == sp_cpu.n_pruned
    for n in CONVS:
        mask = sp_gpu.masks[n]
        assert mask.dtype == torch.bool and mask.device.type == 'cuda'
        assert torch.equal(mask.cpu(), sp_cpu.masks[n])  # the same selection on both devices
    gpu_sd, cpu_sd = gpu_model.state_dict(), cpu_model.state_dict()
    assert all(torch.equal(gpu_sd[k].cpu(), cpu_sd[k]) for k in cpu_sd)
    with torch.no_grad():  # the same change on both devices: kept weights move, pruned ones must return to zero
        for model in (gpu_model, cpu_model):
            for p in model.parameters(): p.add_(1)
    sp_gpu.apply(); sp_cpu.apply()
    for n in CONVS:
        w = sp_gpu.layers[n].weight
        assert w.dtype == dtype and not w[~sp_gpu.masks[n].expand_as(w)].any()
        assert torch.equal(w.cpu(), sp_cpu.layers[n].weight)
    assert sp_gpu.sparsity() == pytest.approx(sp_cpu.sparsity())
    with torch.no_grad(): gpu_model(torch.randn(2, 4, 8, 8, device='cuda', dtype=dtype))


@cuda
def test_cuda_random_criteria_and_device_move():
    model = small_net().cuda()
    a = Sparsifier(model, 'weight', 'local', random, seed=5).scores()
    b = Sparsifier(model, 'weight', 'local', random, seed=5).scores()
    assert all(torch.equal(a[n], b[n]) and a[n].device.type == 'cuda' for n in a)
    cpu_model = small_net()
    sp = Sparsifier(cpu_model, 'filter', 'local', large_final); sp.prune(50)
    cpu_model.cuda(); sp.to()
    assert all(m.device.type == 'cuda' for m in sp.masks.values())
    with torch.no_grad(): cpu_model[0].weight.add_(1); cpu_model[1].weight.add_(1)
    sp.apply()
    keep = sp.masks['0'].flatten()
    assert not cpu_model[0].weight[~keep].any() and not cpu_model[1].weight[~keep].any()


@cuda
def test_cuda_lowest_k_equals_cpu():
    g = torch.Generator().manual_seed(1)
    for scores in [torch.randint(0, 1000, (2_000_000,), generator=g).float(), torch.rand(100_001, generator=g),
                   torch.full((1000,), 3.)]:
        for k in [1, scores.numel() // 3, scores.numel() // 2, scores.numel() - 1]:
            cpu = lowest_k(scores, k)
            gpu = lowest_k(scores.cuda(), k)
            assert gpu.device.type == 'cuda' and int(gpu.sum()) == k and torch.equal(gpu.cpu(), cpu)


# ---- bad arguments: a clear error naming the argument, before any weight changes ----
def raises_unchanged(model, exc, match, f):
    snap = snapshot(model)
    with pytest.raises(exc, match=match) as e: f()
    assert unchanged(model, snap)
    return str(e.value)


def test_unknown_granularity_lists_valid_names():
    model = small_net()
    msg = raises_unchanged(model, ValueError, "granularity='vector'", lambda: Sparsifier(model, 'vector'))
    assert all(n in msg for n in ["'weight'", "'kernel'", "'filter'", "'channel'"])
    raises_unchanged(model, ValueError, "granularity='rows'", lambda: Sparsifier(model, 'rows'))
    raises_unchanged(model, TypeError, 'granularity', lambda: Sparsifier(model, None))


def test_unknown_context():
    model = small_net()
    msg = raises_unchanged(model, ValueError, "context='globl'", lambda: Sparsifier(model, 'weight', 'globl'))
    assert "'local'" in msg and "'global'" in msg


def test_unknown_criteria():
    model = small_net()
    msg = raises_unchanged(model, ValueError, "criteria='large'", lambda: Sparsifier(model, criteria='large'))
    assert "'large_final'" in msg
    raises_unchanged(model, TypeError, 'criteria', lambda: Sparsifier(model, criteria=torch.abs))


@pytest.mark.parametrize('bad', [-1, -1e-9, 100.5, 1000, math.inf, -math.inf])
def test_sparsity_outside_range(bad):
    model = small_net()
    sp = Sparsifier(model); sp.prune(30)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    raises_unchanged(model, ValueError, r'sparsity=.*\[0, 100\]', lambda: sp.prune(bad))
    assert all(torch.equal(masks[n], sp.masks[n]) for n in masks) and sp.sparsity_target == 30


@pytest.mark.parametrize('bad,exc', [('50', TypeError), (None, TypeError), (True, TypeError), (False, TypeError),
                                     (math.nan, ValueError), (torch.tensor(50.), TypeError), ([50], TypeError)])
def test_sparsity_not_a_number(bad, exc):
    model = small_net()
    sp = Sparsifier(model)
    raises_unchanged(model, exc, 'sparsity', lambda: sp.prune(bad))
    raises_unchanged(model, exc, r"sparsity\['3'\]", lambda: sp.prune({'0': 20, '3': bad}))
    assert sp.masks == {}


def test_dict_with_global_context():
    model = small_net()
    sp = Sparsifier(model, context='global')
    msg = raises_unchanged(model, ValueError, 'sparsity', lambda: sp.prune({'0': 50}))
    assert "context='global'" in msg and "'local'" in msg


def test_dict_naming_a_missing_layer():
    model = small_net()
    sp = Sparsifier(model)
    msg = raises_unchanged(model, ValueError, 'sparsity', lambda: sp.prune({'0': 50, '4': 50, 'head': 10}))
    assert "'4'" in msg and "'head'" in msg and "'3'" in msg  # what is missing, and what is there


def test_model_without_layer_type():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    raises_unchanged(model, ValueError, 'layer_type=Conv2d', lambda: Sparsifier(model))
    raises_unchanged(model, TypeError, 'layer_type', lambda: Sparsifier(model, layer_type='Linear'))


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('gran,context', [('weight', 'local'), ('filter', 'global')])
def test_nan_or_inf_scores_name_the_layer(bad, gran, context):
    model = small_net()
    sp = Sparsifier(model, gran, context); sp.prune(20)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    with torch.no_grad(): model[3].weight[5, 2, 1, 1] = bad
    msg = raises_unchanged(model, ValueError, "'3'", lambda: sp.prune(50))
    assert 'NaN or Inf' in msg and "'0'" not in msg
    assert all(torch.equal(masks[n], sp.masks[n]) for n in masks) and sp.sparsity_target == 20


def test_nan_scores_from_a_user_criteria():
    model = small_net()
    crit = Criteria(lambda w: w.abs() / (w.sum() * 0), name='broken')
    sp = Sparsifier(model, criteria=crit)
    msg = raises_unchanged(model, ValueError, 'broken', lambda: sp.prune(50))
    assert "'0'" in msg


@pytest.mark.parametrize('gran', ['2:4', '3:8'])
def test_nm_pattern_not_dividing_the_layer(gran):
    model = small_net(c=3)  # the first convolution has 3 input channels
    msg = raises_unchanged(model, ValueError, f"granularity='{gran}'", lambda: Sparsifier(model, gran))
    assert "'0'" in msg and f"multiple of {gran[-1]}" in msg
    lin = nn.Sequential(nn.Linear(6, 2))
    raises_unchanged(lin, ValueError, "granularity='2:4'", lambda: Sparsifier(lin, '2:4', layer_type=nn.Linear))


def test_bad_round_to():
    model = small_net()
    for bad in (0, -2, 2.5, True):
        raises_unchanged(model, ValueError, 'round_to', lambda: Sparsifier(model, round_to=bad))
