"""GPU check of the Learner (about a minute on one GPU): mixed precision on and off, accuracy, exact resume on CUDA.

1. Train the chapter's digits CNN with the Learner on CUDA (`fit_one_cycle`, 8 epochs), float32 and then
   `MixedPrecision()` (float16 + GradScaler); each must reach >= 97% test accuracy. Prints the time of each fit.
2. A one-cycle run stopped after epoch 2 (`StopAfter`, checkpoint saved on CUDA) and resumed in a fresh learner must
   end with the same weights as a run never stopped (torch.equal), with mixed precision on, so the GradScaler's
   state, the CUDA RNG, the optimizer state and the schedule's position all round-trip.
3. The Learner as rank 0 of a 1-rank NCCL process group (`distributed.init_distributed('nccl')`, `to_distributed()`:
   DistributedDataParallel, SyncBatchNorm, sharded loader) with mixed precision: it must reach >= 97% test accuracy,
   and end with the same weights as the same fit without the process group (within 1e-5: one rank, so the all-reduce
   is the identity and only DDP's bucketed gradient copy differs). Prints the time of each.
Writes what it printed to bench/results/gpu_check_learner.md. Exits 1 if a check fails. Without CUDA it says so and
exits 0 (so `make bench` passes on CPU machines) and writes nothing; `--cpu` runs the same flow on the CPU (mixed
precision in bfloat16, gloo instead of NCCL) to check the script itself, and writes nothing either.
"""
import os
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS, set before CUDA starts
import contextlib, io, sys, tempfile, time
from pathlib import Path

import torch

from _results import write_results

from bigmodel_nb.concepts import machine_info
from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.concepts import free_port
from bigmodel_nb.distributed import init_distributed
from bigmodel_nb.learner import Checkpoint, Learner, MixedPrecision, StopAfter, accuracy, digits_cnn


def main():
    dry = '--cpu' in sys.argv
    if not torch.cuda.is_available() and not dry:
        print('gpu_check_learner: skipped (no CUDA device)')
        return 0
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    dev = torch.device('cpu' if dry else 'cuda')
    sync = (lambda: None) if dry else torch.cuda.synchronize
    amp_cb = (lambda: MixedPrecision(torch.bfloat16)) if dry else MixedPrecision
    name = 'CPU dry run' if dry else f'{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}'
    print(f'device: {name}, torch {torch.__version__}')
    dls = image_dataloaders('digits', batch_size=64, seed=0)
    ok = True

    # 1. accuracy and time, mixed precision off and on
    for amp in (False, True):
        torch.manual_seed(0)
        learn = Learner(digits_cnn(), dls, metrics=accuracy, lr=1e-2, progress=False, device=dev,
                        cbs=[amp_cb()] if amp else None)
        learn.fit_one_cycle(1)  # warm-up (CUDA context, kernels)
        torch.manual_seed(0)
        learn = Learner(digits_cnn(), dls, metrics=accuracy, lr=1e-2, progress=False, device=dev,
                        cbs=[amp_cb()] if amp else None)
        sync(); t0 = time.perf_counter()
        learn.fit_one_cycle(8)
        sync(); dt = time.perf_counter() - t0
        acc = learn.validate(dls.test)['accuracy']
        scaler = learn.mixed_precision.scaler if amp else None
        print(f"mixed precision {('on (' + str(learn.mixed_precision.dtype or 'float16 + GradScaler') + ')') if amp else 'off (float32)'}: test accuracy {acc:.4f}, "
              f"8 epochs in {dt:.2f} s" + (f', final loss scale {scaler.get_scale():.0f}' if scaler else ''))
        if acc < 0.97: print('FAIL: test accuracy below 0.97'); ok = False

    # 2. exact resume on CUDA, mixed precision on
    tmp = Path(tempfile.mkdtemp())
    def make(seed=0):
        torch.manual_seed(seed)
        data = (TensorLoader(dls.train.x, dls.train.y, 64, shuffle=True, seed=0), dls.valid)
        return Learner(digits_cnn(), data, metrics=accuracy, lr=1e-2, progress=False, device=dev, cbs=amp_cb())
    t0 = time.perf_counter()
    full = make().fit_one_cycle(4)
    make().fit_one_cycle(4, cbs=[Checkpoint(tmp / 'ckpt.safetensors'), StopAfter(2)])
    resumed = make(seed=123).fit_one_cycle(4, resume=tmp / 'ckpt.safetensors')
    diffs = {k: (a.float() - b.float()).abs().max().item()
             for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()) if not torch.equal(a, b)}
    same = not diffs
    print(f'resume on CUDA (stopped after epoch 2, resumed) == never stopped: {same} ({time.perf_counter() - t0:.1f} s)')
    if not same:
        print('FAIL: weights differ:', dict(list(diffs.items())[:5])); ok = False
    # a CUDA checkpoint loads on the CPU, too
    cpu = Learner(digits_cnn(), dls, metrics=accuracy, progress=False, device='cpu').load(tmp / 'ckpt.safetensors', with_opt=False)
    print(f"the CUDA checkpoint loads on the CPU: valid accuracy {cpu.validate()['accuracy']:.4f}")

    # 3. a 1-rank NCCL process group, mixed precision on
    import torch.distributed as dist
    backend = 'gloo' if dry else 'nccl'
    init_distributed(backend, timeout=120, rank=0, world_size=1, master_port=free_port())
    ws = {}
    for distributed in (False, True):
        torch.manual_seed(0)
        data = (TensorLoader(dls.train.x, dls.train.y, 64, shuffle=True, seed=0), dls.valid)  # each fit from epoch 0's order
        learn = Learner(digits_cnn(), data, metrics=accuracy, lr=1e-2, progress=False, device=dev, cbs=[amp_cb()])
        if distributed: learn.to_distributed()
        sync(); t0 = time.perf_counter()
        learn.fit_one_cycle(8)
        sync(); dt = time.perf_counter() - t0
        ws[distributed] = {k: v.detach().float().cpu() for k, v in learn.model.state_dict().items()}
        acc = learn.validate(dls.test)['accuracy']
        print(f"{'1-rank ' + backend + ' DDP' if distributed else 'no process group'}, mixed precision: test accuracy "
              f"{acc:.4f}, 8 epochs in {dt:.2f} s")
        if acc < 0.97: print('FAIL: test accuracy below 0.97'); ok = False
    d = max((ws[True][k] - ws[False][k]).abs().max().item() for k in ws[True])
    print(f'1-rank {backend} DDP vs no process group: largest weight difference {d:.2e}')
    if d > 1e-5: print('FAIL: weights differ by more than 1e-5'); ok = False
    dist.destroy_process_group()

    print(f"gpu_check_learner: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def run():
    "Run `main`, echo what it prints, and write it to bench/results/gpu_check_learner.md (not when skipped)."
    buf = io.StringIO()
    class Tee(io.TextIOBase):
        def write(self, s): sys.__stdout__.write(s); buf.write(s); return len(s)
    with contextlib.redirect_stdout(Tee()): rc = main()
    out = buf.getvalue()
    if 'skipped' not in out and '--cpu' not in sys.argv:  # a CPU dry run checks the script, it measures no GPU
        write_results('gpu_check_learner', 'GPU check of the Learner',
                      f'Machine: {machine_info()}\n\n```\n{out.strip()}\n```', show=False)
    return rc


if __name__ == '__main__':
    sys.exit(run())
