"""INT8 vs fp32 for the Fashion-MNIST CNN of the CNN chapter: file size, latency and test accuracy, side by side.

Four models in one process: PyTorch fp32, PyTorch static INT8 (FX, per-channel), ONNX Runtime fp32 and ONNX Runtime
static INT8 (QDQ, per-channel). Latency is timed at batch 1 and 64 with 2 threads, in interleaved rounds (the order
rotates each round, which spreads the shared machine's load drifts over all models) by the compression chapter's own
`measure` and interleaved timing, so the bench and the chapter's table are one code path; we report the median over
rounds of each round's median, and the INT8/fp32 ratios within each runtime. Uses the fully trained CNN when it is in the
cache, else the quick one (`BENCH_QUICK=1` forces the quick one).

Prints a Markdown table, writes it to bench/results/compression.md, and ends with `compression: RATIO`
(`check_goals`: the smallest INT8 file over its fp32 file, same format, among INT8 models within 0.5 point of fp32
accuracy and at most 0.3 × its size; `nan` when none is).
"""
import os, tempfile, time
from pathlib import Path

import torch

from bigmodel_nb.cnn import cnn_path, get_trained_cnn
from bigmodel_nb.compress import (_add_ratios, _time_rows, check_goals, compression_table, export_onnx, measure,
                                  ort_predictor, ort_quantize_static, quantize_static_int8, save_torch)
from bigmodel_nb.concepts import machine_info
from bigmodel_nb.data import image_dataloaders

from _results import write_results

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 5))    # interleaved rounds
CALLS = int(os.environ.get('BENCH_CALLS', 10))     # timed calls per model, batch size and round
QUICK = os.environ.get('BENCH_QUICK') == '1' or not cnn_path().is_file()

torch.set_num_threads(2)
t0 = time.perf_counter()
dls = image_dataloaders('fashion_mnist', batch_size=128, valid_pct=0.0, seed=0, limit=6000 if QUICK else None, verbose=False)
model = get_trained_cnn(quick=QUICK, verbose=False)
tmp = Path(tempfile.mkdtemp())
onnx = export_onnx(model, dls.test.x[:2], tmp/'fp32.onnx')
q, q_onnx = quantize_static_int8(model, dls.train, 10), ort_quantize_static(onnx, tmp/'int8.onnx', dls.train, 10)
models = [('fp32', 'torch', 'fp32', model, save_torch(model, tmp/'fp32.pt')),
          ('INT8 static (FX)', 'torch', 'int8', q, save_torch(q, tmp/'int8.pt')),
          ('fp32', 'onnxruntime', 'fp32', ort_predictor(onnx), onnx),
          ('INT8 static (QDQ)', 'onnxruntime', 'int8', ort_predictor(q_onnx), q_onnx)]
entries = [(measure(name, f, path, dls.test, kind, runtime, repeats=0), f) for name, runtime, kind, f, path in models]
_time_rows(entries, dls.test.x[:64], CALLS, ROUNDS)
rows = _add_ratios([row for row, _ in entries])

best = check_goals(rows)['int8']  # the smallest INT8 file within 0.5 point of its fp32 model
lines = [f"Machine: {machine_info()}; load average {os.getloadavg()[0]:.1f}; model: {'quick' if QUICK else 'full'} FashionCNN; "
         f"{len(dls.test.x):,} test images; {ROUNDS} rounds × {CALLS} calls; {time.perf_counter() - t0:.0f} s", '',
         compression_table(rows)]
write_results('compression', 'INT8 vs fp32', '\n'.join(lines))
print(f"compression: {best['ratio']:.3f}" if best else "compression: nan")
