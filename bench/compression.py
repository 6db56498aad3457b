"""INT8 vs fp32 for the Fashion-MNIST CNN of the CNN chapter: file size, latency and test accuracy, side by side.

Four models in one process: PyTorch fp32, PyTorch static INT8 (FX, per-channel), ONNX Runtime fp32 and ONNX Runtime
static INT8 (QDQ, per-channel). Latency is timed at batch 1 and 64 with 2 threads, in interleaved rounds (the order
rotates each round, which spreads the shared machine's load drifts over all models) by the compression chapter's own
`measure` and `time_rows` (the concepts chapter's `interleaved_rounds`), so the bench and the chapter's table are one
code path; we report the median of every timed call, and the INT8/fp32 ratios within each runtime. Uses the fully trained CNN when it is in the
cache, else the quick one (`BENCH_QUICK=1` forces the quick one).

Prints a Markdown table, writes it to bench/results/compression.md, and ends with `compression: RATIO`: the file size
over its fp32 file (same runtime, same format) of the INT8 model `check_goals` would ship, one at most 0.3 × the size,
within 0.5 point of fp32 accuracy and no slower than fp32 in its own runtime at batch 1 and 64 (the fastest at batch 1
of those); `nan` when none is.
"""
import os, tempfile, time
from pathlib import Path

import torch

from bigmodel_nb.cnn import cnn_path, get_trained_cnn
from bigmodel_nb.compress import (add_ratios, check_goals, compression_table, export_onnx, measure, ort_predictor,
                                  ort_quantize_static, quantize_static_int8, save_torch, time_rows)
from bigmodel_nb.concepts import machine_info
from bigmodel_nb.data import image_dataloaders

from _results import write_results

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 5))    # interleaved rounds
CALLS = int(os.environ.get('BENCH_CALLS', 10))     # timed calls per model, batch size and round
QUICK = os.environ.get('BENCH_QUICK') == '1' or not cnn_path().is_file()

THREADS = 2                                        # torch and ONNX Runtime threads, as on a 2-core laptop
torch.set_num_threads(THREADS)
t0 = time.perf_counter()
dls = image_dataloaders('fashion_mnist', batch_size=128, valid_pct=0.0, seed=0, limit=6000 if QUICK else None, verbose=False)
model = get_trained_cnn(quick=QUICK, verbose=False)
tmp = Path(tempfile.mkdtemp())
onnx = export_onnx(model, dls.test.x[:2], tmp/'fp32.onnx')
q, q_onnx = quantize_static_int8(model, dls.train, 10), ort_quantize_static(onnx, tmp/'int8.onnx', dls.train, 10)
variants = [dict(name='fp32', predict=model, path=save_torch(model, tmp/'fp32.pt')),
            dict(name='INT8 static (FX)', kind='int8', predict=q, path=save_torch(q, tmp/'int8.pt')),
            dict(name='fp32', runtime='onnxruntime', predict=ort_predictor(onnx, THREADS), path=onnx),
            dict(name='INT8 static (QDQ)', runtime='onnxruntime', kind='int8', predict=ort_predictor(q_onnx, THREADS), path=q_onnx)]
rows = [measure(**v, test_dl=dls.test) for v in variants]
time_rows(rows, [v['predict'] for v in variants], dls.test.x[:64], CALLS, ROUNDS, THREADS)
rows = add_ratios(rows)

best = check_goals(rows)['int8']  # the INT8 model to ship: small, within 0.5 point, no slower than fp32 in its runtime
lines = [f"Machine: {machine_info()}; load average {os.getloadavg()[0]:.1f}; model: {'quick' if QUICK else 'full'} FashionCNN; "
         f"{len(dls.test.x):,} test images; {ROUNDS} rounds × {CALLS} calls; {time.perf_counter() - t0:.0f} s", '',
         compression_table(rows)]
write_results('compression', 'INT8 vs fp32', '\n'.join(lines))
print(f"compression: {best['ratio']:.3f}" if best else "compression: nan")
