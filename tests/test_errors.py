"""Issue 6, bad input: every row of the table in docs/errors.md raises what the table says, before any weight changes."""
import contextlib, re
from pathlib import Path
import pytest, torch, torch.nn as nn
from fasterai_sched import SparsifyCallback, Sparsifier, Criteria, agp, Schedule, sched_agp, sched_dsd, wanda, large_init, taylor
from fasterai_sched import RigLCallback
from fasterai_sched.allocation import allocate, erk
from fasterai_sched.sweep import build_callback, parse_method
from issue6_helpers import fast_learner

DOC = Path(__file__).parents[1] / 'docs' / 'errors.md'

# (argument, call, exception, message): the call runs with the names of `namespace()`; the message is the text the
# error carries (fastai prefixes the errors raised inside a fit with the event's name); a final '…' marks a beginning.
ROWS = [
    # SparsifyCallback(...), when it is built
    ('sparsity', "SparsifyCallback()", TypeError,
     "SparsifyCallback needs sparsity (or end_sparsity), a percent such as 90"),
    ('sparsity', "SparsifyCallback(sparsity='90')", TypeError,
     "sparsity='90' must be a number, a percentage in [0, 100]"),
    ('sparsity', "SparsifyCallback(sparsity=True)", TypeError,
     "sparsity=True must be a number, a percentage in [0, 100]"),
    ('sparsity', "SparsifyCallback(sparsity=150)", ValueError,
     "sparsity=150 is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('sparsity', "SparsifyCallback(sparsity=-5)", ValueError,
     "sparsity=-5 is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('sparsity', "SparsifyCallback(sparsity=float('nan'))", ValueError,
     "sparsity=nan is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('sparsity', "SparsifyCallback(sparsity={'0': 150})", ValueError,
     "sparsity['0']=150 is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('sparsity', "SparsifyCallback(sparsity={'0': 50}, context='global')", ValueError,
     "sparsity as a dict needs context='local', got context='global'"),
    ('sparsity, end_sparsity', "SparsifyCallback(sparsity=90, end_sparsity=80)", TypeError,
     "pass either sparsity or end_sparsity, not both (sparsity=90, end_sparsity=80)"),
    ('start_sparsity', "SparsifyCallback(sparsity=90, start_sparsity=101)", ValueError,
     "start_sparsity=101 is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('granularity', "SparsifyCallback(sparsity=90, granularity='rows')", ValueError,
     "granularity='rows' is not known for Conv2d; valid: ['channel', 'column', 'filter', 'horizontal_slice', 'kernel'…"),
    ('granularity', "SparsifyCallback(sparsity=90, granularity=3)", TypeError, "granularity must be a string, got 3"),
    ('granularity', "SparsifyCallback(sparsity=90, granularity='4:2')", ValueError,
     "granularity='4:2': an 'N:M' pattern needs 0 < N < M"),
    ('context', "SparsifyCallback(sparsity=90, context='glob')", ValueError,
     "context='glob' is not allowed; use 'local' or 'global'"),
    ('criteria', "SparsifyCallback(sparsity=90, criteria='biggest')", ValueError,
     "criteria='biggest' is not known; valid: ['grad_crit', 'large_final', 'large_init'…"),
    ('criteria', "SparsifyCallback(sparsity=90, criteria=abs)", TypeError,
     "criteria=<built-in function abs> must be a Criteria (such as large_final) or one of ['grad_crit', 'large_final'…"),
    ('schedule', "SparsifyCallback(sparsity=90, schedule='agp')", TypeError,
     "schedule='agp' must be a function f(start, end, pos)"),
    ('schedule, sched_func', "SparsifyCallback(sparsity=90, schedule=agp, sched_func=agp)", TypeError,
     "pass either schedule or sched_func, not both"),
    ('start_epoch', "SparsifyCallback(sparsity=90, start_epoch=-1)", ValueError,
     "start_epoch=-1 must be an integer >= 0"),
    ('start_epoch', "SparsifyCallback(sparsity=90, start_epoch=1.5)", ValueError,
     "start_epoch=1.5 must be an integer >= 0"),
    ('end_epoch', "SparsifyCallback(sparsity=90, end_epoch=0)", ValueError,
     "end_epoch=0 must be an integer >= 1 or None"),
    ('end_epoch', "SparsifyCallback(sparsity=90, start_epoch=2, end_epoch=2)", ValueError,
     "end_epoch=2 must be after start_epoch=2"),
    ('lth', "SparsifyCallback(sparsity=90, lth='yes')", TypeError, "lth='yes' must be True or False"),
    ('reset_end', "SparsifyCallback(sparsity=90, reset_end=1)", TypeError, "reset_end=1 must be True or False"),
    ('verbose', "SparsifyCallback(sparsity=90, verbose=None)", TypeError, "verbose=None must be True or False"),
    ('rewind_epoch', "SparsifyCallback(sparsity=90, lth=True, rewind_epoch=-1)", ValueError,
     "rewind_epoch=-1 must be an integer >= 0"),
    ('rewind_epoch', "SparsifyCallback(sparsity=90, rewind_epoch=2)", ValueError,
     "rewind_epoch=2 has no effect without lth=True or reset_end=True"),
    ('rewind_epoch', "SparsifyCallback(sparsity=90, lth=True, start_epoch=1, rewind_epoch=2)", ValueError,
     "with lth=True, rewind_epoch=2 must be <= 1, the epoch pruning starts (start_epoch=1, start_sparsity=0): "
     "earlier masks could not be rewound"),
    ('model', "SparsifyCallback(sparsity=90, model='net')", TypeError,
     "model='net' must be None (the learner's model) or an nn.Module"),
    ('round_to', "SparsifyCallback(sparsity=90, round_to=0)", ValueError,
     "round_to=0 must be None or a positive integer"),
    ('layer_type', "SparsifyCallback(sparsity=90, layer_type='Conv2d')", TypeError,
     "layer_type='Conv2d' must be an nn.Module subclass such as nn.Conv2d"),
    ('layer_type', "SparsifyCallback(sparsity=90, layer_type=nn.BatchNorm2d)", ValueError,
     "layer_type=BatchNorm2d has no registered granularity; register one with register_granularity or use one of […"),
    ('frequency', "SparsifyCallback(sparsity=90, frequency=0)", ValueError,
     "frequency=0 must be an integer >= 1 or None"),
    ('max_lag', "SparsifyCallback(sparsity=90, max_lag=1.5)", ValueError,
     "max_lag=1.5 must be a share of the schedule's span in [0, 1] (0.05 keeps the masks within 5% of start_sparsity "
     "-> sparsity of the target) or None (no such bound)"),
    ('seed', "SparsifyCallback(sparsity=90, seed=1.5)", TypeError, "seed=1.5 must be an integer"),
    ('(a misspelt name)', "SparsifyCallback(sparsity=90, sparse=80)", TypeError,
     "got an unexpected keyword argument 'sparse'"),
    # SparsifyCallback, in before_fit (it needs the learner) or at the first mask change
    ('start_epoch', "learn.fit(3, cbs=SparsifyCallback(sparsity=90, start_epoch=3))", ValueError,
     "start_epoch=3 is past the end of this fit of 3 epochs (allowed: 0 to 2)"),
    ('end_epoch', "learn.fit(3, cbs=SparsifyCallback(sparsity=90, end_epoch=5))", ValueError,
     "end_epoch=5 is past the end of this fit of 3 epochs"),
    ('rewind_epoch', "learn.fit(3, cbs=SparsifyCallback(sparsity=90, reset_end=True, rewind_epoch=3))", ValueError,
     "rewind_epoch=3 is past the end of this fit of 3 epochs (allowed: 0 to 2)"),
    ('sparsity', "learn.fit(2, cbs=SparsifyCallback(sparsity={'head': 50}))", ValueError,
     "sparsity names layers the model has not: ['head']; pruned layers: ['0', '3', '6']"),
    ('granularity', "learn.fit(2, cbs=SparsifyCallback(sparsity=50, granularity='2:4'))", ValueError,
     "granularity='2:4' needs the input dimension of layer '0' (shape (32, 3, 3, 3), dim 1) to be a multiple of 4"),
    ('layer_type', "learn.fit(2, cbs=SparsifyCallback(sparsity=50, layer_type=nn.Conv1d))", ValueError,
     "layer_type=Conv1d: the model has no such layer with a weight to prune"),
    ('schedule', "learn.fit(2, cbs=SparsifyCallback(sparsity=90, schedule=lambda s, e, p: 200 * p))", ValueError,
     "schedule='<lambda>' returned 102.0 at pos=0.5100; a schedule must return a percentage in [0, 100]"),
    ('schedule', "learn.fit(2, cbs=SparsifyCallback(sparsity=90, schedule=lambda s, e, p: None))", ValueError,
     "schedule='<lambda>' returned None at pos=0.0000; a schedule must return a percentage in [0, 100]"),
    ('schedule', "learn.fit(2, cbs=SparsifyCallback(sparsity=90, schedule=lambda s, e: e))", TypeError,
     "schedule='<lambda>' failed when called as f(start, end, pos): <lambda>() takes 2 positional arguments but 3 were "
     "given"),
    ('(the model)', "nan_learn.fit(2, cbs=SparsifyCallback(sparsity=50))", ValueError,
     "layer '0' has NaN or Inf weights: they cannot be ranked for pruning"),
    ('criteria', "learn.fit(2, cbs=SparsifyCallback(sparsity=50, criteria=nan_scores))", ValueError,
     "criteria nan_scores gave NaN or Inf scores for layer '0'"),
    ('criteria', "frozen_learn.fit(2, cbs=SparsifyCallback(sparsity=50, criteria=taylor))", ValueError,
     "criteria taylor scores weights by their gradients, but layer '0' is frozen (requires_grad=False) and gets none: "
     "unfreeze it, or choose another criteria"),
    # Sparsifier(...) and its methods
    ('model', "Sparsifier('net')", TypeError, "model='net' must be an nn.Module"),
    ('granularity', "Sparsifier(net, granularity='rows')", ValueError,
     "granularity='rows' is not known for Conv2d; valid: ['channel'…"),
    ('granularity', "Sparsifier(net, granularity='2:4')", ValueError,
     "granularity='2:4' needs the input dimension of layer '0' (shape (8, 3, 3, 3), dim 1) to be a multiple of 4"),
    ('context', "Sparsifier(net, context='glob')", ValueError,
     "context='glob' is not allowed; use 'local' or 'global'"),
    ('criteria', "Sparsifier(net, criteria='biggest')", ValueError,
     "criteria='biggest' is not known; valid: ['grad_crit'…"),
    ('layer_type', "Sparsifier(net, layer_type=nn.Linear)", ValueError,
     "layer_type=Linear: the model has no such layer with a weight to prune"),
    ('round_to', "Sparsifier(net, round_to=-1)", ValueError, "round_to=-1 must be None or a positive integer"),
    ('seed', "Sparsifier(net, seed='a')", TypeError, "seed='a' must be an integer"),
    ('sparsity', "Sparsifier(net).prune(120)", ValueError,
     "sparsity=120 is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('sparsity', "Sparsifier(net).prune('50')", TypeError, "sparsity='50' must be a number, a percentage in [0, 100]"),
    ('sparsity', "Sparsifier(net, context='global').prune({'0': 50})", ValueError,
     "sparsity as a dict of layer name -> percent needs context='local', got context='global'"),
    ('sparsity', "Sparsifier(net).prune({'head': 50})", ValueError,
     "sparsity names layers the model has not: ['head']; pruned layers: ['0', '2']"),
    ('criteria', "Sparsifier(net, criteria=nan_scores).prune(50)", ValueError,
     "criteria nan_scores gave NaN or Inf scores for layer '0'"),
    ('criteria', "Sparsifier(net, criteria='taylor').prune(50)", RuntimeError,
     "criteria taylor needs gradients, and layer '0' has none: prune after a backward pass"),
    ('criteria', "Sparsifier(net, criteria=total).prune(50)", ValueError,
     "criteria total gave scores of shape () for layer '0', whose weight has shape (8, 3, 3, 3): a criteria scores every "
     "weight"),
    ('model', "Sparsifier(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))))", ValueError,
     "layer '0' (ParametrizedConv2d) computes its weight from other tensors through a parametrization (_WeightNorm); "
     "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') stores it: zeroing the computed weight would "
     "prune nothing. Store the weight as a parameter first"),
    ('model', "Sparsifier(nn.Sequential(nn.LazyConv2d(8, 3)))", ValueError,
     "layer '0' (LazyConv2d) is lazy and has no weight yet: run one batch through the model (model(x)) before pruning, "
     "so that its shape is known"),
    ('(call order)', "Sparsifier(net).rewind()", RuntimeError, "rewind() before save_rewind(): no weights were kept"),
    # fasterai's forms (issue 10)
    ('sparsity', "SparsifyCallback(sparsity=[50, 150])", ValueError,
     "sparsity[1]=150 is outside [0, 100]; sparsity is a percentage (90 means 90%)"),
    ('sparsity', "SparsifyCallback(sparsity=[50, 50], context='global')", ValueError,
     "sparsity as a list needs context='local', got context='global'"),
    ('sparsity', "learn.fit(1, cbs=SparsifyCallback(sparsity=[50, 50]))", ValueError,
     "sparsity is a list of 2 percents, but the model has 3 Conv2d layers to prune: ['0', '3', '6']"),
    ('nm', "SparsifyCallback(sparsity=90, granularity='filter', nm=True)", ValueError,
     "nm=True means granularity='2:4'; it cannot be combined with granularity='filter'"),
    ('nm', "SparsifyCallback(sparsity=90, nm=1)", TypeError, "nm=1 must be True or False"),
    ('schedule', "SparsifyCallback(sparsity=90, schedule=[Schedule(sched_agp, 0, 0.4), Schedule(sched_dsd, 0.5, 1)])",
     ValueError, "schedule: the windows of a list must follow each other; Schedule(sched_agp, start_pct=0, end_pct=0.4) "
     "ends at 0.4 but Schedule(sched_dsd, start_pct=0.5, end_pct=1) starts at 0.5"),
    ('schedule', "SparsifyCallback(sparsity=90, schedule=[agp, 'lin'])", TypeError,
     "schedule=[Schedule(agp, start_pct=0.2, end_pct=1), 'lin']: a list of schedules must hold Schedule objects…"),
    ('rewind_epoch', "learn.fit(5, cbs=SparsifyCallback(sparsity=90, schedule=agp, lth=True, rewind_epoch=2))",
     ValueError, "with lth=True, rewind_epoch=2 must be <= 1, the epoch in which agp's window (from 0.2 of training) "
     "starts pruning in this fit of 5 epochs: earlier masks could not be rewound"),
    ('start_pct, end_pct', "Schedule(sched_agp, start_pct=0.6, end_pct=0.5)", ValueError,
     "start_pct=0.6 must be below end_pct=0.5"),
    ('end_val', "Schedule(sched_agp, end_val=2)", ValueError,
     "end_val=2 must be a number in [0, 1] (a fraction of training or of the target)"),
    ('sched_func', "Schedule('agp')", TypeError, "sched_func='agp' must be a function f(start, end, pos)"),
    ('data', "Sparsifier(net, criteria=wanda)", ValueError,
     "criteria wanda weighs weights by activations: pass data= (a batch, a list of batches or a DataLoader) to calibrate on"),
    ('nm', "Sparsifier(net, granularity='filter', nm=True)", ValueError,
     "nm=True means granularity='2:4'; it cannot be combined with granularity='filter'"),
    ('module', "Sparsifier(net).sparsify_layer(nn.Conv2d(3, 8, 3), 50)", ValueError,
     "module=Conv2d is not one of the pruned Conv2d layers of this Sparsifier"),
    ('sparsity', "Sparsifier(net).sparsify_model([50])", ValueError,
     "sparsity is a list of 1 percents, but the model has 2 Conv2d layers to prune: ['0', '2']"),
    ('needs_init, needs_update', "Criteria(torch.abs, needs_init=True, needs_update=True)", ValueError,
     "needs_init=True and needs_update=True together: the updating weights would replace the initial ones; choose one"),
    ('output_fn', "Criteria(torch.abs, output_fn=torch.sub)", ValueError,
     "output_fn and return_init compare with reference weights: they need needs_init=True or needs_update=True"),
    ('reducer', "Criteria(torch.abs, reducer='max')", ValueError,
     "reducer='max' is not known; use 'sum', 'mean' or a function"),
    ('data_fn', "Criteria(torch.abs, data_fn='median')", ValueError,
     "data_fn='median' is not known; use one of ['l2_norm', 'max', 'mean']"),
    ('reference', "large_init(net[0], 'filter')", ValueError,
     "criteria large_init compares with the init weights: pass them as reference=... (or let a Sparsifier keep them)"),
    # methods by name, allocations and RigL (issue 13)
    ('method', "parse_method('steep')", ValueError,
     "method='steep': 'steep' is not a schedule; choose from one_shot, iterative, agp, one_cycle, cos, lin, dsd, acdc, rigl"),
    ('method', "parse_method('agp+wide')", ValueError,
     "method='agp+wide': 'wide' is not an allocation; choose from uniform, dense_first, erk, lamp"),
    ('method', "parse_method('rigl+lamp')", ValueError,
     "method='rigl+lamp': RigL keeps per-layer counts, so it takes an allocation (uniform, dense_first, erk), not LAMP's global ranking"),
    ('method', 'parse_method(3)', TypeError, "method=3 must be a string such as 'agp+erk'"),
    ('context', "build_callback('agp+erk', 90, net, context='global')", ValueError,
     "context='global' does not apply to method='agp+erk': the erk allocation gives each layer its own target (context='local'); leave context unset"),
    ('context', "build_callback('agp+lamp', 90, net, context='local')", ValueError,
     "context='local' does not apply to method='agp+lamp': LAMP ranks all layers' weights together by LAMP scores (context='global'); leave context unset"),
    ('criteria', "build_callback('agp+lamp', 90, net, criteria='taylor')", ValueError,
     "criteria='taylor' does not apply to method='agp+lamp': LAMP ranks all layers' weights together by LAMP scores; leave criteria unset"),
    ('start_epoch', "build_callback('rigl', 90, net, start_epoch=1)", ValueError,
     "start_epoch=1 does not apply to method='rigl': RigL updates its connectivity over the whole fit (stop sets when it ends)"),
    ('granularity', "build_callback('rigl', 90, net, granularity='filter')", ValueError,
     "granularity='filter': RigL moves single weights ('weight')"),
    ('allocation', "allocate(net, 80, allocation='lamp')", ValueError,
     "allocation='lamp' is not known; valid: ['uniform', 'dense_first', 'erk'] (LAMP is criteria=lamp with context='global')"),
    ('sparsity', "allocate(net, 80, allocation='dense_first')", ValueError,
     "sparsity=80 cannot be met with the first layer '0' dense: the other layers hold 576 of 792 units, fewer than the 633 to prune"),
    ('layer_type', 'allocate(net, 80, layer_type=nn.Conv1d)', ValueError,
     'layer_type=Conv1d: the model has no such layer with a weight'),
    ('layer_type', "allocate(net, 80, layer_type='Conv2d')", TypeError,
     "layer_type='Conv2d' must be an nn.Module subclass such as nn.Conv2d"),
    ('power', "erk({'a': (2, 2)}, 50, power=0)", ValueError, 'power=0 must be a positive number (1 is ERK)'),
    ('delta', 'RigLCallback(sparsity=90, delta=0)', ValueError,
     'delta=0 must be a positive integer (steps between connectivity updates)'),
    ('drop_fraction', 'RigLCallback(sparsity=90, drop_fraction=0)', ValueError,
     'drop_fraction=0 must be a number in (0, 1]'),
    ('delta', "learn.fit(1, cbs=RigLCallback(sparsity=50))", ValueError,
     "delta=100 leaves no connectivity update in this fit: updates come every 100 steps before stop=0.75 of its 3 steps "
     "(step 2); use a smaller delta or a larger stop"),
]


def namespace() -> dict:
    "The names the calls use: fresh learners and models for every row."
    torch.manual_seed(0)
    nan_learn = fast_learner()
    with torch.no_grad(): nan_learn.model[0].weight[0, 0, 0, 0] = float('nan')
    frozen_learn = fast_learner()
    frozen_learn.model[0].requires_grad_(False)
    return dict(SparsifyCallback=SparsifyCallback, Sparsifier=Sparsifier, agp=agp, nn=nn, learn=fast_learner(),
                parse_method=parse_method, build_callback=build_callback, allocate=allocate, erk=erk,
                RigLCallback=RigLCallback,
                Schedule=Schedule, sched_agp=sched_agp, sched_dsd=sched_dsd, wanda=wanda, Criteria=Criteria, torch=torch,
                large_init=large_init, taylor=taylor, frozen_learn=frozen_learn,
                nan_learn=nan_learn, net=nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)),
                nan_scores=Criteria(lambda w: w * float('nan'), name='nan_scores'),
                total=Criteria(lambda w: w.abs().sum(), name='total'))


