"""Benchmark of the recurrent chapter (`bigmodel_nb.rnn`).

1. The from-scratch layers (`from_torch` twins: a Python loop over the steps, one cell call per step) against
   `nn.RNN`, `nn.LSTM` and `nn.GRU` (fused C++ loops): median time of the forward pass and of forward + backward,
   the two taking turns (`interleaved_rounds`), and their ratio (information, no goal).
2. The goal: Fashion-MNIST read row by row (28 steps of 28 pixels) by `RowClassifier(ROW_CONFIG)` (and any other
   `CONTENDERS`, each in turn), trained from
   scratch on all 60,000 training images for at most 5 minutes (`train_row_classifier`: AdamW, one-cycle schedule paced
   by `TimeBudget`, label smoothing 0.1, each image shifted by up to one pixel and half of them flipped), measured on
   the 10,000 test images. Goal: >= 91% test accuracy. On a machine shared with other jobs, run it at a higher
   priority (`nice -n -15`): the budget is wall time.
   Last line: `rnn: fashion rows <test accuracy>% in <training seconds> s`.

Writes bench/results/rnn.md. Options: --seconds (training budget, default 280), --threads (default 2),
--skip-timing, --limit N (smoke test), --arch/--pool/--hidden/--seed (the goal model's variants), --out FILE.
"""
import argparse, dataclasses

import torch
import torch.nn as nn

from bigmodel_nb.concepts import interleaved_rounds, machine_info, markdown_table, time_stats
from bigmodel_nb.rnn import RowConfig, from_torch, train_row_classifier

from _results import write_results

ROW_CONFIG = RowConfig(arch='lstm', hidden=128, layers=2, bidirectional=False, pool='meanmax')  # the goal's model
CONTENDERS = [ROW_CONFIG]  # add RowConfig(...)s to compare others under the same budget (each adds its budget to the run)
SHAPES = [  # (layer, batch, steps, input, hidden)
    (nn.RNN, 32, 100, 64, 256), (nn.LSTM, 32, 100, 64, 256), (nn.GRU, 32, 100, 64, 256), (nn.LSTM, 128, 28, 28, 128)]


def layer_rows(rounds=3, repeats=3):
    "Median seconds of each from-scratch layer and its torch twin, forward and forward + backward."
    rows = []
    for cls, B, T, I, H in SHAPES:
        torch.manual_seed(0)
        ref = cls(I, H, batch_first=True); ours = from_torch(ref)
        x = torch.randn(B, T, I)
        with torch.no_grad():
            fwd = interleaved_rounds({'ours': lambda: ours(x), 'ref': lambda: ref(x)}, rounds, repeats)
        bwd = interleaved_rounds({'ours': lambda: ours(x)[0].sum().backward(), 'ref': lambda: ref(x)[0].sum().backward()}, rounds, repeats)
        fo, fr, bo, br = (time_stats(t[k])['median'] for t in (fwd, bwd) for k in ('ours', 'ref'))
        rows.append({'layer': f"{cls.__name__} B={B} T={T} {I}→{H}", 'scratch fwd ms': fo * 1e3, 'torch fwd ms': fr * 1e3,
                     'fwd ratio': fo / fr, 'scratch fwd+bwd ms': bo * 1e3, 'torch fwd+bwd ms': br * 1e3, 'fwd+bwd ratio': bo / br})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seconds', type=float, default=280., help='training budget of the Fashion-MNIST model (default 280)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--skip-timing', action='store_true')
    ap.add_argument('--limit', type=int, default=None, help='smoke test: train on the first N images')
    ap.add_argument('--arch', default=ROW_CONFIG.arch, choices=['lstm', 'gru'], help="the goal model's recurrent cell (default lstm)")
    ap.add_argument('--pool', default=ROW_CONFIG.pool, choices=['last', 'mean', 'meanmax'], help="what the goal model's head reads (default: ROW_CONFIG's, meanmax)")
    ap.add_argument('--hidden', type=int, default=ROW_CONFIG.hidden, help="the goal model's units per layer")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mach = machine_info()
    print(f"machine: {mach}", flush=True)
    parts = []
    if not args.skip_timing:
        rows = layer_rows()
        fmt = {k: ('.2f' if k.endswith('ms') else (lambda v: f"{v:.1f}×")) for k in rows[0] if k != 'layer'}
        md = markdown_table(rows, fmt=fmt)
        print(md, flush=True)
        parts.append("## From-scratch layers against torch.nn (batch-first, float32)\n\n" + md)
    rows, goal_cfg = [], dataclasses.replace(ROW_CONFIG, arch=args.arch, pool=args.pool, hidden=args.hidden)
    for cfg in [goal_cfg] + CONTENDERS[1:]:
        _, r = train_row_classifier(cfg, seconds=args.seconds, limit=args.limit, seed=args.seed)
        print(r, flush=True); rows.append(r)
    row = rows[0]
    md = markdown_table([{k: v for k, v in r.items() if k != 'machine'} for r in rows], fmt={'test_acc': '.2%', 'params': ',d'})
    print(md, flush=True)
    parts.append(f"## Fashion-MNIST row by row (goal: >= 91% test accuracy in 5 minutes)\n\n{md}\n\n"
                 f"The goal's model is the first row, {goal_cfg}; the others are trained alike for comparison.")
    write_results('rnn', 'Recurrent networks (chapter 04)', '\n\n'.join(parts) + f"\n\nMachine: {mach}", out=args.out, show=False)
    goal = 'met' if row['test_acc'] >= 0.91 and row['train_seconds'] <= 300 else 'missed'
    print(f"rnn: fashion rows {100 * row['test_acc']:.2f}% in {row['train_seconds']:.0f} s "
          f"({row['model']}, {row['epochs']} epochs, {mach}); goal >= 91% in 300 s: {goal}")


if __name__ == '__main__':
    main()
