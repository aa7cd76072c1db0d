"""The main job: the tutorial's experiment end to end, offline: dense training, then one run per schedule, compared."""
from __future__ import annotations
import argparse, atexit, copy, csv, dataclasses, os, random, shutil, socket, sys, tempfile, time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np, torch, torch.nn as nn
from fastai.vision.all import (Callback, DataLoaders, ImageDataLoaders, Resize, URLs, accuracy,
                               get_image_files, parent_label, set_seed, untar_data, vision_learner)
from fastai.vision.learner import model_meta
from fastprogress.fastprogress import format_time
from .callback import SparsifyCallback
from .criteria import CRITERIA, Reducer
from .granularity import get_granularity
from .report import sparsity_report
from .schedules import SCHEDULES
from .sparsifier import Sparsifier, check_sparsity
from .sweep import (METHOD_ALLOCATIONS, SWEEP, SWEEP_METHODS, SWEEP_QUICK, SweepConfig, build_callback, main_sweep,
                    method_name, method_options, own_options, parse_method)

__all__ = ['main', 'digits_folder', 'digits_dls', 'folder_dls', 'label_func', 'DEFAULTS', 'QUICK']

PROG = 'fasterai-sched'
# Chosen so that the default run fits in 10 minutes on 2 CPU cores with agp at 90% within a point of dense
# (the README's main job section has the measurements). With `--epochs` alone, the pruning window scales: see
# `pruning_window`.
DEFAULTS = dict(schedules='one_shot,iterative,agp', sparsity=90., granularity='weight', context='local',
                criteria='large_final', epochs=6, start_epoch=1, end_epoch=4, arch='resnet18', size=16, bs=32,
                lr=1e-2, fit='one_cycle', data='digits', device='auto', out='fasterai_sched_out', seed=42,
                max_images=None, pretrained='auto')
QUICK = dict(epochs=3, start_epoch=1, end_epoch=2, max_images=500)  # about a minute on 2 cores
VALID_PCT = 0.2
MIN_IMAGES = 10


class UsageError(Exception):
    "A bad option: `option` is named in the one-line message."
    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {' '.join(str(message).split())}")


# ---- data ----
def label_func(f: str) -> bool:
    "The seed's rule for the pets images: a file name that starts with an uppercase letter is a cat."
    return f[0].isupper()


def digits_folder(dest: str | Path | None = None, max_images: int | None = None, seed: int = 0) -> Path:
    "Write scikit-learn's digits as 8x8 grayscale PNGs, one folder per label (`dest`, or a temporary folder removed at exit)."
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    idx = _subset(len(digits.target), max_images, seed)
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix='fasterai_sched_digits_'))
        atexit.register(shutil.rmtree, dest, ignore_errors=True)
    dest = Path(dest)
    for i in idx:
        label_dir = dest / str(digits.target[i]); label_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)  # digits' values run 0..16
        Image.fromarray(pixels).save(label_dir / f"{i:04d}.png")
    return dest


def _subset(n: int, max_images: int | None, seed: int) -> list[int]:
    "Indices of `max_images` of `n` items drawn with `seed` (all of them when None), in order."
    if max_images is None or max_images >= n: return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_images))


def folder_dls(path: str | Path, files: Sequence[Path] | None = None, by_name: bool = False, size: int = 16,
               bs: int = 32, seed: int = 42, device=None, num_workers: int | None = None) -> DataLoaders:
    "fastai `ImageDataLoaders` over `files` under `path`, labelled by parent folder or, `by_name`, by the seed's `label_func`."
    path = Path(path)
    files = list(files) if files is not None else get_image_files(path)
    device = torch.device(device) if device is not None else None
    if num_workers is None: num_workers = 0 if device is None or device.type == 'cpu' else min(4, os.cpu_count() or 1)
    kw = dict(valid_pct=VALID_PCT, seed=seed, item_tfms=Resize(size), bs=bs, device=device, num_workers=num_workers)
    if by_name: return ImageDataLoaders.from_name_func(path, files, label_func, **kw)
    return ImageDataLoaders.from_path_func(path, files, parent_label, **kw)


def digits_dls(size: int = 16, bs: int = 32, seed: int = 42, device=None, max_images: int | None = None) -> DataLoaders:
    "DataLoaders over scikit-learn's digits (8x8, upscaled to `size`, 3 channels); 20% held out for validation."
    return folder_dls(digits_folder(max_images=max_images, seed=seed), size=size, bs=bs, seed=seed, device=device)


@dataclass
class Data:
    "Where the images are and how they are labelled."
    name: str
    path: Path
    files: list[Path]
    by_name: bool

    @property
    def labelling(self) -> str:
        return "file name, first letter uppercase (the seed's label_func)" if self.by_name else "parent folder"


def resolve_data(spec: str, max_images: int | None, seed: int) -> Data:
    "The images `--data` names: 'digits', 'pets' (downloaded by fastai) or a folder; raises `UsageError` if unusable."
    if spec == 'digits':
        path = digits_folder(max_images=max_images, seed=seed)
        return Data('digits', path, sorted(get_image_files(path)), by_name=False)
    if spec == 'pets':
        path = _download_pets() / 'images'
        return _from_files('pets', path, sorted(get_image_files(path)), True, max_images, seed)
    path = Path(spec).expanduser()
    if not path.is_dir(): raise UsageError('--data', f"{spec!r} is not 'digits', 'pets' or an existing folder")
    files = sorted(get_image_files(path))
    classes = {f.parent for f in files}
    return _from_files(str(path), path, files, len(classes) < 2, max_images, seed)


