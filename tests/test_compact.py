"""compact(): a smaller model with the masked model's outputs, on torchvision's families and vision_learner models;
compact=True through a fastai fit and export; save_sparse/load_sparse; ONNX; compaction_report; bad input."""
import copy, io, random, warnings
import pytest, torch, torch.nn as nn
import torchvision.models as tvm
from fastai.vision.all import vision_learner, load_learner, accuracy
from fasterai_sched import (Sparsifier, SparsifyCallback, compact, compaction_report, save_sparse, load_sparse,
                            large_final, agp, one_shot)
from fasterai_sched.compact import count_macs, max_relative_difference, pruned_channels, _outputs
from conftest import small_learner, small_net, fit_capture, cuda

torch.set_num_threads(1)


def randomize_stats_(model):
    "BatchNorm statistics away from (0, 1), as after training, so that a wrong removal shows in the outputs."
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - .5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + .5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - .5)
    return model


def n_params(m): return sum(p.numel() for p in m.parameters())


FAMILIES = {'resnet18': (tvm.resnet18, nn.Conv2d), 'mobilenet_v2': (tvm.mobilenet_v2, nn.Conv2d),
            'efficientnet_b0': (tvm.efficientnet_b0, nn.Conv2d), 'regnet_x_400mf': (tvm.regnet_x_400mf, nn.Conv2d),
            'densenet121': (tvm.densenet121, nn.Conv2d), 'vgg11_bn': (tvm.vgg11_bn, nn.Conv2d),
            'googlenet': (lambda **kw: tvm.googlenet(aux_logits=False, init_weights=True, **kw), nn.Conv2d),
            'squeezenet1_1': (tvm.squeezenet1_1, nn.Conv2d), 'mnasnet0_5': (tvm.mnasnet0_5, nn.Conv2d),
            'convnext_tiny': (tvm.convnext_tiny, nn.Linear)}


@pytest.mark.parametrize('name', list(FAMILIES))
def test_compacted_outputs_equal_the_masked_models(name):
    make, layer_type = FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_stats_(make(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    sp = Sparsifier(model, 'filter', 'local', large_final, layer_type=layer_type, coupled=True, example_inputs=x)
    sp.prune(50)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(model, x)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())  # the input untouched
    assert n_params(small) < n_params(model) and count_macs(small, x) < count_macs(model, x)
    assert max_relative_difference(_outputs(model, x), _outputs(small, x)) <= 1e-4
    assert sum(pruned_channels(small, x).values()) == 0  # nothing pruned is left


def test_vision_learner_model_compacts_and_keeps_its_outputs():
    learn = small_learner(model=None)
    learn = vision_learner(learn.dls, tvm.resnet18, pretrained=False, n_out=2, loss_func=nn.CrossEntropyLoss())
    x = torch.randn(2, 3, 32, 32)
    model = randomize_stats_(learn.model).eval()
    Sparsifier(model, 'filter', 'local', large_final, coupled=True, example_inputs=x).prune(50)
    small = compact(model, x)
    assert n_params(small) < 0.5 * n_params(model)
    assert max_relative_difference(_outputs(model, x), _outputs(small, x)) <= 1e-4
    assert small[1][2].num_features == 512  # the head's BatchNorm1d after the concat pool: 2 x 256 channels kept


def test_compact_keeps_train_mode_and_does_not_touch_the_input():
    model = small_net()
    x = torch.randn(2, 3, 8, 8)
    Sparsifier(model, 'filter', 'local', large_final, coupled=True, example_inputs=x).prune(50)
    model.train()
    small = compact(model, x)
    assert small.training and model.training and small is not model
    assert small[0].out_channels == 16 and small[3].in_channels == 16 and small[4].num_features == 32


# ---- bad input ----
def test_compact_on_a_model_with_no_pruned_channel_raises_and_changes_nothing():
    model = small_net()
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Sequential has no pruned channel to remove"):
        compact(model, torch.randn(2, 3, 8, 8))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_compact_needs_example_inputs_and_a_traceable_model():
    model = small_net()
    with pytest.raises(ValueError, match="example_inputs=None"): compact(model, None)
    with pytest.raises(ValueError, match="torch-pruning could not trace Sequential"): compact(model, torch.randn(2, 4, 8, 8))


def test_compact_refuses_a_model_with_a_layer_outside_the_trace():
    model = tvm.googlenet(num_classes=3, aux_logits=True, init_weights=True)  # aux heads run only in training
    with torch.no_grad(): model.conv1.conv.weight[:8] = 0; model.conv1.bn.weight[:8] = 0; model.conv1.bn.bias[:8] = 0
    with pytest.raises(ValueError, match="compact: layer 'aux1.conv.conv' is not in torch-pruning's trace of GoogLeNet"):
        compact(model, torch.randn(2, 3, 64, 64))


def test_compact_refuses_a_removal_that_would_change_the_outputs():
    "A filter zeroed without its BatchNorm: the channel is BatchNorm's shift, not zero, so removing it is refused."
    model = randomize_stats_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 1), nn.Flatten()))
    with torch.no_grad(): model[0].weight[1] = 0; model[0].bias[1] = 0   # sigmoid(0) = 0.5 reaches the next conv
    with pytest.raises(ValueError, match="does not compute what the masked model computes"):
        compact(model, torch.randn(2, 3, 5, 5))


