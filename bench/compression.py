"""INT8 vs fp32 for the Fashion-MNIST CNN of the CNN chapter: file size, latency and test accuracy, side by side.

Four models in one process: PyTorch fp32, PyTorch static INT8 (FX, per-channel), ONNX Runtime fp32 and ONNX Runtime
static INT8 (QDQ, per-channel). Latency is timed at batch 1 and 64 with 2 threads, in interleaved rounds (the order
rotates each round, which spreads the shared machine's load drifts over all models); we report the median over rounds
of each round's median, and the INT8/fp32 ratio within each runtime. Uses the fully trained CNN when it is in the
cache, else the quick one (`BENCH_QUICK=1` forces the quick one).

Prints a Markdown table, writes it to bench/results/compression.md, and ends with `compression: RATIO`
(the smallest INT8 file over its fp32 file, same format, among INT8 models within 0.5 point of fp32 accuracy).
"""
import os, statistics, tempfile, time
from pathlib import Path

import torch

from _results import write_results

from bigmodel_nb.cnn import cnn_path, get_trained_cnn
from bigmodel_nb.compress import (accuracy_of, file_size, ort_predictor, ort_quantize_static, quantize_static_int8,
                                  save_torch, timings, export_onnx)
from bigmodel_nb.concepts import human_bytes, machine_info
from bigmodel_nb.data import image_dataloaders

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 5))    # interleaved rounds
CALLS = int(os.environ.get('BENCH_CALLS', 10))     # timed calls per model, batch size and round
QUICK = os.environ.get('BENCH_QUICK') == '1' or not cnn_path().is_file()

torch.set_num_threads(2)
t0 = time.perf_counter()
dls = image_dataloaders('fashion_mnist', batch_size=128, valid_pct=0.0, seed=0, limit=6000 if QUICK else None, verbose=False)
model = get_trained_cnn(quick=QUICK, verbose=False)
tmp = Path(tempfile.mkdtemp())
onnx = export_onnx(model, dls.test.x[:2], tmp/'fp32.onnx')
models = {('torch', 'fp32'): (model, save_torch(model, tmp/'fp32.pt')),
          ('torch', 'INT8 static (FX)'): (q := quantize_static_int8(model, dls.train, 10), save_torch(q, tmp/'int8.pt')),
          ('onnxruntime', 'fp32'): (ort_predictor(onnx), onnx),
          ('onnxruntime', 'INT8 static (QDQ)'): (ort_predictor(p := ort_quantize_static(onnx, tmp/'int8.onnx', dls.train, 10)), p)}

x = {1: dls.test.x[:1], 64: dls.test.x[:64]}
per_round = {(k, b): [] for k in models for b in x}
keys = list(models)
for r in range(ROUNDS):
    order = keys[r % len(keys):] + keys[:r % len(keys)]
    for k in (order if r % 2 == 0 else order[::-1]):
        for b in x: per_round[k, b].append(statistics.median(timings(models[k][0], x[b], warmup=2, repeats=CALLS)))
ms = {kb: statistics.median(v) for kb, v in per_round.items()}
acc = {k: accuracy_of(m, dls.test) for k, (m, _) in models.items()}
size = {k: file_size(p) for k, (_, p) in models.items()}

lines = [f"Machine: {machine_info()}; load average {os.getloadavg()[0]:.1f}; model: {'quick' if QUICK else 'full'} FashionCNN; "
         f"{len(dls.test.x):,} test images; {ROUNDS} rounds × {CALLS} calls; {time.perf_counter() - t0:.0f} s", '',
         '| runtime | model | size | size / fp32 | ms, batch 1 | ratio | ms, batch 64 | ratio | accuracy % | Δ points |',
         '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
ratios = []
for k in keys:
    base = (k[0], 'fp32')
    sr, d = size[k] / size[base], 100 * (acc[k] - acc[base])
    if k[1] != 'fp32' and d >= -0.5: ratios.append(sr)
    lines.append(f"| {k[0]} | {k[1]} | {human_bytes(size[k])} | {sr:.3f} | {ms[k, 1]:.2f} | {ms[k, 1] / ms[base, 1]:.2f} | "
                 f"{ms[k, 64]:.1f} | {ms[k, 64] / ms[base, 64]:.2f} | {100 * acc[k]:.2f} | {d:+.2f} |")
write_results('compression', 'INT8 vs fp32', '\n'.join(lines))
print(f"compression: {min(ratios):.3f}" if ratios else "compression: nan")