def _download_pets() -> Path:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try: return untar_data(URLs.PETS)
    except Exception as e:
        raise UsageError('--data', f"pets could not be downloaded from {URLs.PETS} ({type(e).__name__}: {e}); "
                                   "use --data digits offline") from e
    finally: socket.setdefaulttimeout(old)


def _from_files(name: str, path: Path, files: list[Path], by_name: bool, max_images: int | None, seed: int) -> Data:
    files = [files[i] for i in _subset(len(files), max_images, seed)]
    if len(files) < MIN_IMAGES:
        raise UsageError('--data', f"{name}: found {len(files)} images, need at least {MIN_IMAGES}")
    labels = {label_func(f.name) for f in files} if by_name else {f.parent.name for f in files}
    if len(labels) < 2:
        rule = ("all images sit in one folder and their names give one class (the seed's rule: first letter "
                "uppercase); put each class in its own subfolder") if by_name else "the images have one label"
        raise UsageError('--data', f"{name}: {rule}")
    _check_readable(name, files)
    return Data(name, path, files, by_name)


def _check_readable(name: str, files: list[Path], n: int = 20) -> None:
    from PIL import Image
    for f in files[:: max(1, len(files) // n)]:
        try:
            with Image.open(f) as im: im.verify()
        except Exception as e: raise UsageError('--data', f"{name}: cannot read image {f} ({e})") from e


# ---- options ----
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        "One line, naming the option, exit code 2 (argparse's usage line goes to --help)."
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def _int_at_least(low: int):
    def parse(s: str) -> int:
        try: v = int(s)
        except ValueError: raise argparse.ArgumentTypeError(f"invalid integer {s!r}")
        if v < low: raise argparse.ArgumentTypeError(f"{v} is below the minimum {low}")
        return v
    return parse


def _positive_float(s: str) -> float:
    try: v = float(s)
    except ValueError: raise argparse.ArgumentTypeError(f"invalid number {s!r}")
    if not v > 0 or v == float('inf'): raise argparse.ArgumentTypeError(f"{s} must be a positive number")
    return v


def _max_lag(s: str) -> float | str:
    "--max-lag: a number, or 'none' (no lag bound)."
    if s.strip().lower() == 'none': return 'none'
    try: return float(s)
    except ValueError: raise argparse.ArgumentTypeError(f"invalid value {s!r}: a number in [0, 1] or 'none'")


def _number(s: str) -> float:
    try: return float(s)
    except ValueError: raise argparse.ArgumentTypeError(f"invalid number {s!r}")


def arch_names() -> list[str]:
    "Architectures `--arch` accepts: those fastai's `vision_learner` knows how to cut."
    return [a.__name__ for a in model_meta]


class _Help(argparse.HelpFormatter):
    "Shows a default where there is one to show."
    def _get_help_string(self, action):
        h = action.help or ''
        if action.default in (None, False, argparse.SUPPRESS) or '%(default)' in h or '[' in h: return h
        return h + ' (default: %(default)s)'


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(prog=PROG, description="Train a network dense, then sparsified once per schedule with the same number "
                "of epochs, and compare: the fasterai schedules tutorial, offline, on scikit-learn's digits.",
                formatter_class=_Help)
    p.add_argument('--schedules', default=None, help=f"comma-separated, from {', '.join(SCHEDULES)}, rigl; "
                   f"'NAME+ALLOCATION' picks an allocation for one (agp+erk) [{d['schedules']}; --sweep {SWEEP_METHODS}]")
    p.add_argument('--sparsity', type=_number, default=d['sparsity'], help="final sparsity, percent")
    p.add_argument('--granularity', default=d['granularity'], help="weight, kernel, filter, channel or an N:M pattern")
    p.add_argument('--context', default=None, choices=['local', 'global'],
                   help=f"prune each layer to the sparsity, or rank all layers' weights together [{d['context']}; an "
                   "allocation and RigL are local, LAMP global]")
    p.add_argument('--criteria', default=None, choices=sorted(CRITERIA), metavar='NAME',
                   help=f"one of {', '.join(sorted(CRITERIA))} [{d['criteria']}; LAMP and RigL use their own]")
    p.add_argument('--reduction', default=None, choices=['sum', 'mean'],
                   help="how a unit's score is made from its weights' scores [the library's default, DEFAULT_REDUCTION]")
    p.add_argument('--epochs', type=_int_at_least(1), default=None, help=f"epochs per run, the same for every run [{d['epochs']}; --quick {QUICK['epochs']}]")
    p.add_argument('--start-epoch', type=_int_at_least(0), default=None,
                   help=f"pruning starts with this epoch [{d['start_epoch']}; --quick {QUICK['start_epoch']}; "
                   "with --epochs, a sixth of them]")
    p.add_argument('--end-epoch', type=_int_at_least(1), default=None,
                   help=f"the schedule reaches --sparsity when this many epochs are done, the rest fine-tunes "
                   f"[{d['end_epoch']}; --quick {QUICK['end_epoch']}; with --epochs, a third of them before the end]")
    p.add_argument('--max-lag', type=_max_lag, default=None,
                   help="share of the schedule's span the masks may be off the target by, or 'none' for no such bound "
                   "(masks change at epoch ends and every --frequency steps) [SparsifyCallback's: 0.05]")
    p.add_argument('--frequency', type=_int_at_least(1), default=None,
                   help="also recompute the masks every FREQUENCY steps [none]")
    p.add_argument('--arch', default=d['arch'], choices=arch_names(), metavar='NAME', help="resnet18, resnet34, xresnet18, ...")
    p.add_argument('--size', type=_int_at_least(1), default=None, help=f"images are resized to SIZE x SIZE pixels (digits are 8x8) [{d['size']}]")
    p.add_argument('--bs', type=_int_at_least(1), default=None, help=f"batch size [{d['bs']}; --sweep {SWEEP['bs']}]")
    p.add_argument('--lr', type=_positive_float, default=None,
                   help=f"learning rate (the peak, with --fit one_cycle) [{d['lr']:g}; --sweep {SWEEP['lr']:g}]")
    p.add_argument('--fit', default=d['fit'], choices=['one_cycle', 'fit'],
                   help="learn.fit_one_cycle or learn.fit (constant rate), the same for every run")
    p.add_argument('--data', default=d['data'], help="digits, pets (downloaded by fastai) or a folder of images labelled "
                   "by subfolder, or by the seed's rule (file name starting uppercase) when flat")
    p.add_argument('--max-images', type=_int_at_least(MIN_IMAGES), default=None,
                   help=f"use a random subset of this many images [all; --quick {QUICK['max_images']}]")
    p.add_argument('--pretrained', default=d['pretrained'], choices=['auto', 'yes', 'no'],
                   help="ImageNet weights: auto uses them when they can be fetched, else trains from random init")
    p.add_argument('--coupled', action='store_true', help="with --granularity filter: prune channels in coupled groups "
                   "(residual sums, concatenations), traced from one batch")
    p.add_argument('--compact', action='store_true', help="with --coupled: remove the pruned channels after each fit, "
                   "then compare size, MACs and measured CPU latency with dense and plot accuracy against latency")
    p.add_argument('--device', default=d['device'], choices=['auto', 'cpu', 'cuda'], help="auto: cuda when available")
    p.add_argument('--out', default=d['out'], help="folder for the plots and results.csv")
    p.add_argument('--quick', action='store_true', help="a run of about one minute: " +
                   ', '.join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument('--seed', type=int, default=d['seed'], help="the same seed for every run: same initial weights, "
                   "same batches")
    p.add_argument('--allocation', default='uniform', choices=METHOD_ALLOCATIONS,
                   help="per-layer targets for the schedules named without '+': uniform (each layer at --sparsity), "
                   "dense_first, erk (Erdős–Rényi-Kernel) or lamp (LAMP scores, global)")
    p.add_argument('--sweep', default=None, metavar='SPARSITIES',
                   help="instead of the main job: every schedule at each of these comma-separated sparsities (such as "
                   "80,90,95,98), over --seeds seeds, with a small CNN on the digits; ends with an accuracy-vs-sparsity "
                   f"table and plot [--schedules {SWEEP_METHODS}, --epochs {SWEEP['epochs']}, --seeds {SWEEP['seeds']}; "
                   f"--quick: --epochs {SWEEP_QUICK['epochs']}, --seeds {SWEEP_QUICK['seeds']}]")
    p.add_argument('--seeds', type=_int_at_least(1), default=None, help="with --sweep: runs per point, seeds --seed, "
                   "--seed+1, ...")
    return p


@dataclass
class Config:
    schedules: list[str]
    sparsity: float
    granularity: str
    context: str | None  # None: the method's own (local, large_final for a plain schedule)
    criteria: str | None
    epochs: int
    start_epoch: int
    end_epoch: int | None
    arch: str
    size: int
    bs: int
    lr: float
    fit: str
    device: torch.device
    out: Path
    seed: int
    max_images: int | None
    pretrained: str
    data_spec: str
    quick: bool
    max_lag: float | str | None = None  # None: SparsifyCallback's own recompute policy; 'none': no lag bound
    frequency: int | None = None
    reduction: str | None = None
    coupled: bool = False
    compact: bool = False
    allocation: str = 'uniform'
    rigl_delta: int | None = None  # RigL's steps between updates: about two an epoch, once the data is known


def pruning_window(epochs: int, start: int | None = None, end: int | None = None) -> tuple[int, int]:
    "Defaults for a fit of `epochs`: prune after the first sixth of them, reach the target with a third left to fine-tune."
    share = lambda f: int(epochs * f + 0.5)  # rounded half up: 3 epochs give a start of 1, as --quick has
    if start is None: start = min(epochs - 1, share(1 / 6), *([end - 1] if end is not None else []))
    if end is None: end = max(start + 1, epochs - share(1 / 3))
    return start, end


def make_config(args: argparse.Namespace) -> Config:
    "Fill the --quick and default values, and check every option that needs no data; raises `UsageError`."
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    pick = lambda k: getattr(args, k) if getattr(args, k) is not None else base[k]
    epochs, size, max_images = pick('epochs'), pick('size'), pick('max_images')
    # the preset window only while the epochs and its start are the preset's; else it follows `pruning_window`
    start_epoch = args.start_epoch if args.start_epoch is not None or args.epochs is not None else base['start_epoch']
    end_epoch = args.end_epoch
    if end_epoch is None and args.epochs is None and args.start_epoch is None: end_epoch = base['end_epoch']
    if start_epoch is not None and start_epoch >= epochs:
        raise UsageError('--start-epoch', f"{start_epoch} must be below --epochs {epochs} (allowed: 0 to {epochs - 1})")
    start_epoch, end_epoch = pruning_window(epochs, start_epoch, end_epoch)
    if not start_epoch < end_epoch <= epochs:
        raise UsageError('--end-epoch', f"{end_epoch} must be after --start-epoch {start_epoch} and at most --epochs {epochs}")
    schedules = [s.strip() for s in (args.schedules or DEFAULTS['schedules']).split(',') if s.strip()]
    if not schedules: raise UsageError('--schedules', "give at least one schedule")
    for s in schedules:  # each method, and any option it would not use: errors before any run
        try: parse_method(s)
        except ValueError as e: raise UsageError('--schedules', f"{s!r} is not a schedule ({e})") from e
        method = method_name(s, args.allocation)
        try: parse_method(method)
        except ValueError as e: raise UsageError('--allocation', f"{args.allocation} does not apply to {s!r} ({e})") from e
        for opt, value in (('--context', args.context), ('--criteria', args.criteria)):
            try: method_options(method, **{opt[2:]: value})
            except ValueError as e: raise UsageError(opt, e) from e
        for opt, value in (('--max-lag', args.max_lag), ('--frequency', args.frequency)):
            if value is not None and method.startswith('rigl'):
                raise UsageError(opt, f"{value} does not apply to {s!r}: RigL changes its masks every delta steps")
        if args.reduction and own_options(method):
            raise UsageError('--reduction', f"{args.reduction} does not apply to {s!r}: it ranks single weights by its own "
                             "scores; --reduction sets how the other methods' criteria score a unit")
    if args.allocation != 'uniform' and all('+' in s for s in schedules):
        raise UsageError('--allocation', f"{args.allocation} applies to the schedules named without '+'; "
                         f"{', '.join(schedules)} name their own")
    dup = sorted({s for s in schedules if schedules.count(s) > 1})
    if dup: raise UsageError('--schedules', f"{dup[0]!r} is listed twice")
    try: check_sparsity(args.sparsity)
    except (TypeError, ValueError) as e: raise UsageError('--sparsity', e) from e
    try: get_granularity(args.granularity, nn.Conv2d)
    except (TypeError, ValueError) as e: raise UsageError('--granularity', e) from e
    if isinstance(args.max_lag, float) and not 0 <= args.max_lag <= 1:
        raise UsageError('--max-lag', f"{args.max_lag:g} must be a share of the schedule's span in [0, 1]")
    coupled, compact = getattr(args, 'coupled', False), getattr(args, 'compact', False)
    if coupled and args.granularity != 'filter':
        raise UsageError('--coupled', f"prunes whole channels: it needs --granularity filter, not {args.granularity!r}")
    if compact and not coupled: raise UsageError('--compact', "needs --coupled: only coupled channels can be removed")
    return Config(schedules, float(args.sparsity), args.granularity, args.context, args.criteria, epochs, start_epoch,
                  end_epoch, args.arch, size, pick('bs'), pick('lr'), args.fit, _device(args.device), _out_folder(args.out), args.seed,
                  max_images, args.pretrained, args.data, args.quick, args.max_lag, args.frequency, args.reduction,
                  coupled, compact, args.allocation)


def _device(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available(): raise UsageError('--device', "cuda asked for, but CUDA is not available")
    if name == 'auto': name = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(name)


def _out_folder(out: str) -> Path:
    "The output folder, checked (not created): it must be a folder or creatable in a writable place."
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir(): raise UsageError('--out', f"{out!r} exists and is not a folder")
    parent = path
    while not parent.exists(): parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError('--out', f"{out!r} cannot be written ({parent} is not a writable folder)")
    return path


def get_arch(name: str) -> Callable:
    return next(a for a in model_meta if a.__name__ == name)


def check_model(cfg: Config, n_classes: int = 10) -> nn.Module:
    "Build the network once on CPU: the architecture must take `size`-pixel images and the sparsifier its layers."
    from fastai.vision.learner import create_vision_model
    try:
        model = create_vision_model(get_arch(cfg.arch), n_classes, pretrained=False).eval()
        with torch.no_grad(): model(torch.zeros(2, 3, cfg.size, cfg.size))
    except Exception as e:
        raise UsageError('--size', f"{cfg.arch} cannot take {cfg.size}-pixel images ({type(e).__name__}: {e})") from e
    try: Sparsifier(model, cfg.granularity, *method_options('agp', cfg.context, cfg.criteria), coupled=cfg.coupled,
                    data=torch.zeros(2, 3, cfg.size, cfg.size), example_inputs=torch.zeros(2, 3, cfg.size, cfg.size))
    except (TypeError, ValueError) as e: raise UsageError('--coupled' if cfg.coupled else '--granularity', f"{e}") from e
    return model


def pretrained_weights(cfg: Config) -> bool:
    "Whether ImageNet weights can be used: from torch's cache or a download; `--pretrained yes` fails when they cannot."
    if cfg.pretrained == 'no': return False
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        arch = get_arch(cfg.arch)
        weights = model_meta[arch].get('weights')
        arch(weights=weights) if weights else arch(pretrained=True)  # downloads to torch's cache if needed
        return True
    except Exception as e:
        if cfg.pretrained == 'yes':
            raise UsageError('--pretrained', f"ImageNet weights for {cfg.arch} could not be fetched ({type(e).__name__}: {e})") from e
        print(f"ImageNet weights for {cfg.arch} are not reachable ({type(e).__name__}): training from random init "
              "(pretrained=False)")
        return False
    finally: socket.setdefaulttimeout(old)


# ---- training ----
class TableLogger(Callback):
    "fastai's progress table, one plain line per epoch, for output that is not a terminal (logs, CI, pipes)."
    order = 71  # header after SparsifyCallback's first line, as in the seed

    def before_fit(self):
        self.widths = [max(len(n), 9) for n in self.recorder.metric_names]
        self.old_logger, self.learn.logger = self.learn.logger, self._write
        self._write(self.recorder.metric_names)

    def _write(self, log):
        cells = [f"{v:.6f}" if isinstance(v, float) else str(v) for v in log]
        print('  '.join(f"{c:<{w}}" for c, w in zip(cells, self.widths)).rstrip(), flush=True)

    def after_fit(self): self.learn.logger = self.old_logger


@dataclass
class RunResult:
    name: str
    sparsity: float
    accuracies: list[float]
    seconds: float
    callback: SparsifyCallback | None = None
    model: nn.Module | None = None  # kept with --compact, to measure what it buys

    @property
    def accuracy(self) -> float: return self.accuracies[-1]


def fit_call(cfg: Config, cb: str = '') -> str:
    "The fastai call this run makes, as the user would type it."
    f = f"learn.fit_one_cycle({cfg.epochs}, {cfg.lr:g}" if cfg.fit == 'one_cycle' else f"learn.fit({cfg.epochs}, {cfg.lr:g}"
    return f + (f", cbs={cb})" if cb else ")")


def callback_call(cfg: Config, schedule: str) -> str:
    if schedule not in SCHEDULES or cfg.allocation != 'uniform':
        method = method_name(schedule, cfg.allocation)
        window = '' if parse_method(method)[0] == 'rigl' else f", start_epoch={cfg.start_epoch}, end_epoch={cfg.end_epoch}"
        given = {'context': cfg.context, 'criteria': cfg.criteria,
                 'granularity': None if cfg.granularity == 'weight' else cfg.granularity}
        given = ''.join(f", {k}={v!r}" for k, v in given.items() if v)
        rigl = parse_method(method)[0] == 'rigl'
        policy = (f", delta={cfg.rigl_delta}" if cfg.rigl_delta else '') if rigl else _policy_args(cfg)
        return f"build_callback({method!r}, {cfg.sparsity:g}, learn.model{given}{window}{policy})"
    context, criteria = cfg.context or DEFAULTS['context'], cfg.criteria or DEFAULTS['criteria']
    return (f"SparsifyCallback(sparsity={cfg.sparsity:g}, granularity={cfg.granularity!r}, context={context!r}, "
            f"criteria={criteria}, schedule={schedule}, start_epoch={cfg.start_epoch}"
            + (f", end_epoch={cfg.end_epoch}" if cfg.end_epoch else "")
            + _policy_args(cfg)
            + (", coupled=True" if cfg.coupled else "") + (", compact=True" if cfg.compact else "") + ")")


def _policy(cfg: Config) -> dict:
    "The recompute options the command line set (the callback's defaults otherwise)."
    out = {} if cfg.max_lag is None else {'max_lag': None if cfg.max_lag == 'none' else cfg.max_lag}
    return out | ({} if cfg.frequency is None else {'frequency': cfg.frequency})


def _policy_args(cfg: Config) -> str:
    return ''.join(f", {k}={v if v is None else format(v, 'g')}" for k, v in _policy(cfg).items())


def _criteria(cfg: Config):
    "The named criteria (None when unset: the method's own), with the unit reduction --reduction asks for."
    if cfg.reduction is None: return cfg.criteria and CRITERIA[cfg.criteria]
    crit = CRITERIA[cfg.criteria or DEFAULTS['criteria']]
    crit = copy.copy(crit)
    crit.reducer = Reducer.sum if cfg.reduction == 'sum' else Reducer.mean
    return crit


def make_callback(cfg: Config, schedule: str, model: nn.Module | None = None) -> SparsifyCallback:
    if schedule not in SCHEDULES or cfg.allocation != 'uniform':  # rigl, or an allocation: needs the model's layers
        method = method_name(schedule, cfg.allocation)
        if cfg.coupled or cfg.compact:
            raise ValueError(f"--coupled and --compact prune whole channels; {method} allocates weights per layer: "
                             "use them with a plain schedule and --allocation uniform")
        if parse_method(method)[0] == 'rigl':
            if _policy(cfg): raise ValueError("rigl changes its masks every delta steps: --max-lag and --frequency do not apply")
            kw = {} if cfg.rigl_delta is None else {'delta': cfg.rigl_delta}
        else: kw = dict(start_epoch=cfg.start_epoch, end_epoch=cfg.end_epoch, **_policy(cfg))
        return build_callback(method, cfg.sparsity, model, _criteria(cfg), cfg.granularity, cfg.context, **kw)
    context, criteria = method_options(schedule, cfg.context, _criteria(cfg))
    return SparsifyCallback(sparsity=cfg.sparsity, granularity=cfg.granularity, context=context,
                            criteria=criteria, schedule=SCHEDULES[schedule], start_epoch=cfg.start_epoch,
                            end_epoch=cfg.end_epoch, coupled=cfg.coupled, compact=cfg.compact, **_policy(cfg))


def train(cfg: Config, data: Data, pretrained: bool, schedule: str | None, bar: bool) -> RunResult:
    "One run from the same seed: a fresh learner (same initial weights, same batches), dense or with `schedule`."
    set_seed(cfg.seed, reproducible=True)
    dls = folder_dls(data.path, data.files, data.by_name, cfg.size, cfg.bs, cfg.seed, cfg.device)
    learn = vision_learner(dls, get_arch(cfg.arch), metrics=accuracy, pretrained=pretrained)
    learn.unfreeze()
    cbs = []
    if schedule is not None:
        cbs.append(make_callback(cfg, schedule, learn.model))
    if not bar: cbs.append(TableLogger())
    fit = learn.fit_one_cycle if cfg.fit == 'one_cycle' else learn.fit
    start = time.perf_counter()
    if bar: fit(cfg.epochs, cfg.lr, cbs=cbs)
    else:
        with learn.no_bar(): fit(cfg.epochs, cfg.lr, cbs=cbs)
    seconds = time.perf_counter() - start
    i = learn.recorder.metric_names.index('accuracy') - 1
    accs = [100 * float(v[i]) for v in learn.recorder.values]
    sparsity = sparsity_report(learn.model, verbose=False)[-1].sparsity
    if schedule is not None and cfg.compact: sparsity = cbs[0].final_sparsity  # measured before the zeros were removed
    return RunResult(schedule or 'dense', sparsity, accs, seconds, cbs[0] if schedule else None,
                     learn.model if cfg.compact else None)


# ---- results ----
def comparison_table(results: list[RunResult]) -> str:
    "schedule, final sparsity, accuracy, change against dense (points), training time."
    dense = next((r for r in results if r.name == 'dense'), None)
    rows = [('schedule', 'sparsity', 'accuracy', 'vs dense', 'time')]
    for r in results:
        delta = '—' if r is dense or dense is None else f"{r.accuracy - dense.accuracy:+.2f}"
        rows.append((r.name, f"{r.sparsity:.2f}%", f"{r.accuracy:.2f}%", delta, format_time(r.seconds)))
    w = [max(len(row[j]) for row in rows) for j in range(5)]
    line = lambda row: '  '.join([f"{row[0]:<{w[0]}}"] + [f"{c:>{w[j]}}" for j, c in enumerate(row) if j]).rstrip()
    rule = '-' * len(line(rows[0]))
    return '\n'.join([line(rows[0]), rule, *map(line, rows[1:])])


def write_csv(results: list[RunResult], path: Path) -> None:
    dense = next((r for r in results if r.name == 'dense'), None)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['schedule', 'sparsity', 'accuracy', 'vs_dense', 'seconds'])
        for r in results:
            w.writerow([r.name, f"{r.sparsity:.4f}", f"{r.accuracy:.4f}",
                        '' if dense is None else f"{r.accuracy - dense.accuracy:.4f}", f"{r.seconds:.1f}"])


def plot_sparsity(results: list[RunResult], path: Path) -> None:
    "One panel per schedule: target and measured sparsity over training (`SparsifyCallback.plot`)."
    from matplotlib.figure import Figure
    runs = [r for r in results if r.callback is not None]
    ncols = min(3, len(runs)); nrows = -(-len(runs) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout='constrained')
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True)).flatten()
    for ax, r in zip(axes, runs):
        r.callback.plot(ax=ax)
        ax.set_title(f"{r.name}: final {r.sparsity:.2f}%", fontsize=10)
    for ax in axes[len(runs):]: ax.set_visible(False)
    fig.savefig(path, dpi=80)


def plot_accuracy(results: list[RunResult], cfg: Config, path: Path) -> None:
    "Validation accuracy per epoch for every run, and each run's final accuracy against dense."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.6), layout='constrained')
    left, right = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[3, 2]))
    colors = {r.name: 'black' if r.name == 'dense' else f"C{i}" for i, r in enumerate(results)}
    for r in results:
        left.plot(range(1, len(r.accuracies) + 1), r.accuracies, marker='o', ms=3, label=r.name, color=colors[r.name],
                  ls='--' if r.name == 'dense' else '-')
    left.axvline(cfg.start_epoch, color='grey', lw=.8, ls=':')
    left.annotate(' pruning starts', (cfg.start_epoch, 0.02), xycoords=('data', 'axes fraction'), fontsize=8, color='grey')
    left.set(xlabel='epochs done', ylabel='validation accuracy (%)', title='accuracy per epoch')
    left.legend(fontsize=8); left.grid(alpha=.3)
    ys = list(range(len(results)))[::-1]
    for y, r in zip(ys, results):
        right.plot([r.accuracy], [y], 'o', ms=8, color=colors[r.name])
        right.annotate(f"  {r.accuracy:.2f}%", (r.accuracy, y), va='center', fontsize=9)
    dense = next((r for r in results if r.name == 'dense'), None)
    if dense is not None: right.axvline(dense.accuracy, color='black', lw=.8, ls='--')
    accs = [r.accuracy for r in results]
    span = max(2., max(accs) - min(accs))
    right.set(yticks=ys, yticklabels=[r.name for r in results], xlim=(min(accs) - .3 * span, max(accs) + .6 * span),
              ylim=(-.6, len(results) - .4), xlabel='final validation accuracy (%)',
              title=f"final accuracy at {cfg.sparsity:g}% sparsity")
    right.grid(alpha=.3, axis='x')
    fig.savefig(path, dpi=80)


