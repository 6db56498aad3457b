"""Tests of `bigmodel_nb.distributed` on CPU (gloo): sharding, 2 processes == 1 process, SyncBatchNorm, a killed rank,
resume and world-size checks, bad input. Processes are forked by `notebook_launcher` (one torch thread each) or, once,
started by torchrun (`launch`)."""
import os, socket, sys, textwrap, time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bigmodel_nb.data import TensorLoader, TextWindowLoader, image_dataloaders
from bigmodel_nb.distributed import (DistributedRunError, ShardedLoader, SyncBatchNorm, free_port, init_distributed,
                                     is_main, launch, notebook_launcher, rank, shard_sizes, sync_batchnorm,
                                     train_command, train_main, world_size)
from bigmodel_nb.learner import ValidateEvery, Callback, Checkpoint, Learner, StopAfter, TimeBudget, accuracy, digits_cnn

torch.set_num_threads(1)


# --- sharding (no processes needed) ---------------------------------------------------------------------------

@pytest.mark.parametrize('n,B,W,shuffle', [(100, 8, 2, True), (97, 12, 3, True), (64, 16, 4, False), (10, 4, 4, True)])
def test_shards_are_disjoint_whole_and_match_one_process(n, B, W, shuffle):
    x, y = torch.arange(n, dtype=torch.float)[:, None], torch.arange(n)
    for epoch in range(2):
        one = TensorLoader(x, y, B, shuffle=shuffle, seed=5); one.epoch = epoch
        one = [yb for _, yb in one]
        loaders = [ShardedLoader(TensorLoader(x, y, B, shuffle=shuffle, seed=5), r, W) for r in range(W)]
        for sl in loaders: sl.epoch = epoch
        shards = [[yb for _, yb in sl] for sl in loaders]
        got = torch.cat([b for s in shards for b in s]).tolist()
        dropped = n % B if 0 < n % B < W else 0  # a tail too short to give every rank an item
        assert len(got) == len(set(got)) == n - dropped  # disjoint, and the whole set but such a tail
        for i, parts in enumerate(zip(*shards)): assert torch.equal(torch.cat(parts), one[i])  # as one process, in rank order
        assert all(len(s) == len(sl) for s, sl in zip(shards, loaders))  # every rank runs len() steps
        assert loaders[0].epoch == epoch + 1


def test_shards_batch_by_batch_equal_one_process_with_augmentation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 4, 4, generator=g), torch.arange(40)
    def flip():  # a seeded augmentation: flips a random half of the batch
        gen = torch.Generator().manual_seed(1)
        def t(xb):
            m = torch.rand(len(xb), generator=gen) < 0.5
            return torch.where(m[:, None, None, None], xb.flip(-1), xb)
        return t
    one = list(TensorLoader(x, y, 8, shuffle=True, seed=2, transform=flip()))
    shards = [list(ShardedLoader(TensorLoader(x, y, 8, shuffle=True, seed=2, transform=flip()), r, 2)) for r in range(2)]
    for (xb, yb), (x0, y0), (x1, y1) in zip(one, *shards):
        assert torch.equal(torch.cat([x0, x1]), xb) and torch.equal(torch.cat([y0, y1]), yb)


@pytest.mark.parametrize('n_tokens,stateful,W', [(1003, False, 2), (1003, True, 2), (2000, False, 4), (1000, True, 4)])
def test_text_windows_shard_like_one_process(n_tokens, stateful, W):
    make = lambda: TextWindowLoader(torch.arange(n_tokens), seq_len=10, batch_size=8, seed=1, stateful=stateful)
    for epoch in range(2):
        one = make(); one.epoch = epoch; one = list(one)
        loaders = [ShardedLoader(make(), r, W) for r in range(W)]
        for sl in loaders: sl.epoch = epoch
        shards = [list(sl) for sl in loaders]
        assert all(len(s) == len(sl) for s, sl in zip(shards, loaders))
        for i, parts in enumerate(zip(*shards)):
            assert torch.equal(torch.cat([x for x, _ in parts]), one[i][0]) and torch.equal(torch.cat([y for _, y in parts]), one[i][1])
        if stateful:  # each rank's rows continue from batch to batch: its carried state stays its own
            assert all(torch.equal(s[1][0][:, 0], s[0][0][:, -1] + 1) for s in shards)


