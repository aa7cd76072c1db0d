"""fasterai_sched: make networks sparse while they train with fastai, on the schedule you choose."""
__version__ = '0.1.0'
import warnings as _warnings
with _warnings.catch_warnings():
    # fastai's import calls torch.jit.script, which recent PyTorch flags as deprecated: nothing a user can act on
    _warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
    from .granularity import register_granularity, granularity_names, Granularities
    from .criteria import *
    from .criteria import __all__ as _criteria_all
    from .schedules import (one_shot, iterative, agp, one_cycle, cos, lin, dsd, plot_schedules, Schedule, sched_oneshot,
                            sched_iterative, sched_agp, sched_onecycle, sched_dsd, schedules, available_schedules)
    from .sparsifier import Sparsifier
    from .report import sparsity_report
    from .callback import SparsifyCallback
    from .compact import compact, compaction_report, save_sparse, load_sparse
    from .schedules import acdc, sched_acdc
    from .allocation import allocate, uniform, uniform_dense_first, erk, lamp
    from .rigl import RigLCallback

__all__ = ['Sparsifier', 'SparsifyCallback', 'sparsity_report', 'register_granularity', 'granularity_names',
           'compact', 'compaction_report', 'save_sparse', 'load_sparse',
           'Granularities', 'one_shot', 'iterative', 'agp', 'one_cycle', 'cos', 'lin', 'dsd', 'plot_schedules',
           'Schedule', 'sched_oneshot', 'sched_iterative', 'sched_agp', 'sched_onecycle', 'sched_dsd', 'schedules',
           'available_schedules',
           *[n for n in _criteria_all if n not in ('CRITERIA', 'DEFAULT_REDUCTION')],
           'acdc', 'sched_acdc', 'allocate', 'uniform', 'uniform_dense_first', 'erk', 'lamp', 'RigLCallback']
