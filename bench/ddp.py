"""Data-parallel training on 2 CPU processes (gloo): the Learner against a hand-written DDP loop, the step-time model
against the measured step, and 2-process weights against 1-process weights.

Two processes are forked by `distributed.notebook_launcher` (one torch thread each, one core each on a 2-core
machine). On both ranks, in lockstep, `concepts.interleaved_rounds` times (a barrier, untimed, before each run):
- `compute`: one rank's share (B/2) of each of 16 global batches, forward + backward + SGD step, no communication;
- `compute in lockstep`: the same, with a barrier after each step, so each step lasts as long as the slower rank's;
- `all-reduce`: 16 all-reduces of a buffer the size of the gradients, back to back;
- `compute in lockstep, then the all-reduce`: each step followed by an all-reduce of the gradients' size, each
  all-reduce timed alone: the communication as a synchronous step issues it (after the computation, caches cold);
- `hand-written DDP`: the textbook loop (`DistributedDataParallel`, `zero_grad`, forward, loss, backward, step) over
  the same sharded batches;
- `Learner`: `Learner.fit(1)` after `to_distributed()`, the same 16 batches, no validation;
  these two runs end with a barrier inside the timed part, so each is timed until both ranks are done (the Learner
  gathers the epoch's losses at its end, which waits for the slower rank; the bare loop would otherwise stop rank 0's
  clock before rank 1 has finished);
- `one process, whole batch`: B items per step, no communication (both ranks do it at once, as 2 single runs would).
The step-time model is evaluated twice: with textbook inputs (one rank's compute alone, the bandwidth of back-to-back
all-reduces), and with the inputs a synchronous step sees (compute paced by the slower rank, the bandwidth of an
all-reduce issued right after a compute step: the bulk-synchronous parallel model of Valiant, 1990); the goal is read
on the second.
The model: an MLP 784-512-512-10 (669,706 parameters, 2.7 MB of float32 gradients) on Fashion-MNIST, global batch
128. The step-time model predicts the 2-process step as compute + 2(N-1)/N x gradient bytes / bandwidth, with the
bandwidth measured by the all-reduce of the gradients' size (bus bandwidth), and, for comparison, of 16 MiB.
The weights check trains chapter 02's digits CNN (BatchNorm synchronized, no dropout) with SGD on one
process and on two, global batch 64, 2 epochs (42 steps), and compares every weight.

Prints a Markdown table, writes bench/results/ddp.md, and ends with the line
`ddp learner/hand-written per-step: RATIO (goal <= 1.05: met|NOT met)`.
"""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')
import statistics, sys, time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _results import write_results

from bigmodel_nb.concepts import interleaved_rounds, machine_info, markdown_table, time_stats
from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.distributed import (ShardedLoader, allreduce_seconds, bus_bandwidth, notebook_launcher,
                                     ring_allreduce_bytes, step_time)
from bigmodel_nb.learner import Learner, accuracy, digits_cnn

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 12))
STEPS, GB, LR = 16, 128, 0.01
GOAL_OVERHEAD, GOAL_MODEL, GOAL_WEIGHTS = 1.05, 0.20, 1e-5
LEARNER, HAND = 'Learner', 'hand-written DDP'


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def sgd(params, lr=LR): return torch.optim.SGD(params, lr=lr, momentum=0.9)


def loop(net, opt, batches):
    for xb, yb in batches:
        opt.zero_grad(); F.cross_entropy(net(xb), yb).backward(); opt.step()


