"""Benchmark of the CNN chapter.

1. The from-scratch convolution (im2col + matmul) against `F.conv2d` on the shapes the chapter's networks use:
   median times, forward and forward+backward, and their ratio (information, no goal).
2. The goal: the strong CNN (`FashionCNN`, `cnn_config()`) trained from scratch on all 60,000 Fashion-MNIST training
   images, measured on the 10,000 test images. Last line: `cnn: <test accuracy>% in <training seconds> s`.

Writes the Markdown table to bench/results/cnn.md and saves the trained model to the user cache (`cnn_path()`), where
the later chapters find it. Options: --epochs N, --time-budget SECONDS (pace the one-cycle by the clock), --no-save,
--limit N and --out FILE (smoke tests).
"""
import argparse, os, sys, time

import torch
import torch.nn.functional as F

from bigmodel_nb.cnn import cnn_config, cnn_path, conv2d, machine_info, save_cnn, time_call, train_fashion_cnn

from _results import write_results

SHAPES = [  # (name, x shape, weight shape, padding)
    ('LeNet conv1, 1→6 5×5 on 28×28', (128, 1, 28, 28), (6, 1, 5, 5), 0),
    ('LeNet conv2, 6→16 5×5 on 12×12', (128, 6, 12, 12), (16, 6, 5, 5), 0),
    ('CNN 32→64 3×3 on 14×14', (128, 32, 14, 14), (64, 32, 3, 3), 1),
    ('CNN 64→128 3×3 on 7×7', (128, 64, 7, 7), (128, 64, 3, 3), 1),
]


def conv_rows(n=20):
    rows = []
    for name, xs, ws, p in SHAPES:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(*xs, generator=g), torch.randn(*ws, generator=g), torch.randn(ws[0], generator=g)
        with torch.no_grad():
            fo, fr = time_call(lambda: conv2d(x, w, b, 1, p), n), time_call(lambda: F.conv2d(x, w, b, 1, p), n)
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        bo = time_call(lambda: conv2d(xg, wg, bg, 1, p).sum().backward(), n)
        br = time_call(lambda: F.conv2d(xg, wg, bg, 1, p).sum().backward(), n)
        rows.append((name, fo * 1e3, fr * 1e3, fo / fr, bo * 1e3, br * 1e3, bo / br))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=None, help="epochs (default: cnn_config()'s)")
    ap.add_argument('--time-budget', type=float, default=None, help="seconds of training at most; paces the one-cycle schedule (default: cnn_config()'s)")
    ap.add_argument('--no-save', action='store_true', help='do not save the trained model to the user cache')
    ap.add_argument('--limit', type=int, default=None, help='smoke test: train on a subset of this many images (implies --no-save)')
    ap.add_argument('--out', default=None, help='the Markdown file to write (default: bench/results/cnn.md)')
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    mach = f"{machine_info()}; torch threads {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}"
    print(f"machine: {mach}", flush=True)

    rows = conv_rows()
    conv_md = ['| conv (batch 128) | scratch fwd ms | F.conv2d fwd ms | ratio | scratch fwd+bwd ms | F.conv2d fwd+bwd ms | ratio |',
               '|---|---|---|---|---|---|---|']
    conv_md += [f'| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f}× | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f}× |' for r in rows]
    print('\n'.join(conv_md), flush=True)
    ratio = torch.tensor([r[3] for r in rows]).log().mean().exp().item()
    print(f"from-scratch conv / F.conv2d forward time, geometric mean over {len(rows)} shapes: {ratio:.2f}×", flush=True)

    over = {k: v for k, v in dict(epochs=args.epochs, time_budget=args.time_budget).items() if v is not None}
    cfg = cnn_config(**over)
    model, row = train_fashion_cnn(cfg, limit=args.limit, progress=True, name='strong CNN (FashionCNN)')
    if not (args.no_save or args.limit):
        p = save_cnn(model, cnn_path(), info={**row, 'limit': None})
        print(f"saved {p}", flush=True)

    budget = f", time budget {cfg['time_budget']:g} s" if cfg['time_budget'] else ''
    md = [f'Machine: {mach}', '',
          f"## The goal: the strong CNN on Fashion-MNIST ({row['train_images']:,} training images, {row['test_images']:,} test images)", '',
          '| model | params | epochs | batch | training time (s) | test accuracy | test accuracy, flip TTA |', '|---|---|---|---|---|---|---|',
          f"| FashionCNN {cfg['channels']}×{cfg['convs']}, head {cfg['hidden']} (dropout {cfg['dropout']}), AdamW one-cycle lr {cfg['lr']}, "
          f"weight decay {cfg['weight_decay']}, flips, label smoothing {cfg['label_smoothing']}, {cfg['epochs']} epochs at most"
          f"{budget}"
          f" | {row['params']:,} | {row['epochs']} | {cfg['batch_size']} | {row['train_s']:.1f} | {row['test_acc']:.2%} | {row['test_acc_tta']:.2%} |",
          '', '## From-scratch convolution (im2col + matmul) vs `F.conv2d` (medians of 20 calls)', '', *conv_md, '',
          f'Geometric mean of the forward ratios: {ratio:.2f}× (information, no goal).', '']
    write_results('cnn', 'CNN benchmark', '\n'.join(md), out=args.out, show=False)
    print('\n'.join(md[2:7]))
    print(f"cnn: {row['test_acc']*100:.1f}% in {row['train_s']:.0f} s")


if __name__ == '__main__':
    sys.exit(main())
