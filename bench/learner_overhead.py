"""Learner throughput vs the seed's hand-written training loop (section 4.1), same model, data and batch size.

Both train the chapter's digits CNN from the same initial weights with SGD (momentum 0.9) at a constant learning
rate on the same shuffled digits batches, in one process. Runs are interleaved (the order alternates each round)
and we report medians; the goal figure is the median over rounds of the paired ratio, which
cancels slow drifts in machine load. The Learner runs with its default callbacks (the `Recorder`) and no validation set, so it does
the seed loop's work plus its events; a second row adds the one-cycle schedule (a learning rate set every batch).

Prints a Markdown table, writes it to bench/results/learner_overhead.md, and ends with `learner_overhead: RATIO`
(Learner samples/s over the seed loop's, medians).
"""
import os, platform, statistics, sys, time
from functools import partial
from types import SimpleNamespace

import torch
from torch import nn

from _results import write_results

from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.learner import Learner, digits_cnn

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 25))  # interleaved rounds
EPOCHS = int(os.environ.get('BENCH_EPOCHS', 1))   # epochs per timed run
BS = int(os.environ.get('BENCH_BS', 64))          # batch size, both loops
THREADS = int(os.environ.get('BENCH_THREADS', 1))  # torch threads (1: steadier on shared cores)


def seed_loop(net, trainloader, epochs):
    "The seed's section 4.1 loop, verbatim but for the loader and the print interval."
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(epochs):
        running_loss = 0.0
        for i, data in enumerate(trainloader, 0):
            inputs, labels = data
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print('[%d, %5d] loss: %.3f' % (epoch + 1, i + 1, running_loss / 2000))
                running_loss = 0.0


def learner_loop(net, trainloader, epochs, sched=None):
    learn = Learner(net, SimpleNamespace(train=trainloader, valid=None), nn.CrossEntropyLoss(),
                    partial(torch.optim.SGD, momentum=0.9), lr=0.01, progress=False, device='cpu')
    learn.fit(epochs, sched=sched)


def cpu_name():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def interleaved(runs, make_args, rounds):
    "Time each run `rounds` times, rotating and reversing the order each round; a warm-up round first."
    names = list(runs)
    def timed(n):
        args = make_args()
        torch.manual_seed(1)
        t0 = time.perf_counter(); runs[n](*args); return time.perf_counter() - t0
    for n in names: timed(n)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in (order[::-1] if r % 2 else order): times[n].append(timed(n))
    return times


def main():
    torch.set_num_threads(THREADS)
    dls = image_dataloaders('digits', batch_size=BS, seed=0, verbose=False)
    x, y = dls.train.x, dls.train.y
    torch.manual_seed(0); init = digits_cnn().state_dict()
    def cnn_args():
        net = digits_cnn(); net.load_state_dict(init)
        return net, TensorLoader(x, y, BS, shuffle=True, seed=0), EPOCHS
    seed_name = 'seed loop (section 4.1)'
    runs = {seed_name: seed_loop, 'Learner': learner_loop, 'Learner + one-cycle schedule': partial(learner_loop, sched='one_cycle')}
    times = interleaved(runs, cnn_args, ROUNDS)

    n_samples, n_batches = EPOCHS * len(x), EPOCHS * len(TensorLoader(x, y, BS))
    med = {n: statistics.median(v) for n, v in times.items()}
    paired = {n: statistics.median(s / t for s, t in zip(times[seed_name], v)) for n, v in times.items()}
    base = med[seed_name]
    lines = [f'Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({THREADS} thread), '
             f'Python {platform.python_version()}',
             '',
             f'Digits CNN ({sum(p.numel() for p in digits_cnn().parameters()):,} parameters), {len(x)} training images, '
             f'batch size {BS}, {EPOCHS} epoch per run ({n_batches} batches), SGD momentum 0.9, {ROUNDS} interleaved '
             'rounds. Throughput ratio = median over rounds of (seed time / Learner time) in the same round.',
             '',
             '| loop | median time per run (s) | median samples/s | throughput / seed loop |',
             '|---|---|---|---|']
    for n in runs:
        lines.append(f'| {n} | {med[n]:.3f} | {n_samples / med[n]:,.0f} | {paired[n]:.3f} |')

    # the Learner's own cost per batch, visible on a model too small to hide it
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(64 * 100, 16, generator=g), torch.randint(0, 10, (64 * 100,), generator=g)
    def tiny_args(): torch.manual_seed(0); return nn.Linear(16, 10), TensorLoader(tx, ty, 64, shuffle=True), 1
    tiny = interleaved({seed_name: seed_loop, 'Learner': learner_loop}, tiny_args, 15)
    best = {n: min(v) / 100 * 1e6 for n, v in tiny.items()}
    lines += ['', 'Per-batch cost on a tiny model (Linear 16→10, batch 64, 100 batches, best of 15 interleaved runs):', '',
              '| loop | µs per batch |', '|---|---|']
    lines += [f'| {n} | {v:.1f} |' for n, v in best.items()]
    lines += [f'| Learner − seed loop | {best["Learner"] - best[seed_name]:+.1f} |']

    write_results('learner_overhead', 'Learner overhead', '\n'.join(lines))
    print(f'learner_overhead: {paired["Learner"]:.2f}')


if __name__ == '__main__':
    sys.exit(main())