def compaction_results(results: list[RunResult], cfg: Config) -> dict[str, dict]:
    "Each compacted run against the dense model: `compaction_report`'s table, printed, on CPU at batch 1 and 32."
    from .compact import compaction_report
    import copy
    dense = next(r for r in results if r.name == 'dense')
    x = torch.randn(1, 3, cfg.size, cfg.size)
    cpu = lambda m: copy.deepcopy(m).cpu().eval()
    out = {}
    for r in results:
        if r is dense or r.model is None: continue
        print(f"\n{r.name}: dense vs compacted (accuracy {dense.accuracy:.2f}% -> {r.accuracy:.2f}%)")
        out[r.name] = compaction_report(cpu(dense.model), cpu(r.model), x, batch_sizes=(1, 32))
    return out


def plot_latency(results: list[RunResult], reports: dict[str, dict], path: Path) -> None:
    "Final accuracy against measured CPU latency (batch 1 and 32) of dense and every compacted run."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.6), layout='constrained')
    axes = fig.subplots(1, 2, sharey=True)
    acc = {r.name: r.accuracy for r in results}
    for ax, bs in zip(axes, (1, 32)):
        key = f'latency bs={bs} (ms)'
        dense_ms = float(np.median([rep[key]['dense'] for rep in reports.values()]))
        ax.plot([dense_ms], [acc['dense']], 'ks', ms=8, label='dense')
        for i, (name, rep) in enumerate(reports.items()):
            ax.plot([rep[key]['small']], [acc[name]], 'o', ms=8, color=f"C{i}", label=f"{name} ({rep[key]['ratio']:.2f}x)")
        ax.set(xlabel=f'CPU latency, batch {bs} (ms)', title=f'accuracy vs measured latency, batch {bs}')
        ax.grid(alpha=.3); ax.legend(fontsize=8)
    axes[0].set_ylabel('final validation accuracy (%)')
    fig.savefig(path, dpi=80)


