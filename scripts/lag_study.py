"""The main job's agp under two recompute policies, several seeds: the masks within max_lag of the target (the
default) against the old default (every 100 steps and at each epoch's end, no lag bound). Dense runs once per seed.

    python scripts/lag_study.py --seeds 42,0,1 --lags 0.05 --out lag_study   # about 7 minutes a seed on 2 CPU cores

Prints a markdown table (final accuracy per seed, mean and spread, against dense) and the per-epoch accuracies,
writes results.json and accuracy.png into --out. Any other option is the main job's (`python -m fasterai_sched -h`)."""
import argparse, dataclasses, json, statistics, sys
from pathlib import Path
from fasterai_sched import demo

OLD = {'agp, every 100 steps (old default)': dict(max_lag='none', frequency=100)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', default='42,0,1')
    p.add_argument('--out', default='lag_study')
    p.add_argument('--lags', default='0.05', help='the max_lag values to compare with the old default')
    args, rest = p.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(',')]
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    base = demo.make_config(demo.build_parser().parse_args(['--schedules', 'agp', '--out', str(out), *rest]))
    data = demo.resolve_data(base.data_spec, base.max_images, base.seed)
    pretrained = demo.pretrained_weights(base)
    policies = {f'agp, max_lag {float(v):g}': dict(max_lag=float(v)) for v in args.lags.split(',')} | OLD
    runs = {'dense': [], **{k: [] for k in policies}}
    for seed in seeds:
        cfg = dataclasses.replace(base, seed=seed)
        runs['dense'].append(demo.train(cfg, data, pretrained, None, bar=False).accuracies)
        for name, policy in policies.items():
            r = demo.train(dataclasses.replace(cfg, **policy), data, pretrained, 'agp', bar=False)
            runs[name].append(r.accuracies)
            print(f"seed {seed} {name}: {r.accuracies[-1]:.2f}% (sparsity {r.sparsity:.2f}%)", file=sys.stderr, flush=True)
    (out / 'results.json').write_text(json.dumps({'seeds': seeds, 'config': str(base), 'accuracies': runs}, indent=1))
    print(table(runs, seeds))
    plot(runs, out / 'accuracy.png')


def table(runs: dict, seeds: list[int]) -> str:
    dense = statistics.fmean(a[-1] for a in runs['dense'])
    lines = ['| run | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean | spread | vs dense |',
             '| --- |' + ' --- |' * (len(seeds) + 3)]
    for name, accs in runs.items():
        final = [a[-1] for a in accs]
        mean = statistics.fmean(final)
        lines.append(f"| {name} | " + ' | '.join(f'{f:.2f}' for f in final) +
                     f" | {mean:.2f} | {max(final) - min(final):.2f} | {'—' if name == 'dense' else f'{mean - dense:+.2f}'} |")
    lines += ['', 'validation accuracy per epoch, mean over seeds:', '']
    for name, accs in runs.items():
        lines.append(f"- {name}: " + ', '.join(f'{statistics.fmean(e):.1f}' for e in zip(*accs)))
    return '\n'.join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, accs) in enumerate(runs.items()):
        color = 'black' if name == 'dense' else f'C{i}'
        for a in accs: ax.plot(range(len(a)), a, color=color, alpha=.25, lw=1)
        ax.plot(range(len(accs[0])), [statistics.fmean(e) for e in zip(*accs)], color=color, lw=2, label=f'{name} (mean)')
    ax.set(xlabel='epoch', ylabel='validation accuracy (%)', title='agp to 90% on the main job: recompute policies')
    ax.legend(); ax.grid(alpha=.3)
    fig.savefig(path, dpi=80)


if __name__ == '__main__': main()
