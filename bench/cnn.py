"""Benchmark of the CNN chapter.

1. The from-scratch convolution (im2col + matmul) against `F.conv2d` on the shapes the chapter's networks use:
   median times, forward and forward+backward, and their ratio (information, no goal), the two taking turns
   (`interleaved_rounds`).
2. The goal: the strong CNN (`FashionCNN(CNNConfig())`) trained from scratch on all 60,000 Fashion-MNIST training
   images with the chapter's recipe under a time budget, `CNNRecipe(time_budget=285)` (the learner's `TimeBudget` paces
   the one-cycle schedule by the clock and stops at 285 s, so the five minutes hold on a slower or busier machine), and
   measured on the 10,000 test images. Last line: `cnn: <test accuracy>% in <training seconds> s`.

Writes the Markdown tables to bench/results/cnn.md. The budget makes this model depend on the machine's speed, so it
is not saved where `get_trained_cnn()` looks (that one is trained with the fixed-epoch default recipe); `--save FILE`
keeps it. Options: --epochs N, --time-budget SECONDS (0: none, the epochs alone), --save FILE, --limit N and
--out FILE (smoke tests).
"""
import argparse, sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

from bigmodel_nb.cnn import CNNConfig, CNNRecipe, conv2d, save_cnn, train_fashion_cnn
from bigmodel_nb.concepts import interleaved_rounds, machine_info, markdown_table, time_stats

from _results import write_results

SHAPES = [  # (name, x shape, weight shape, padding)
    ('LeNet conv1, 1→6 5×5 on 28×28', (128, 1, 28, 28), (6, 1, 5, 5), 0),
    ('LeNet conv2, 6→16 5×5 on 12×12', (128, 6, 12, 12), (16, 6, 5, 5), 0),
    ('CNN 32→64 3×3 on 14×14', (128, 32, 14, 14), (64, 32, 3, 3), 1),
    ('CNN 64→128 3×3 on 7×7', (128, 64, 7, 7), (128, 64, 3, 3), 1),
]


def conv_rows(rounds=4, repeats=5):
    "Median seconds of the from-scratch conv and of `F.conv2d`, forward and forward+backward, per shape."
    rows = []
    for name, xs, ws, p in SHAPES:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(*xs, generator=g), torch.randn(*ws, generator=g), torch.randn(ws[0], generator=g)
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        with torch.no_grad():
            fwd = interleaved_rounds({'ours': lambda: conv2d(x, w, b, 1, p), 'ref': lambda: F.conv2d(x, w, b, 1, p)},
                                     rounds, repeats)
        bwd = interleaved_rounds({'ours': lambda: conv2d(xg, wg, bg, 1, p).sum().backward(),
                                  'ref': lambda: F.conv2d(xg, wg, bg, 1, p).sum().backward()}, rounds, repeats)
        fo, fr, bo, br = (time_stats(t[k])['median'] for t in (fwd, bwd) for k in ('ours', 'ref'))
        rows.append({'conv (batch 128)': name, 'scratch fwd ms': fo * 1e3, 'F.conv2d fwd ms': fr * 1e3, 'fwd ratio': fo / fr,
                     'scratch fwd+bwd ms': bo * 1e3, 'F.conv2d fwd+bwd ms': br * 1e3, 'fwd+bwd ratio': bo / br})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=None, help="epochs at most (default: CNNRecipe()'s)")
    ap.add_argument('--time-budget', type=float, default=285., help='seconds of training at most, pacing the one-cycle schedule (default 285; 0: none)')
    ap.add_argument('--save', default=None, help='save the trained model to this .safetensors file')
    ap.add_argument('--limit', type=int, default=None, help='smoke test: train on a stratified subset of this many images')
    ap.add_argument('--out', default=None, help='the Markdown file to write (default: bench/results/cnn.md)')
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    mach = machine_info()
    print(f"machine: {mach}", flush=True)

    rows = conv_rows()
    fmt = {k: ('.2f' if k.endswith('ms') else (lambda v: f"{v:.2f}×")) for k in rows[0] if k != 'conv (batch 128)'}
    conv_md = markdown_table(rows, fmt=fmt)
    print(conv_md, flush=True)
    ratio = torch.tensor([r['fwd ratio'] for r in rows]).log().mean().exp().item()
    print(f"from-scratch conv / F.conv2d forward time, geometric mean over {len(rows)} shapes: {ratio:.2f}×", flush=True)

    cfg = CNNConfig()
    recipe = CNNRecipe(time_budget=args.time_budget or None, **({'epochs': args.epochs} if args.epochs else {}))
    model, row = train_fashion_cnn(cfg, recipe, limit=args.limit, progress=True, name='strong CNN (FashionCNN)')
    if args.save:
        p = save_cnn(model, args.save, info={'recipe': asdict(recipe), **row, 'limit': args.limit})
        print(f"saved {p}", flush=True)

    budget = f", time budget {recipe.time_budget:g} s (`TimeBudget`)" if recipe.time_budget else ''
    goal = [{'model': f"FashionCNN {list(cfg.channels)}×{list(cfg.convs)}, head {cfg.hidden} (dropout {cfg.dropout}), "
                      f"AdamW one-cycle lr {recipe.lr}, weight decay {recipe.weight_decay}, flips, label smoothing "
                      f"{recipe.label_smoothing}, {recipe.epochs} epochs at most{budget}",
             'params': row['params'], 'epochs': row['epochs'], 'batch': recipe.batch_size, 'training time (s)': row['train_s'],
             'test accuracy': row['test_acc'], 'test accuracy, flip TTA': row['test_acc_tta']}]
    goal_md = markdown_table(goal, fmt={'training time (s)': '.1f', 'test accuracy': '.2%', 'test accuracy, flip TTA': '.2%'})
    md = [f'Machine: {mach}', '',
          f"## The goal: the strong CNN on Fashion-MNIST ({row['train_images']:,} training images, {row['test_images']:,} test images)", '',
          goal_md, '', '## From-scratch convolution (im2col + matmul) vs `F.conv2d` (medians of 20 calls each, in 4 interleaved rounds)', '',
          conv_md, '', f'Geometric mean of the forward ratios: {ratio:.2f}× (information, no goal).', '']
    write_results('cnn', 'CNN benchmark', '\n'.join(md), out=args.out, show=False)
    print(goal_md)
    print(f"cnn: {row['test_acc']*100:.1f}% in {row['train_s']:.0f} s")


if __name__ == '__main__':
    sys.exit(main())