def test_shard_sizes():
    assert shard_sizes(64, 4) == [16] * 4
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    assert shard_sizes(1, 2) == [1, 0]


# --- bad input --------------------------------------------------------------------------------------------------

def test_batch_that_does_not_split():
    with pytest.raises(ValueError, match=r'a global batch of 10 does not split evenly across 4 processes.*e\.g\. 8 or 12'):
        ShardedLoader(TensorLoader(torch.zeros(20, 1), torch.zeros(20), 10), 0, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a machine with GPUs runs NCCL')
def test_nccl_without_gpus():
    with pytest.raises(ValueError, match="'nccl' needs NVIDIA GPUs"):
        init_distributed('nccl', rank=0, world_size=1)
    with pytest.raises(ValueError, match="'nccl' needs NVIDIA GPUs"):
        notebook_launcher(lambda: None, backend='nccl')


def test_unreachable_master_times_out_naming_the_address():
    port = free_port()
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=f'rank 1 of 2 could not reach the master at 127.0.0.1:{port} within 1.5 s'):
        init_distributed('gloo', timeout=1.5, rank=1, world_size=2, master_addr='127.0.0.1', master_port=port)
    assert 1.4 < time.perf_counter() - t0 < 10 and not dist.is_initialized()


def test_outside_a_process_group():
    assert (rank(), world_size(), is_main()) == (0, 1, True)
    learn = Learner(nn.Linear(2, 2), (TensorLoader(torch.zeros(4, 2), torch.zeros(4).long(), 2), None), progress=False)
    with pytest.raises(RuntimeError, match='needs a process group'): learn.to_distributed()


def test_rank_outside_world():
    with pytest.raises(ValueError, match='rank 2 is outside a world of 2'): init_distributed('gloo', rank=2, world_size=2)


# --- two processes ----------------------------------------------------------------------------------------------

def _digits():
    return image_dataloaders('digits', batch_size=64, seed=0, verbose=False)


def _learner(dls, distributed, cbs=None, **kw):
    torch.manual_seed(0)
    model = digits_cnn(width=8); model[-2].p = 0.  # no dropout: each rank would draw its own masks
    learn = Learner(model, dls, metrics=accuracy, lr=0.05, opt_func=partial(torch.optim.SGD, momentum=0.9),
                    progress=False, cbs=cbs, device='cpu')
    return learn.to_distributed(**kw) if distributed else learn


def _weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}


def _max_diff(a, b): return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _fit(epochs, distributed=True, resume=None, ckpt=None, cbs=(), **kw):
    learn = _learner(_digits(), distributed, **kw)
    fit_cbs = list(cbs) + ([Checkpoint(ckpt)] if ckpt else [])
    learn.fit(epochs, cbs=fit_cbs, resume=resume)
    return _weights(learn), learn.recorder.log


@pytest.fixture(scope='module')
def one_process():
    "The reference: one process, global batch 64, 2 epochs of 21 steps."
    return _fit(2, distributed=False)


def test_two_processes_equal_one(one_process):
    "42 steps (the 1,284 images end in a batch of 4: 2 per rank); rounding differences grow fast here (see 02a): 2 epochs."
    w1, log1 = one_process
    w2, log2 = notebook_launcher(_fit, (2,), nproc=2, timeout=30)
    assert w1.keys() == w2.keys()
    d = _max_diff(w1, w2)
    assert d < 1e-5, d
    for a, b in zip(log1, log2):  # validation gathered from both ranks: the same metrics as one process
        assert abs(a['valid_loss'] - b['valid_loss']) < 1e-5 and abs(a['accuracy'] - b['accuracy']) < 1e-9
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5


