"""Benchmark of the pretraining chapter's image half: unsupervised pretraining (SimCLR) of the CNN's conv stages and
hidden layer on the 60,000 Fashion-MNIST training images without labels, then few-label fine-tuning against scratch.

1. `--pretrain`: pretrain with `PretrainRecipe()` (a `TimeBudget` caps it at its `time_budget`, under 10 minutes on
   this machine) and save it where `get_pretrained()` looks. Run it alone, under the exclusive lock: the budget makes
   the network depend on the machine's speed.
2. Default: the cached network, fine-tuned with `FineTuneRecipe()` (step-counted, so the lock is not needed) with 10
   and 100 labels per class, four arms (scratch, linear probe, full fine-tuning, probe then full), seeds 0, 1, 2 (the
   seed also draws the labelled images); test accuracy on all 10,000 test images; median and spread.
   Goal: with 10 labels per class, full fine-tuning of the pretrained network beats scratch by >= 8 points (medians).
   Last line: `pretrain gain: <points>`.

Writes bench/results/pretrain.md (the pretraining facts are read from the cached network's JSON).
Options: --pretrain, --objective simclr|mae, --epochs E, --mask-ratio R, --keep K, --seeds 0 1 2, --k 10 100, --arms ...
"""
import argparse, json, time
from dataclasses import asdict, replace

import torch

from bigmodel_nb.concepts import machine_info, markdown_table
from bigmodel_nb.data import image_dataloaders
from bigmodel_nb.pretrain import (median_spread, FINE_TUNE_ARMS, FineTuneRecipe, PretrainRecipe, compare_fine_tuning, fine_tuning_table,
                                  get_pretrained, pretrained_path)

from _results import RESULTS, write_results

GOAL_ARM, GOAL_POINTS = 'full fine-tuning', 8.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--pretrain', action='store_true', help='pretrain and cache (run alone, under the lock)')
    ap.add_argument('--objective', default='simclr', choices=['simclr', 'mae'])
    ap.add_argument('--mask-ratio', type=float, default=None, help="the autoencoder's share of hidden patches (default: the recipe's)")
    ap.add_argument('--epochs', type=int, default=None, help="pretraining epochs at most (default: the recipe's; the time budget still caps it)")
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--k', type=int, nargs='+', default=[10, 100])
    ap.add_argument('--arms', nargs='+', default=list(FINE_TUNE_ARMS))
    ap.add_argument('--keep', type=int, default=None, help="modules copied from the pretrained network (default: FineTuneRecipe's)")
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: the runtime setting)')
    ap.add_argument('--rows', nargs='+', default=None, help='rebuild the report from these *_rows.json files')
    ap.add_argument('--out', default='pretrain', help='results name: bench/results/NAME.md (to run arms in separate processes)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    ft = replace(FineTuneRecipe(), **({'keep': a.keep} if a.keep else {}))
    recipe = replace(PretrainRecipe(), objective=a.objective, **({'epochs': a.epochs} if a.epochs else {}),
                     **({'mask_ratio': a.mask_ratio} if a.mask_ratio else {}))
    print(machine_info(), flush=True)
    dls = image_dataloaders('fashion_mnist', valid_pct=0.0, seed=0, verbose=False)
    if a.pretrain:
        path = pretrained_path(recipe)
        if path.is_file(): path.unlink()  # measure a fresh run
        net = get_pretrained(recipe, dls=dls, verbose=True)
        print(f"pretrained: {json.dumps({k: v for k, v in net.info.items() if k != 'recipe'})}")
        return
    net = get_pretrained(recipe, dls=dls, verbose=not a.rows)
    info = net.info
    t0 = time.perf_counter()
    rows = []
    if a.rows:  # rebuild the report from saved rows (or rows of several processes, merged)
        merged = {}
        for f in a.rows:
            for r in json.loads(open(f).read())['rows']:
                m = merged.setdefault((r['arm'], r['labels_per_class']), dict(r, accs=[]))
                m['accs'] = m['accs'] + r['accs']
        rows = [dict(r, runs=len(r['accs']), **median_spread(r['accs'])) for r in merged.values()]
        rows.sort(key=lambda r: (r['labels_per_class'], list(FINE_TUNE_ARMS).index(r['arm'])))
        secs = sum(json.loads(open(f).read())['seconds'] for f in a.rows)
    else:
        for k in a.k:
            rows += compare_fine_tuning(dls, net, k, tuple(a.seeds), ft, {n: FINE_TUNE_ARMS[n] for n in a.arms})
        secs = time.perf_counter() - t0
        with open(RESULTS / f'{a.out}_rows.json', 'w') as f: json.dump(dict(rows=rows, seconds=secs, machine=machine_info()), f)
    base = {r['labels_per_class']: r for r in rows if r['arm'] == 'scratch'}
    goal = next((r for r in rows if r['arm'] == GOAL_ARM and r['labels_per_class'] == 10), None)
    gain = None if goal is None or 10 not in base else 100 * (goal['median'] - base[10]['median'])
    paired = None if goal is None or 10 not in base else [100 * (g - s) for g, s in zip(goal['accs'], base[10]['accs'])]
    r = info['recipe']
    body = (f"Machine: {machine_info()}\n\n"
            f"## Pretraining ({r['objective']}, no labels, all {info['images']:,} training images)\n\n"
            f"{info['steps']} steps of {r['batch_size']} images ({'two views each, ' if r['objective'] == 'simclr' else ''}"
            f"{r['epochs']} epochs at most, time budget {r['time_budget']} s) in {info['seconds']} s on {info['machine']}; "
            f"last loss {info['last_loss']}. Recipe: `{json.dumps(r)}`.\n\n"
            f"## Fine-tuning (`FineTuneRecipe({'' if a.keep is None else f'keep={a.keep}'})`: {ft.steps} steps, keeping {ft.keep} modules, seeds {a.seeds}, all 10,000 test images)\n\n"
            f"{fine_tuning_table(rows)}\n\n"
            f"Per-seed test accuracies: " + '; '.join(f"{x['arm']} k={x['labels_per_class']}: " + ', '.join(f'{100 * v:.2f}' for v in x['accs']) for x in rows) +
            f"\n\nFine-tuning runs took {secs:.0f} s in all (step-counted).\n\n"
            f"Goal: with 10 labels per class, {GOAL_ARM} of the pretrained network >= scratch + {GOAL_POINTS} points (medians over 3 seeds): "
            + ('not measured' if gain is None else f"{gain:+.2f} points (paired per seed: {', '.join(f'{p:+.2f}' for p in paired)}) — "
               f"{'MET' if gain >= GOAL_POINTS else 'NOT met'}") + '\n')
    write_results(a.out, f"Pretraining benchmark: {'SimCLR' if r['objective'] == 'simclr' else 'the masked-patch autoencoder'} on the conv stages, few-label fine-tuning", body)
    print(f"pretrain gain: {gain:.2f}" if gain is not None else "pretrain gain: n/a")


if __name__ == '__main__':
    main()
