"""Peak memory and time of naive, blocked and SDPA attention, forward + backward, causal, lengths 512 ... 4096.

Contenders (chapter 05, `bigmodel_nb.attention`): `naive_attention` (the formula; autograd keeps the L x L scores and
weights), `blocked_attention` (query and key tiles, online softmax, a backward that recomputes the tiles) and
`F.scaled_dot_product_attention` (PyTorch's fused CPU kernel). Batch 1, 4 heads of 64, float32, causal.

Each case runs in a fresh process (`python bench/attention.py --case KIND L`), so that no allocator cache carries over,
with glibc told to return large blocks to the system (`MALLOC_MMAP_THRESHOLD_=65536`; otherwise resident memory reports
the allocator's cache). The child makes its inputs, resets the kernel's peak-RSS mark (`/proc/self/clear_refs`, 5),
reads its resident memory as the baseline, runs one forward + backward and reads the peak (`VmHWM`): the figure is
peak minus baseline. Then it times `REPEATS` more passes (median). On a GPU the same script would read
`torch.cuda.max_memory_allocated`; this machine has none.

Goals: the blocked attention's peak <= 0.25x naive's at 2048 and <= 0.1x at 4096, at most 3x SDPA's time.
Prints a Markdown table, writes bench/results/attention.md, and ends with `attention memory blocked/naive at 4096: RATIO`.
"""
import json, os, subprocess, sys, time

import torch

LENGTHS = [int(x) for x in os.environ.get('BENCH_LENGTHS', '512,1024,2048,4096').split(',')]
KINDS = ['naive', 'blocked', 'sdpa']
HEADS, D, REPEATS = 4, 64, int(os.environ.get('BENCH_REPEATS', 3))
BLOCK = int(os.environ.get('BENCH_BLOCK', 256))
GOALS = {2048: 0.25, 4096: 0.10}  # blocked peak / naive peak, at most
TIME_GOAL = 3.0  # blocked time / SDPA time, at most


def _kib(field):
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def child(kind, L):
    "One case, in this fresh process: peak RSS above baseline (MiB) and the median time of a forward + backward."
    from bigmodel_nb.attention import ATTENTION_KINDS, blocked_attention
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', 2)))
    f = (lambda q, k, v, causal: blocked_attention(q, k, v, causal, BLOCK, BLOCK)) if kind == 'blocked' else ATTENTION_KINDS[kind]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, L, D, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, HEADS, L, D, generator=g)
    def run():
        f(q, k, v, causal=True).backward(dout)
        q.grad = k.grad = v.grad = None
    with torch.no_grad(): f(q[..., :8, :], k[..., :8, :], v[..., :8, :], causal=True)  # load the kernels before the baseline
    with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')  # reset the peak-RSS mark
    base = _kib('VmRSS'); t = time.perf_counter(); run(); first = time.perf_counter() - t
    peak = _kib('VmHWM')
    ts = []
    for _ in range(REPEATS): t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
    print(json.dumps({'kind': kind, 'L': L, 'peak_mib': (peak - base) / 1024, 'seconds': sorted(ts)[len(ts) // 2], 'first_seconds': first}))


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _results import write_results
    from bigmodel_nb.concepts import machine_info, markdown_table
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    rows = []
    for L in LENGTHS:
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, '--case', kind, str(L)], env=env, capture_output=True, text=True)
            if out.returncode: sys.exit(f'case {kind} {L} failed:\n{out.stderr}')
            rows.append(json.loads(out.stdout.strip().splitlines()[-1])); print(rows[-1], flush=True)
    by = {(r['kind'], r['L']): r for r in rows}
    table = []
    for L in LENGTHS:
        n, b, s = by['naive', L], by['blocked', L], by['sdpa', L]
        table.append({'L': L, 'naive MiB': n['peak_mib'], 'blocked MiB': b['peak_mib'], 'SDPA MiB': s['peak_mib'],
                      'blocked/naive memory': b['peak_mib'] / n['peak_mib'],
                      'naive ms': 1e3 * n['seconds'], 'blocked ms': 1e3 * b['seconds'], 'SDPA ms': 1e3 * s['seconds'],
                      'blocked/SDPA time': b['seconds'] / s['seconds']})
    fmt = {'naive MiB': '.1f', 'blocked MiB': '.1f', 'SDPA MiB': '.1f', 'blocked/naive memory': '.3f', 'naive ms': '.0f',
           'blocked ms': '.0f', 'SDPA ms': '.0f', 'blocked/SDPA time': '.2f'}
    goals = []
    for L, g in GOALS.items():
        if ('blocked', L) in by and ('naive', L) in by:
            r = by['blocked', L]['peak_mib'] / by['naive', L]['peak_mib']
            goals.append(f"- memory at {L}: blocked/naive {r:.3f} (goal <= {g}): {'met' if r <= g else 'NOT met'}")
    worst = max(t['blocked/SDPA time'] for t in table)
    goals.append(f"- time: blocked/SDPA at most {worst:.2f}x over these lengths (goal <= {TIME_GOAL}x): {'met' if worst <= TIME_GOAL else 'NOT met'}")
    body = (f"Machine: {machine_info()}\n\nForward + backward, causal, batch 1, {HEADS} heads of {D}, float32; blocked tiles "
            f"{BLOCK} x {BLOCK}. Peak resident memory above the process's baseline (fresh process per case, "
            f"MALLOC_MMAP_THRESHOLD_=65536); time: median of {REPEATS} passes after a first.\n\n"
            + markdown_table(table, fmt=fmt) + '\n\n' + '\n'.join(goals))
    write_results('attention', 'Attention memory and time: naive, blocked (online softmax), SDPA', body)
    if 4096 in LENGTHS: print(f"attention memory blocked/naive at 4096: {by['blocked', 4096]['peak_mib'] / by['naive', 4096]['peak_mib']:.3f}")


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--case': child(sys.argv[2], int(sys.argv[3]))
    else: main()