def _linear_fit(distributed):
    "99 items in batches of 8: the last batch of 3 splits 2 + 1, so the ranks' losses must be weighted 4/3 and 2/3."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(99, 3, generator=g); y = x @ torch.tensor([[1.], [-2.], [0.5]]) + 0.1 * torch.randn(99, 1, generator=g)
    torch.manual_seed(0)
    learn = Learner(nn.Linear(3, 1), (TensorLoader(x, y, 8, shuffle=True, seed=1), None), torch.nn.functional.mse_loss,
                    partial(torch.optim.SGD, momentum=0.9), lr=0.05, progress=False, device='cpu')
    if distributed: learn.to_distributed()
    learn.fit(3)
    return _weights(learn), learn.recorder.losses


def test_uneven_last_batch_is_weighted_like_one_process():
    (w1, l1), (w2, l2) = _linear_fit(False), notebook_launcher(_linear_fit, (True,), nproc=2, timeout=30)
    assert _max_diff(w1, w2) < 1e-6  # without the weights: 4.8e-2 (checked by hand)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5  # each step's recorded loss is the whole batch's (float32)


def test_without_sync_batchnorm_the_runs_differ(one_process):
    w1, _ = one_process
    w2, _ = notebook_launcher(partial(_fit, 2, sync_bn=False), nproc=2, timeout=30)
    assert _max_diff(w1, w2) > 1e-3  # per-rank statistics: another function, measurably


def _syncbn_check():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    bn = nn.BatchNorm2d(3).double(); bn.weight.data.uniform_(0.5, 1.5); bn.bias.data.uniform_(-1, 1)
    ref = nn.BatchNorm2d(3).double(); ref.load_state_dict(bn.state_dict())
    sync_batchnorm(bn)
    r = rank(); mine = x[4 * r:4 * r + 4].clone().requires_grad_()
    g = torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = bn(mine); (out * g[4 * r:4 * r + 4]).sum().backward()
    xr = x.clone().requires_grad_(); out_ref = ref(xr); (out_ref * g).sum().backward()
    grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    for t in grads: dist.all_reduce(t)  # as DDP does (it averages; the sum is the full batch's gradient)
    return {'out': (out - out_ref[4 * r:4 * r + 4]).abs().max().item(),
            'x_grad': (mine.grad - xr.grad[4 * r:4 * r + 4]).abs().max().item(),
            'w_grad': max((a - b).abs().max().item() for a, b in zip(grads, [ref.weight.grad, ref.bias.grad])),
            'running': max((bn.running_mean - ref.running_mean).abs().max().item(),
                           (bn.running_var - ref.running_var).abs().max().item()),
            'is_sync': isinstance(bn, SyncBatchNorm)}


def test_sync_batchnorm_equals_batchnorm_on_the_whole_batch():
    res = notebook_launcher(_syncbn_check, nproc=2, timeout=30)
    assert res['is_sync']
    for k in ('out', 'x_grad', 'w_grad', 'running'): assert res[k] < 1e-10, (k, res[k])


class _Die(Callback):
    "Rank 1 dies (as a killed process does: no exception, no cleanup) at the first batch of epoch `epoch`."
    def __init__(self, epoch): self.epoch = epoch
    def before_batch(self):
        if rank() == 1 and self.learn.training and self.learn.epoch == self.epoch and self.learn.iter == 3: os._exit(1)