def timings(x, y):
    "On every rank: seconds per run (16 steps) of each contender, rank 0's clock; the gradient bytes."
    r, w = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0); init = mlp().state_dict()
    def fresh(): net = mlp(); net.load_state_dict(init); return net
    def loader(): return TensorLoader(x, y, GB, shuffle=True, seed=0)
    grad_bytes = sum(p.numel() * p.element_size() for p in fresh().parameters())
    solo, whole = fresh(), fresh(); solo_opt, whole_opt = sgd(solo.parameters()), sgd(whole.parameters())
    ddp_net = nn.parallel.DistributedDataParallel(fresh()); ddp_opt = sgd(ddp_net.parameters())
    learn = Learner(fresh(), (loader(), None), F.cross_entropy, sgd, lr=LR, progress=False, device='cpu').to_distributed()
    buf = torch.ones(grad_bytes // 4)
    lock = fresh(); lock_opt = sgd(lock.parameters())
    after_compute = []  # seconds of each all-reduce issued right after a compute step, as training issues it
    def lockstep(with_allreduce):
        for xb, yb in ShardedLoader(loader(), r, w):
            lock_opt.zero_grad(); F.cross_entropy(lock(xb), yb).backward(); lock_opt.step()
            dist.barrier()  # the slowest rank's compute sets the pace, as in a synchronous step
            if with_allreduce: t0 = time.perf_counter(); dist.all_reduce(buf); after_compute.append(time.perf_counter() - t0)
    runners = {
        'compute (B/2 per step)': lambda _: loop(solo, solo_opt, ShardedLoader(loader(), r, w)),
        'compute in lockstep (a barrier after each step)': lambda _: lockstep(False),
        'all-reduce (gradient bytes)': lambda _: [dist.all_reduce(buf) for _ in range(STEPS)],
        'compute in lockstep, then the all-reduce': lambda _: lockstep(True),
        HAND: lambda _: (loop(ddp_net, ddp_opt, ShardedLoader(loader(), r, w)), dist.barrier()),
        LEARNER: lambda _: (learn.fit(1), dist.barrier()),  # each timed until both ranks are done
        'one process, whole batch (B per step)': lambda _: loop(whole, whole_opt, loader()),
    }
    setups = {n: dist.barrier for n in runners}  # untimed: every run starts with both ranks at the line
    times = interleaved_rounds(runners, rounds=ROUNDS, repeats=1, warmup=1, setups=setups)
    big = allreduce_seconds(16 * 2**20, repeats=10)
    return {'times': times, 'grad_bytes': grad_bytes, 'big': big, 'after_compute': after_compute}


def digits_fit(distributed):
    dls = image_dataloaders('digits', batch_size=64, seed=0, verbose=False)
    torch.manual_seed(0)
    model = digits_cnn(width=8); model[-2].p = 0.  # no dropout: each rank would draw its own masks
    learn = Learner(model, dls, metrics=accuracy, lr=0.05, opt_func=partial(torch.optim.SGD, momentum=0.9),
                    progress=False, device='cpu')
    if distributed: learn.to_distributed()
    learn.fit(2)
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def main():
    info = machine_info().replace(f'{torch.get_num_threads()} torch thread', '1 torch thread per process, ' +
                                  f'{torch.get_num_threads()} torch thread')
    dls = image_dataloaders('fashion_mnist', batch_size=GB, seed=0, verbose=False)
    x, y = dls.train.x[:STEPS * GB], dls.train.y[:STEPS * GB]
    t0 = time.perf_counter()
    res = notebook_launcher(timings, (x, y), nproc=2, timeout=120)
    took = time.perf_counter() - t0
    torch.set_num_threads(1)
    w1 = digits_fit(False); w2 = notebook_launcher(digits_fit, (True,), nproc=2)
    wdiff = max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1)

    per_step = {n: [t / STEPS for t in v] for n, v in res['times'].items()}
    med = {n: time_stats(v)['median'] for n, v in per_step.items()}
    G = res['grad_bytes']
    ar = med['all-reduce (gradient bytes)']
    bw = bus_bandwidth(G, ar, 2); bw_big = bus_bandwidth(16 * 2**20, time_stats(res['big'])['median'], 2)
    compute = med['compute (B/2 per step)']
    predicted, predicted_big = step_time(compute, G, 2, bw), step_time(compute, G, 2, bw_big)
    measured = med[HAND]
    lockstep = med['compute in lockstep (a barrier after each step)']
    ar_after = statistics.median(res['after_compute']); bw_after = bus_bandwidth(G, ar_after, 2)
    predicted_bsp = step_time(lockstep, G, 2, bw_after)
    textbook_err, model_err = predicted / measured - 1, predicted_bsp / measured - 1
    overhead = statistics.median(l / h for l, h in zip(per_step[LEARNER], per_step[HAND]))  # paired, same round

    rows = [dict(contender=n, median=med[n] * 1e3, p10=time_stats(v)['p10'] * 1e3, p90=time_stats(v)['p90'] * 1e3)
            for n, v in per_step.items()]
    rows.append(dict(contender='step-time model: compute + 2(N-1)/N·G/β (β at the gradient size)', median=predicted * 1e3))
    rows.append(dict(contender='step-time model with β measured at 16 MiB', median=predicted_big * 1e3))
    rows.append(dict(contender='all-reduce right after a compute step (inside the run above)', median=ar_after * 1e3))
    rows.append(dict(contender='step-time model: compute in lockstep + 2(N-1)/N·G/β (β right after compute)', median=predicted_bsp * 1e3))
    table = markdown_table(rows, headers=dict(median='median ms per step', p10='p10 ms', p90='p90 ms'),
                           fmt=dict(median='.2f', p10='.2f', p90='.2f'))
    met = lambda ok: 'met' if ok else 'NOT met'
    body = '\n'.join([
        f'Machine: {info}', '',
        f'2 processes (gloo, forked, 1 torch thread each), MLP 784-512-512-10 ({G // 4:,} parameters, {G / 1e6:.2f} MB of '
        f'float32 gradients) on Fashion-MNIST, global batch {GB} ({GB // 2} per rank), SGD momentum 0.9, {STEPS} steps per '
        f'run, {ROUNDS} interleaved rounds (rank 0\'s clock; a barrier, untimed, before each run). Whole run {took:.0f} s.', '',
        table, '',
        f'- gloo bus bandwidth (ring bytes / time): {bw / 1e9:.2f} GB/s at {G / 1e6:.2f} MB, {bw_big / 1e9:.2f} GB/s at 16 MiB.',
        f'- speed-up of 2 processes over one process with the whole batch: '
        f"{med['one process, whole batch (B per step)'] / measured:.2f}x.",
        f'- Goal, weights: digits CNN, 2 epochs (42 steps), 2 processes vs 1: largest difference {wdiff:.2e} '
        f'(<= {GOAL_WEIGHTS:g}: {met(wdiff <= GOAL_WEIGHTS)}).',
        f'- Step-time model, textbook inputs (each rank\'s compute alone, β from back-to-back all-reduces): predicted '
        f'{predicted * 1e3:.2f} ms vs measured {measured * 1e3:.2f} ms: {textbook_err:+.1%}; with β at 16 MiB: {predicted_big / measured - 1:+.1%}.',
        f'- Goal, step-time model with the inputs a synchronous step sees (compute paced by the slower rank: {lockstep * 1e3:.2f} ms; '
        f'β of an all-reduce issued right after a compute step: {bw_after / 1e9:.2f} GB/s, {ar_after * 1e3:.2f} ms): predicted '
        f'{predicted_bsp * 1e3:.2f} ms vs measured {measured * 1e3:.2f} ms: {model_err:+.1%} (within {GOAL_MODEL:.0%}: {met(abs(model_err) <= GOAL_MODEL)}).',
        f'- Goal, Learner per-step time / hand-written DDP loop (median of paired rounds): {overhead:.3f} '
        f'(<= {GOAL_OVERHEAD}: {met(overhead <= GOAL_OVERHEAD)}).'])
    write_results('ddp', 'Data parallel on 2 CPU processes (DDP, gloo)', body)
    print(f'ddp learner/hand-written per-step: {overhead:.3f} (goal <= {GOAL_OVERHEAD}: {met(overhead <= GOAL_OVERHEAD)})')


if __name__ == '__main__':
    sys.exit(main())