def weights(ns: dict) -> dict:
    models = {'learn': ns['learn'].model, 'nan_learn': ns['nan_learn'].model, 'frozen_learn': ns['frozen_learn'].model,
              'net': ns['net']}
    return {f"{k}.{n}": p.detach().clone() for k, m in models.items() for n, p in m.named_parameters()}


def doc_line(row) -> str:
    arg, call, exc, msg = row
    return f"| {arg} | `{call}` | `{exc.__name__}` | `{msg}` |"


@pytest.mark.parametrize('row', ROWS, ids=[r[1] for r in ROWS])
def test_each_bad_argument_raises_before_any_weight_changes(row):
    _, call, exc, msg = row
    ns = namespace()
    before = weights(ns)
    with pytest.raises(exc, match=re.escape(msg.removesuffix('…'))), ns['learn'].no_bar(), ns['nan_learn'].no_bar(), \
            contextlib.redirect_stdout(None):
        eval(call, ns)
    after = weights(ns)
    assert after.keys() == before.keys()
    # a NaN is never equal to itself: the NaN model's one NaN becomes a number on both sides
    for k, w in before.items(): assert torch.equal(w.nan_to_num(7.), after[k].nan_to_num(7.)), k


def test_the_doc_table_is_this_table():
    "docs/errors.md lists exactly these rows, in this order: each row of the doc is tested above."
    lines = [l for l in DOC.read_text().splitlines() if l.startswith('| ') and '`' in l]
    assert lines == [doc_line(r) for r in ROWS]


def test_a_fit_that_failed_on_a_bad_argument_leaves_no_callback_behind():
    ns = namespace()
    learn = ns['learn']
    with pytest.raises(ValueError), learn.no_bar(), contextlib.redirect_stdout(None):
        learn.fit(2, cbs=SparsifyCallback(sparsity=90, start_epoch=5))
    assert not any(isinstance(cb, SparsifyCallback) for cb in learn.cbs)
    assert not any((m.weight == 0).any() for m in learn.model.modules() if isinstance(m, nn.Conv2d))
