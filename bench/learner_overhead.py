"""Learner throughput vs the seed's hand-written training loop (section 4.1), same model, data and batch size.

Both train the chapter's digits CNN from the same initial weights with SGD (momentum 0.9) at a constant learning
rate on the same shuffled digits batches, in one process. The seed loop is `learner.seed_fit`, the chapter's own copy
of the seed's code; the Learner runs `fit` (constant rate) with its default callbacks (the `Recorder`) and no
validation set, so it does the seed loop's work plus its events. A third row runs `fit_one_cycle` (a learning rate
set every batch). Runs are interleaved with `concepts.interleaved_rounds` (the order rotates and reverses each round);
each run's fresh model and loader are made untimed, before it. The goal figure is the median over rounds of the
paired ratio (seed time / Learner time in the same round), which cancels slow drifts in the machine's load.

Prints a Markdown table, writes it to bench/results/learner_overhead.md, and ends with the line
`learner_overhead: RATIO (goal >= 0.97: met|NOT met)` (Learner samples/s over the seed loop's).
"""
import contextlib, io, os, statistics, sys
from functools import partial

import torch
from torch import nn

from _results import write_results

from bigmodel_nb.concepts import interleaved_rounds, machine_info, markdown_table, time_stats, torch_threads
from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.learner import Learner, digits_cnn, seed_fit

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 25))   # interleaved rounds
EPOCHS = int(os.environ.get('BENCH_EPOCHS', 1))    # epochs per timed run
BS = int(os.environ.get('BENCH_BS', 64))           # batch size, both loops
THREADS = int(os.environ.get('BENCH_THREADS', 1))  # torch threads (1: steadier on shared cores)
LR = 0.01
GOAL = 0.97                                         # Learner throughput / seed loop's, at least
SEED = 'seed loop (section 4.1)'


def learner_fit(args, one_cycle=False):
    "Train `net` on `loader` with the Learner, as the seed loop does (no validation, progress off)."
    net, loader, epochs = args
    learn = Learner(net, (loader, None), nn.CrossEntropyLoss(), partial(torch.optim.SGD, momentum=0.9), lr=LR,
                    progress=False, device='cpu')
    if one_cycle: learn.fit_one_cycle(epochs)
    else: learn.fit(epochs)


def seed_run(args):
    net, loader, epochs = args
    seed_fit(net, loader, epochs=epochs, lr=LR)


def timed(runners, make_args, rounds):
    """Seconds per run of each runner, in interleaved rounds after an untimed one; a fresh `make_args()` and the same
    RNG seed before each run, untimed."""
    def setup():
        args = make_args(); torch.manual_seed(1)  # dropout draws from the global RNG: the same draws for everyone
        return args
    setups = {n: setup for n in runners}
    with contextlib.redirect_stdout(io.StringIO()):  # the seed loop prints 'Finished Training' after every run
        interleaved_rounds(runners, rounds=1, repeats=1, warmup=0, setups=setups)  # one untimed round first
        return interleaved_rounds(runners, rounds=rounds, repeats=1, warmup=0, setups=setups)


def main():
    dls = image_dataloaders('digits', batch_size=BS, seed=0, verbose=False)
    x, y = dls.train.x, dls.train.y
    torch.manual_seed(0); init = digits_cnn().state_dict()
    def cnn_args():
        net = digits_cnn(); net.load_state_dict(init)
        return net, TensorLoader(x, y, BS, shuffle=True, seed=0), EPOCHS
    runners = {SEED: seed_run, 'Learner (`fit`)': learner_fit,
               'Learner (`fit_one_cycle`)': partial(learner_fit, one_cycle=True)}
    with torch_threads(THREADS):
        times = timed(runners, cnn_args, ROUNDS)
        # the Learner's own cost per batch, visible on a model too small to hide it
        g = torch.Generator().manual_seed(0)
        tx, ty = torch.randn(64 * 100, 16, generator=g), torch.randint(0, 10, (64 * 100,), generator=g)
        def tiny_args(): torch.manual_seed(0); return nn.Linear(16, 10), TensorLoader(tx, ty, 64, shuffle=True), 1
        tiny = timed({SEED: seed_run, 'Learner (`fit`)': learner_fit}, tiny_args, 15)
        info = machine_info()

    n_samples, n_batches = EPOCHS * len(x), EPOCHS * len(TensorLoader(x, y, BS))
    paired = {n: statistics.median(s / t for s, t in zip(times[SEED], v)) for n, v in times.items()}
    rows = [dict(loop=n, median=time_stats(v)['median'], p90=time_stats(v)['p90'],
                 samples=n_samples / time_stats(v)['median'], ratio=paired[n]) for n, v in times.items()]
    table = markdown_table(rows, headers=dict(median='median time per run (s)', p90='p90 (s)',
                                              samples='median samples/s', ratio='throughput / seed loop'),
                           fmt=dict(median='.3f', p90='.3f', samples=',.0f', ratio='.3f'))
    best = {n: min(v) / 100 for n, v in tiny.items()}  # seconds per batch, best run
    tiny_rows = [dict(loop=n, us=v * 1e6) for n, v in best.items()]
    tiny_rows.append(dict(loop='Learner − seed loop', us=(best['Learner (`fit`)'] - best[SEED]) * 1e6))
    tiny_table = markdown_table(tiny_rows, headers=dict(us='µs per batch'), fmt=dict(us='.1f'))
    ratio = paired['Learner (`fit`)']
    body = '\n'.join([
        f'Machine: {info}', '',
        f'Digits CNN ({sum(p.numel() for p in digits_cnn().parameters()):,} parameters), {len(x):,} training images, '
        f'batch size {BS}, {EPOCHS} epoch per run ({n_batches} batches), SGD momentum 0.9, learning rate {LR}, '
        f'{ROUNDS} interleaved rounds. Throughput ratio = median over rounds of (seed time / Learner time) in the '
        'same round.', '', table, '',
        'Per-batch cost on a tiny model (Linear 16→10, batch 64, 100 batches, best of 15 interleaved runs):', '',
        tiny_table, '',
        f'Goal: the Learner (`fit`) at least {GOAL}× the seed loop\'s throughput: '
        f'{"met" if ratio >= GOAL else "NOT met"} ({ratio:.3f}).'])
    write_results('learner_overhead', 'Learner overhead', body)
    print(f'learner_overhead: {ratio:.3f} (goal >= {GOAL}: {"met" if ratio >= GOAL else "NOT met"})')


if __name__ == '__main__':
    sys.exit(main())