# ---- the job ----
def _heading(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def run(cfg: Config, data: Data, pretrained: bool, bar: bool) -> list[RunResult]:
    n = len(cfg.schedules) + 1
    _heading(f"[1/{n}] dense baseline: vision_learner(dls, {cfg.arch}, metrics=accuracy, pretrained={pretrained}); "
             f"{fit_call(cfg)}")
    results = [train(cfg, data, pretrained, None, bar)]
    for i, s in enumerate(cfg.schedules, 2):
        _heading(f"[{i}/{n}] {s}: {fit_call(cfg, callback_call(cfg, s))}")
        results.append(train(cfg, data, pretrained, s, bar))
    return results


def _busy_note(device: torch.device) -> None:
    "On a busy CPU, PyTorch's OpenMP threads spin while they wait for each other: say how to avoid it."
    if device.type != 'cpu' or 'OMP_WAIT_POLICY' in os.environ or not hasattr(os, 'getloadavg'): return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(f"note: this machine is busy (load {load:.1f} on {cores} cores); training can be several times slower "
              f"than on an idle one. OMP_WAIT_POLICY=PASSIVE {PROG} (set before Python starts) stops PyTorch's "
              "threads from spinning while they wait, which helps a lot here", flush=True)


def _own_options(cfg: Config) -> str:
    "The methods that prune with their own context and criteria (LAMP, RigL), for the run's description."
    own = [s for s in cfg.schedules if own_options(method_name(s, cfg.allocation))]
    return f" ({', '.join(own)}: by their own, as each run's call shows)" if own else ''


def describe(cfg: Config, data: Data, pretrained: bool) -> str:
    n_valid = int(len(data.files) * VALID_PCT)
    src = "scikit-learn's digits, 8x8 grayscale" if data.name == 'digits' else data.name
    return (f"{PROG}: {cfg.arch} on {src} ({len(data.files):,} images: {len(data.files) - n_valid:,} train, {n_valid:,} "
            f"valid; labels from {data.labelling}) resized to {cfg.size} px, 3 channels, on {cfg.device}\n"
            f"runs: dense, then {', '.join(cfg.schedules)}; {cfg.epochs} epochs each ({cfg.fit}, lr {cfg.lr:g}, "
            f"bs {cfg.bs}, seed {cfg.seed}, {'ImageNet weights' if pretrained else 'random init'}); pruning to "
            f"{cfg.sparsity:g}% {cfg.granularity}/{cfg.context or DEFAULTS['context']} by "
            f"{cfg.criteria or DEFAULTS['criteria']}{_own_options(cfg)} from epoch {cfg.start_epoch}"
            f"{f' to the end of epoch {cfg.end_epoch - 1}, then fine-tuning' if cfg.end_epoch and cfg.end_epoch < cfg.epochs else ''}\n"
            f"output folder: {cfg.out}")


# what the sweep takes from the main job's options; the others describe the main job only
_SWEEP_OPTIONS = {'sweep', 'schedules', 'allocation', 'epochs', 'seeds', 'seed', 'lr', 'bs', 'device', 'out', 'quick'}


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    "The sweep's settings from the command line; raises `UsageError` for a bad value or an option the sweep does not take."
    defaults = vars(build_parser().parse_args([]))
    other = [k for k, v in vars(args).items() if k not in _SWEEP_OPTIONS and v != defaults[k]]
    if other: raise UsageError(f"--{other[0].replace('_', '-')}", "the sweep does not take this option (it always "
                               "trains sweep_cnn on the digits at 8 px, pruning its convolutions' weights)")
    try: sparsities = [float(x) for x in args.sweep.split(',') if x.strip()]
    except ValueError: raise UsageError('--sweep', f"{args.sweep!r} is not a comma-separated list of percents")
    if not sparsities: raise UsageError('--sweep', "give at least one sparsity, such as 80,90,95,98")
    for x in sparsities:
        try: check_sparsity(x)
        except (TypeError, ValueError) as e: raise UsageError('--sweep', e) from e
    spec = args.schedules or SWEEP_METHODS
    methods = [method_name(m.strip(), args.allocation) for m in spec.split(',') if m.strip()]
    if not methods: raise UsageError('--schedules', "give at least one schedule")
    for m in methods:
        try: parse_method(m)
        except ValueError as e: raise UsageError('--schedules', e) from e
    if len(set(methods)) < len(methods): raise UsageError('--schedules', "a method is listed twice")
    base = SWEEP_QUICK if args.quick else SWEEP
    pick = lambda k: getattr(args, k) if getattr(args, k) is not None else base[k]
    return SweepConfig(sparsities, methods, epochs=pick('epochs'), seeds=pick('seeds'), seed=args.seed,
                       lr=pick('lr'), bs=pick('bs'), device=str(_device(args.device)),
                       out=_out_folder(args.out))


def main(argv: Sequence[str] | None = None) -> int:
    "Run the demo; returns the exit code (2 for a bad option, with nothing written)."
    args = build_parser().parse_args(argv)
    if args.sweep is not None:
        try: sweep_cfg = sweep_config(args)
        except UsageError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        return main_sweep(sweep_cfg)
    if args.seeds is not None:
        print(f"{PROG}: error: --seeds: only the sweep runs several seeds; add --sweep SPARSITIES", file=sys.stderr)
        return 2
    try:
        cfg = make_config(args)
        model = check_model(cfg)
        for s in cfg.schedules:  # the callback's own checks, before anything trains
            try: make_callback(cfg, s, model)
            except (TypeError, ValueError) as e: raise UsageError('--schedules', f"{s}: {e}") from e
        data = resolve_data(cfg.data_spec, cfg.max_images, cfg.seed)
        n_train = len(data.files) - int(len(data.files) * VALID_PCT)
        if cfg.bs > n_train: raise UsageError('--bs', f"{cfg.bs} is more than the {n_train} training images; "
                                                      f"use --bs {n_train} or less, or more images")
        cfg = dataclasses.replace(cfg, rigl_delta=max(1, n_train // cfg.bs // 2))  # fastai drops a last partial batch
        pretrained = pretrained_weights(cfg)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(describe(cfg, data, pretrained), flush=True)
    _busy_note(cfg.device)
    total = time.perf_counter()
    results = run(cfg, data, pretrained, bar=sys.stdout.isatty())
    plots = [cfg.out / 'sparsity.png', cfg.out / 'accuracy.png']
    if any(r.callback for r in results): plot_sparsity(results, plots[0])
    else: plots.pop(0)
    plot_accuracy(results, cfg, plots[-1])
    write_csv(results, cfg.out / 'results.csv')
    if cfg.compact and len(results) > 1:
        _heading("What compaction buys: dense vs compacted models (params, MACs, file size, measured CPU latency)")
        reports = compaction_results(results, cfg)
        plots.append(cfg.out / 'accuracy_latency.png')
        plot_latency(results, reports, plots[-1])
    _heading(f"Comparison: accuracy on {int(len(data.files) * VALID_PCT):,} validation images after {cfg.epochs} "
             f"epochs; vs dense in accuracy points")
    print(comparison_table(results))
    print(f"\ntotal time {format_time(time.perf_counter() - total)}; plots and results.csv in {cfg.out}/: "
          f"{', '.join(p.name for p in plots)}", flush=True)
    return 0
