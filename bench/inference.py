"""Inference latency of the chapter's strong CNN: the library's `Predictor` vs torch eager vs a bare ONNX Runtime session.

All in one process, interleaved within a group (`compare_latency` rotates and reverses the order every round), medians.
The contenders:

- torch eager: `model(x)` under `inference_mode`, on a normalized float batch;
- onnxruntime (bare): `InferenceSession.run([output], {input: x})` on the same normalized float batch (no preprocessing),
  its idle threads spinning as the Predictor's do (ONNX Runtime's default), and once more without spinning
  (`ort_session`'s default, for processes that share their cores with torch);
- Predictor: `bigmodel_nb.deploy.Predictor` on raw uint8 images, as a user sends them: input checks, the session
  run (its graph normalizes the pixels as the config says, and adds softmax and argmax), and the label names;
- onnxruntime INT8 (static QDQ, from the compression chapter, calibrated on 10 training batches), bare;
- Predictor INT8: the same `Predictor` on that INT8 model, as `load_package(..., int8=True)` serves it (the package
  ships both models); its test accuracy is measured here too, next to the fp32 model's;
- torch.compile, only with BENCH_COMPILE=1 (the output says how long compiling took; inductor caches compiled code on disk).

The ONNX Runtime sessions come from `ort_session` (same threads as torch). The weights are the chapter's
trained CNN when its file is in the cache, else random ones: latency depends on the architecture, not on the weights.
The Predictor's config is `image_config` with the statistics of all 60,000 training images (`channel_stats`), the
data the full CNN was trained on. Times come from `time_calls` and `compare_latency` (seconds; the tables show µs).

Goals at batch 1: Predictor / torch eager <= 0.25, and Predictor / bare session <= 1.2 (the wrapper adds almost
nothing). In one process the two runtimes' thread pools share the cores and disturb each other (ONNX Runtime's
spinning threads tax torch, and torch's tax ONNX Runtime), so the goal's three contenders are also timed each
alone: one process per contender, the three taking turns of `BENCH_TURN_CALLS` (200) calls, `BENCH_TURNS` (40)
times each, while the other two wait idle (`take_turns`); the goal ratios are the ratios of the medians of those
turns. Short turns matter on a shared host: its slow spells last seconds and would otherwise fall on one
contender's whole measurement. Prints the Markdown tables, writes them to bench/results/inference.md, and ends with
`inference: RATIO` (the Predictor on the package's default fp32 model / torch eager at batch 1, each alone).
"""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

from bigmodel_nb.cnn import FashionCNN, cnn_path, load_cnn, save_cnn
from bigmodel_nb.compress import ort_quantize_static
from bigmodel_nb.concepts import machine_info, markdown_table, time_calls, time_stats, torch_threads
from bigmodel_nb.data import channel_stats, load_fashion_mnist, normalize
from bigmodel_nb.deploy import Predictor, compare_latency, export_onnx, image_config, latency_table, ort_session

from _results import write_results

THREADS = int(os.environ['BENCH_THREADS']) if os.environ.get('BENCH_THREADS') else None  # intra-op threads; None: the runtimes' own
REPEATS = int(os.environ.get('BENCH_REPEATS', 2000))  # timed calls per contender at batch 1; batch b gets max(50, REPEATS // b)
ROUNDS = int(os.environ.get('BENCH_ROUNDS', 20))    # interleaved rounds
BATCHES = tuple(int(b) for b in os.environ.get('BENCH_BATCHES', '1,8,64').split(','))
COMPILE = os.environ.get('BENCH_COMPILE', '0') == '1'


TURNS = int(os.environ.get('BENCH_TURNS', 40))          # turns per contender in the each-alone timing
TURN_CALLS = int(os.environ.get('BENCH_TURN_CALLS', 300))  # timed calls per turn
TURN_WARMUP = 100  # untimed calls first in each turn: cores that sat idle between turns take a moment to come back to speed
PAUSE = 0.01  # seconds between turns: the last worker's spinning threads (torch's OpenMP, ONNX Runtime's pool) go idle


def eager_call(m, x):
    "One torch eager inference of the batch `x` (normalized floats), as a function of no arguments."
    def f():
        with torch.inference_mode(): m(x)
    return f


def bare_call(s, x):
    "One bare `InferenceSession.run` on `x` (normalized floats), as a function of no arguments."
    feed, out = {s.get_inputs()[0].name: np.ascontiguousarray(x)}, [s.get_outputs()[0].name]
    return lambda: s.run(out, feed)


def predictor_call(p, x):
    "One `Predictor` call on `x` (raw uint8 images), as a function of no arguments."
    return lambda: p(x)