# ---- through a fastai fit, and export ----
def test_compact_true_hands_back_the_small_model_after_the_fit_and_exports(tmp_path):
    from fasterai_sched.demo import digits_dls
    dls = digits_dls(size=16, bs=16, max_images=120)
    learn = vision_learner(dls, tvm.resnet18, pretrained=False, metrics=accuracy, path=tmp_path)
    dense_params = n_params(learn.model)
    cb = SparsifyCallback(sparsity=50, granularity='filter', schedule=agp, coupled=True, compact=True)
    x = dls.valid.one_batch()[0][:4]
    learn.model.eval()
    out = fit_capture(learn, 2, [cb])
    assert "Compacted: " in out
    assert n_params(learn.model) < 0.5 * dense_params
    # the optimizer was re-created over the small model's parameters: a further fit trains it
    assert {id(p) for g in learn.opt.param_groups for p in g['params']} == {id(p) for p in learn.model.parameters()}
    learn.fit(1, 1e-3)
    learn.export('small.pkl')
    back = load_learner(tmp_path / 'small.pkl')
    assert n_params(back.model) == n_params(learn.model)
    learn.model.eval(); back.model.eval()
    with torch.no_grad(): assert torch.allclose(learn.model(x), back.model(x.cpu()), atol=1e-5)


def test_compact_true_outputs_equal_the_masked_model_at_the_end_of_the_fit():
    learn = small_learner()
    cb = SparsifyCallback(sparsity=50, granularity='filter', schedule=one_shot, coupled=True, compact=True, verbose=False)
    masked = {}
    orig = cb._compact
    def spy():
        masked['model'] = copy.deepcopy(learn.model)
        orig()
    cb._compact = spy
    fit_capture(learn, 2, [cb])
    x = torch.randn(4, 3, 8, 8)
    assert max_relative_difference(_outputs(masked['model'], x), _outputs(learn.model, x)) <= 1e-4
    assert learn.model[0].out_channels == 16


@pytest.mark.parametrize('kw, err, match', [
    (dict(granularity='weight', coupled=True), ValueError, "coupled=True prunes whole output channels: it needs granularity='filter', got granularity='weight'"),
    (dict(granularity='filter', compact=True), ValueError, "compact=True needs coupled=True"),
    (dict(granularity='filter', coupled='yes'), TypeError, "coupled='yes' must be True or False"),
    (dict(granularity='filter', coupled=True, compact=True, model=nn.Linear(2, 2)), ValueError, "compact=True replaces learn.model"),
    (dict(granularity='filter', coupled=True, compact=True, sparsity=0), ValueError,
     r"compact=True: this schedule ends at 0% \(sparsity=0.0, schedule='one_shot'\)"),
    (dict(granularity='filter', coupled=True, compact=True, schedule=__import__('fasterai_sched').dsd), ValueError,
     "compact=True: this schedule ends at 0%"),
])
def test_callback_structure_arguments_are_checked_when_built(kw, err, match):
    with pytest.raises(err, match=match): SparsifyCallback(**{'sparsity': 50, **kw})