def test_killed_rank_fails_cleanly_on_all_and_resumes(tmp_path, one_process):
    ckpt = tmp_path / 'ckpt.safetensors'
    t0 = time.perf_counter()
    with pytest.raises(DistributedRunError) as e:
        notebook_launcher(partial(_fit, 2, ckpt=ckpt, cbs=[_Die(1)]), nproc=2, timeout=10)
    took = time.perf_counter() - t0
    out = e.value.outcomes
    assert set(out) == {0, 1} and 'exited with code 1' in out[1]
    assert 'Error' in out[0], out[0]  # rank 0 raised (its all-reduce lost its partner) instead of hanging
    assert took < 10 + 30, took
    assert ckpt.exists()  # epoch 0 was saved by rank 0
    w, log = notebook_launcher(partial(_fit, 2, resume=ckpt, ckpt=ckpt), nproc=2, timeout=30)
    assert [r['epoch'] for r in log] == [0, 1]  # the resumed run's log continues the checkpoint's
    assert _max_diff(one_process[0], w) < 1e-5  # ... and ends where the uninterrupted run ends


def test_checkpoint_from_another_world_size(tmp_path, one_process):
    ckpt = tmp_path / 'one.safetensors'
    _fit(2, distributed=False, ckpt=ckpt, cbs=[StopAfter(1)])  # one process, stopped after epoch 1
    with pytest.raises(DistributedRunError) as e:
        notebook_launcher(partial(_fit, 2, resume=ckpt), nproc=2, timeout=30)
    for r in (0, 1): assert 'the checkpoint comes from a run of 1 process(es) and this run has 2' in e.value.outcomes[r]
    w, _ = notebook_launcher(partial(_fit, 2, resume=ckpt, reshard=True), nproc=2, timeout=30)
    assert _max_diff(one_process[0], w) < 1e-5  # the global batch is the same, so the reshard continues exactly


def _budget_fit():
    learn = _learner(_digits(), True)
    slow = Callback(); slow.after_batch = lambda: time.sleep(0.02 if rank() == 1 else 0)  # rank clocks drift apart
    learn.fit(50, cbs=[TimeBudget(1.0), slow])
    every = [None] * world_size(); dist.all_gather_object(every, learn.train_iter)
    return every


def test_time_budget_stops_every_rank_at_the_same_step():
    steps = notebook_launcher(_budget_fit, nproc=2, timeout=20)  # a rank stopping alone would leave the other waiting
    assert steps[0] == steps[1] and 0 < steps[0] < 5 * 21, steps  # 1 s of budget: a few epochs at most, not 50


def _validate_every_fit():
    learn = _learner(_digits(), True)
    slow = Callback(); slow.after_batch = lambda: time.sleep(0.02 if rank() == 1 else 0)  # rank clocks drift apart
    ve = ValidateEvery(seconds=0.15)
    learn.fit(2, cbs=[ve, slow])
    every = [None] * world_size(); dist.all_gather_object(every, [(r['step'], r['loss'], r['accuracy']) for r in ve.rows])
    return every


def test_validate_every_seconds_validates_at_the_same_steps_on_every_rank():
    rows = notebook_launcher(_validate_every_fit, nproc=2, timeout=60)  # per-rank clocks would validate at different steps
    assert rows[0] == rows[1] and len(rows[0]) > 2, rows


# --- torchrun ---------------------------------------------------------------------------------------------------

def test_train_command_forms():
    assert train_command(['train', '--epochs', 2], 2) == ['torchrun', '--nproc-per-node=2', '--standalone', '-m',
                                                         'bigmodel_nb.cli', 'train', '--epochs', '2']
    multi = train_command(['train'], 8, nnodes=2, rdzv_endpoint='n0:29400')
    assert '--nnodes=2' in multi and '--rdzv-endpoint=n0:29400' in multi and '--standalone' not in multi


def test_torchrun_launch_trains_and_writes(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text(textwrap.dedent(f'''
        import sys
        from bigmodel_nb.distributed import train_main
        sys.exit(train_main(sys.argv[1:], module=None, prefix=({str(script)!r},)))'''))
    out = tmp_path / 'run'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    import subprocess
    r = subprocess.run([sys.executable, str(script), '--nproc', '2', '--epochs', '1', '--limit', '512', '--out', str(out)],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 process(es): valid accuracy' in r.stdout
    assert (out / 'model.safetensors').exists() and (out / 'log.json').exists()