def worker(name, folder):
    "A process that holds one contender at batch 1 and nothing else: on each line `n` from stdin, time n calls, print the median (s)."
    if THREADS: torch.set_num_threads(THREADS)
    folder = Path(folder)
    if name == 'torch eager': f = eager_call(load_cnn(folder / 'cnn.safetensors'), torch.from_numpy(np.load(folder / 'x_norm.npy')))
    elif name == 'onnxruntime (bare session)': f = bare_call(ort_session(folder / 'cnn.onnx', THREADS, spin=True), np.load(folder / 'x_norm.npy'))
    else:
        pred = Predictor(folder / 'cnn.onnx', json.loads((folder / 'config.json').read_text()), threads=THREADS)
        f = predictor_call(pred, np.load(folder / 'x_raw.npy'))
    time_calls(f, 1, 300)
    print('ready', flush=True)
    for line in sys.stdin:
        print(repr(time_stats(time_calls(f, int(line), TURN_WARMUP))['median']), flush=True)


def take_turns(names, folder):
    """Each contender alone in its own process, the processes taking turns: {name: [median seconds of each turn]}.

    One process per contender, all started first; then, `TURNS` times, each in turn times `TURN_CALLS` calls while the
    others wait on a pipe, idle. Only one runtime works at a time, so none taxes another, and the turns are short
    (tenths of a second), so a slow spell of the machine (other tenants of the host) falls on every contender alike.
    """
    procs = {n: subprocess.Popen([sys.executable, __file__, '--worker', n, str(folder)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for n in names}
    try:
        for n, p in procs.items():
            if p.stdout.readline().strip() != 'ready': raise RuntimeError(f'worker {n!r} did not start (see its error above)')
        out = {n: [] for n in names}
        for t in range(TURNS):
            k = t % len(names)
            for n in names[k:] + names[:k]:
                time.sleep(PAUSE)
                procs[n].stdin.write(f'{TURN_CALLS}\n'); procs[n].stdin.flush()
                out[n].append(float(procs[n].stdout.readline()))
        return out
    finally:
        for p in procs.values():
            p.stdin.close(); p.wait(timeout=60)


def main():
    with torch_threads(THREADS): return _main()


def _main():
    path = cnn_path(quick=False) if cnn_path(quick=False).is_file() else cnn_path(quick=True)
    if path.is_file(): model, weights = load_cnn(path), f'trained weights ({path.name})'
    else:
        torch.manual_seed(0); model, weights = FashionCNN(), 'random weights (no trained file in the cache; latency does not depend on them)'
    model = model.eval()
    ds = load_fashion_mnist(verbose=False)
    x_raw = ds.x_test[:max(BATCHES)].numpy()                      # uint8 (N, 1, 28, 28), as a user sends them
    mean, std = channel_stats(ds.x_train)                          # all 60,000 training images: the full CNN's data
    x_norm = normalize(ds.x_test[:max(BATCHES)], mean, std)       # what torch and the bare session get
    config = image_config(name='fashion-cnn', mean=mean, std=std, labels=ds.classes, input_shape=x_raw.shape[1:])

    tmp = Path(tempfile.mkdtemp(prefix='bench-inference-'))
    onnx_path = export_onnx(model, x_norm[:1], tmp / 'cnn.onnx')
    save_cnn(model, tmp / 'cnn.safetensors'); (tmp / 'config.json').write_text(json.dumps(config))
    np.save(tmp / 'x_norm.npy', x_norm[:1].numpy()); np.save(tmp / 'x_raw.npy', x_raw[:1])
    calib = [normalize(ds.x_train[i:i + 16], mean, std) for i in range(0, 160, 16)]  # 10 real training batches
    int8_path = ort_quantize_static(onnx_path, tmp / 'cnn.int8.onnx', calib)
    sess, int8 = ort_session(onnx_path, THREADS, spin=True), ort_session(int8_path, THREADS, spin=True)
    still = ort_session(onnx_path, THREADS)  # spinning off
    pred, pred8 = Predictor(onnx_path, config, threads=THREADS), Predictor(int8_path, config, threads=THREADS)
    assert (pred(x_raw).labels == model(x_norm).argmax(1).numpy()).all(), 'the predictor disagrees with torch'
    y_test = ds.y_test.numpy()
    acc, acc8 = (float((p(ds.x_test.numpy()).labels == y_test).mean()) for p in (pred, pred8))

    eager = lambda m: lambda bs: eager_call(m, x_norm[:bs].clone())
    bare = lambda s: lambda bs: bare_call(s, x_norm[:bs].numpy())
    predictor = lambda p: lambda bs: predictor_call(p, x_raw[:bs].copy())

    P, P8 = 'Predictor (uint8 in, labels out)', 'Predictor INT8 (uint8 in, labels out)'
    # Two groups, each timed on its own: a session's spinning threads keep a core busy for a moment after its
    # run, which would tax whichever contender runs next. The goal's three first; the other ways after.
    groups = [{'torch eager': eager(model), 'onnxruntime (bare session)': bare(sess), P: predictor(pred)},
              {'torch eager': eager(model), 'onnxruntime (bare session, no spinning)': bare(still),
               'onnxruntime INT8 (bare session)': bare(int8), P8: predictor(pred8)}]
    if COMPILE:
        compiled = torch.compile(model)
        with torch.inference_mode():
            for bs in BATCHES: compiled(x_norm[:bs])
        groups.append({'torch eager': eager(model), 'torch.compile': eager(compiled)})

    t0 = time.perf_counter()
    tables = []
    for g, runners in enumerate(groups):
        rows = []
        for bs in BATCHES:
            n = max(50, REPEATS // bs)
            rows += compare_latency(runners, batch_sizes=(bs,), repeats=n, warmup=max(10, n // 20), rounds=min(ROUNDS, n))
        tables.append(f'Group {g + 1}:\n\n' + latency_table(rows))
        if g == 0: goal = {r['runner']: r['median'] for r in rows if r['batch'] == 1}
        elif g == 1: b1 = {r['runner']: r['median'] for r in rows if r['batch'] == 1}
    took = time.perf_counter() - t0
    vs_eager, vs_bare = goal[P] / goal['torch eager'], goal[P] / goal['onnxruntime (bare session)']
    vs_eager8, vs_bare8 = b1[P8] / b1['torch eager'], b1[P8] / b1['onnxruntime INT8 (bare session)']

    names = ['torch eager', 'onnxruntime (bare session)', P]
    t1 = time.perf_counter()
    turns = take_turns(names, tmp)
    took_turns = time.perf_counter() - t1
    alone_med = {n: float(np.median(v)) for n, v in turns.items()}
    a_eager, a_bare = alone_med[P] / alone_med['torch eager'], alone_med[P] / alone_med['onnxruntime (bare session)']
    per_turn = {b: np.array(turns[P]) / np.array(turns[b]) for b in names[:2]}  # the ratio within each round of turns

    import onnxruntime as ort
    us = lambda s: f'{s * 1e6:,.1f}'
    lines = [f'Machine: {machine_info()}; onnxruntime {ort.__version__} ({THREADS or torch.get_num_threads()} intra-op threads)',
             f'Model: FashionCNN {list(model.cfg.channels)} channels, {sum(p.numel() for p in model.parameters()):,} parameters, {weights}.',
             f'{REPEATS} timed calls per contender at batch 1 (batch b: max(50, {REPEATS} // b)) in {ROUNDS} interleaved rounds, medians; '
             f'the groups are timed one after the other (group 1: the goal); {took:.0f} s in all.',
             '', *[t + '\n' for t in tables],
             f'Test accuracy on the {len(y_test):,} Fashion-MNIST test images: Predictor {acc:.2%}, Predictor INT8 {acc8:.2%}.', '',
             f'In one process, batch 1: Predictor / torch eager = {vs_eager:.3f} (INT8 model {vs_eager8:.3f}); '
             f'Predictor / its bare session = {vs_bare:.3f} (INT8 model {vs_bare8:.3f}).', '',
             'Each contender alone (batch 1, fp32 model): one process per contender with nothing else loaded, the three '
             f'taking turns {TURNS} times ({TURN_CALLS} timed calls a turn after {TURN_WARMUP} untimed, {PAUSE * 1000:.0f} ms apart, '
             f'{took_turns:.0f} s in all), while the other two wait idle. In one process the two runtimes\' thread pools '
             'share the cores and disturb each other; alone, each has the cores a server would give it, and short turns '
             'spread the machine\'s slow spells (other tenants of the host) over all three alike.', '',
             markdown_table([dict(runner=n, median=alone_med[n], fastest=min(v), slowest=max(v), vs=alone_med[n] / alone_med['torch eager'])
                             for n, v in turns.items()],
                            headers={'median': "median of the turns' medians (µs)", 'fastest': 'fastest turn (µs)',
                                     'slowest': 'slowest turn (µs)', 'vs': '/ torch eager'},
                            fmt={'median': us, 'fastest': us, 'slowest': us, 'vs': '.3f'}), '',
             f'Predictor / torch eager within each round of turns: median {np.median(per_turn["torch eager"]):.3f}, '
             f'quartiles {np.percentile(per_turn["torch eager"], 25):.3f}–{np.percentile(per_turn["torch eager"], 75):.3f}; '
             f'Predictor / bare session: median {np.median(per_turn["onnxruntime (bare session)"]):.3f}, quartiles '
             f'{np.percentile(per_turn["onnxruntime (bare session)"], 25):.3f}–{np.percentile(per_turn["onnxruntime (bare session)"], 75):.3f}.', '',
             f'**Goals, batch 1, each alone: Predictor / torch eager = {a_eager:.3f} (goal <= 0.25); '
             f'Predictor / bare session = {a_bare:.3f} (goal <= 1.2).**']
    write_results('inference', 'Inference latency', '\n'.join(lines))
    print(f'in one process: predictor / torch eager {vs_eager:.2f}, predictor / bare session {vs_bare:.2f}')
    print(f'predictor / bare session: {a_bare:.2f}')
    print(f'inference: {a_eager:.2f}')


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--worker': worker(sys.argv[2], sys.argv[3])
    else: sys.exit(main())