def test_coupled_callback_leaves_the_data_order_and_random_states_alone():
    "Tracing takes one batch: the fit must see the same batches and draws as without it."
    runs = []
    for coupled in (False, True):
        random.seed(1)  # the loaders draw their own generators from python's
        learn = small_learner(seed=1)
        seen = []
        learn.add_cb(type('Spy', (__import__('fastai').callback.core.Callback,), {'before_batch': lambda self: seen.append(self.learn.y.clone())})())
        cbs = [SparsifyCallback(sparsity=50, granularity='filter', schedule=one_shot, coupled=True, verbose=False)] if coupled else []
        fit_capture(learn, 2, cbs)
        runs.append(torch.cat(seen))
    assert torch.equal(*runs)


def test_taking_a_batch_for_the_trace_keeps_every_random_state():
    from fasterai_sched.callback import _random_states_kept
    import numpy as np
    dl = small_learner().dls.train  # shuffled: drawing from it moves its own generator
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(), dl.rng.getstate())
    with _random_states_kept(dl):
        dl.one_batch(); random.random(); np.random.rand(); torch.rand(2)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state(), dl.rng.getstate())
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])
    assert before[3] == after[3]


# ---- sparse storage ----
def test_save_sparse_round_trip_is_bit_identical_and_small(tmp_path):
    model = tvm.resnet18()
    Sparsifier(model, 'weight', 'local', large_final, layer_type=nn.Conv2d).prune(90)
    Sparsifier(model, 'weight', 'local', large_final, layer_type=nn.Linear).prune(90)
    dense = tmp_path / 'dense.pth'; torch.save(model.state_dict(), dense)
    size = save_sparse(model, tmp_path / 'sparse.pth')
    assert size == (tmp_path / 'sparse.pth').stat().st_size and size <= dense.stat().st_size / 5
    back = load_sparse(tmp_path / 'sparse.pth', tvm.resnet18())
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert set(load_sparse(tmp_path / 'sparse.pth')) == set(model.state_dict())


def test_load_sparse_refuses_another_file(tmp_path):
    torch.save({'a': torch.zeros(2)}, tmp_path / 'x.pth')
    with pytest.raises(ValueError, match="is not a file written by save_sparse"): load_sparse(tmp_path / 'x.pth')


# ---- ONNX ----
def test_onnx_export_of_a_compacted_model_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip('onnx'); ort = pytest.importorskip('onnxruntime')
    model = randomize_stats_(tvm.mobilenet_v2(num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    Sparsifier(model, 'filter', 'local', large_final, coupled=True, example_inputs=x).prune(50)
    small = compact(model, x).eval()
    path = str(tmp_path / 'small.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(small, (x,), path, input_names=['x'], output_names=['y'], dynamo=False)
    onnx.checker.check_model(onnx.load(path))
    got = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})[0]
    with torch.no_grad(): want = model(x)
    assert max_relative_difference([want], [torch.from_numpy(got)]) <= 1e-4


# ---- what it buys ----
def test_compaction_report_measures_both_models(capsys):
    model = small_net()
    x = torch.randn(2, 3, 16, 16)
    Sparsifier(model, 'filter', 'local', large_final, coupled=True, example_inputs=x).prune(50)
    small = compact(model, x)
    rep = compaction_report(model, small, x, batch_sizes=(1, 4), runs=3)
    out = capsys.readouterr().out
    for key in ('params', 'MACs', 'file bytes', 'latency bs=1 (ms)', 'latency bs=4 (ms)'): assert key in rep and key in out
    assert rep['params']['dense'] == n_params(model) and rep['params']['small'] == n_params(small)
    assert rep['MACs']['small'] == count_macs(small, x[:1]) and rep['MACs']['ratio'] > 2
    assert rep['file bytes']['ratio'] > 2 and all(r['dense'] > 0 and r['small'] > 0 for r in rep.values())
    assert count_macs(nn.Linear(10, 3), torch.randn(1, 10)) == 30


# ---- the main job and the bench ----
def test_main_job_with_coupled_compact_ends_with_the_table_and_the_latency_plot(tmp_path, capsys):
    from fasterai_sched.demo import main
    out = tmp_path / 'out'
    code = main(['--epochs', '2', '--start-epoch', '1', '--size', '16', '--max-images', '100', '--bs', '32',
                 '--schedules', 'one_shot', '--seed', '0', '--device', 'cpu', '--granularity', 'filter',
                 '--sparsity', '50', '--coupled', '--compact', '--out', str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "coupled=True, compact=True" in text and "Compacted: 11,708,992 parameters -> " in text
    for key in ('params', 'MACs', 'file bytes', 'latency bs=1 (ms)', 'latency bs=32 (ms)'): assert key in text
    assert (out / 'accuracy_latency.png').stat().st_size > 0
    row = next(l for l in text.splitlines() if l.startswith('one_shot '))
    assert float(row.split()[1].rstrip('%')) > 50  # the sparsity measured before removal: in and out slices


@pytest.mark.parametrize('args, option', [(['--coupled'], '--coupled'), (['--granularity', 'filter', '--compact'], '--compact')])
def test_main_job_refuses_coupled_without_filter_and_compact_without_coupled(tmp_path, capsys, args, option):
    from fasterai_sched.demo import main
    code = main(args + ['--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fasterai-sched: error: {option}") and not (tmp_path / 'out').exists()


def test_bench_compact_subcommand(capsys):
    from fasterai_sched.bench import main
    res = main(['compact', '--archs', 'resnet18', '--size', '32', '--runs', '1', '--round-to', 'none,16', '--json'])
    rows = res['rows']
    assert [r['round_to'] for r in rows] == [None, 16] and all(r['max_rel_diff'] <= 1e-4 for r in rows)
    assert all(r['mac_ratio'] > 2 and r['speedup_bs1'] > 0 and r['ms_small_bs32'] > 0 for r in rows)
    assert rows[0]['params'] < rows[0]['params_dense']
    assert '"rows"' in capsys.readouterr().out


# ---- coupled pruning through the callback: schedules and resume ----
def test_coupled_callback_follows_the_schedule_in_channels_and_resumes(tmp_path):
    from fastai.callback.tracker import SaveModelCallback
    from issue6_helpers import fast_learner
    from conftest import epoch_lines
    kw = dict(sparsity=50, granularity='filter', schedule=agp, start_epoch=1, coupled=True)
    learn = fast_learner(path=tmp_path)
    cb = SparsifyCallback(**kw)
    full = fit_capture(learn, 4, [cb, SaveModelCallback(every_epoch=True)])
    sp = cb.sparsifier
    assert sp.n_pruned == {'0': 16, '3': 32, '6': 32}  # half of each group's channels (the head keeps its inputs' count)
    lines = epoch_lines(full)
    assert lines[0] == 0 and lines == sorted(lines) and lines[-1] > 50  # in and out slices: more weights than channels
    back = fast_learner(seed=1, path=tmp_path)  # another init: everything comes from the checkpoint
    back.load('model_1')
    at_save = {n: ~g.zero_channels() for n, g in Sparsifier(back.model, 'filter', coupled=True,
                                                             example_inputs=torch.randn(2, 3, 8, 8)).groups.items()}
    assert sum(int((~k).sum()) for k in at_save.values()) > 0
    cb2 = SparsifyCallback(**kw)
    out = fit_capture(back, 4, [cb2], start_epoch=2)
    assert epoch_lines(out) == lines[2:]
    assert cb2.sparsifier.n_pruned == sp.n_pruned
    for n, kept in at_save.items(): assert not (cb2.sparsifier.masks[n] & ~kept).any(), n  # pruned at the save: still


@cuda
def test_coupled_pruning_and_compaction_on_cuda():
    model = randomize_stats_(tvm.resnet18(num_classes=3)).cuda().eval()
    x = torch.randn(2, 3, 32, 32, device='cuda')
    sp = Sparsifier(model, 'filter', 'global', large_final, coupled=True, example_inputs=x)
    sp.prune(50)
    assert all(m.device.type == 'cuda' for m in sp.masks.values()) and sum(sp.n_pruned.values()) == 1440
    small = compact(model, x)
    assert next(small.parameters()).is_cuda and n_params(small) < n_params(model)
    assert max_relative_difference(_outputs(model, x), _outputs(small, x)) <= 1e-4
