"""Generation with a KV cache against recomputing the prefix: 256 new tokens at context 256, a 0.8M-parameter GPT.

Both paths are the RNN chapter's `generate` (one sampling code): given `context=256` it recomputes the model on the
last 256 tokens for every new token; without it, it calls the GPT's `step(ids, state)`, which runs only the new token
against the cached keys and values (chapter 05's `KVCache`), through `decode_one`: the same operations as the modules'
forward, as plain functions. For comparison (not part of the goal's figure) the cached path is also timed through the
modules, which `step` takes when the model has a forward hook. Greedy decoding (`top_k=1`): the two must produce the
same text, which is checked before timing. The GPT is the chapter's recipe (`LM_RECIPES['gpt']`: nanoGPT's CPU
shape, 4 layers, 4 heads, 128 wide, no biases; rotary positions) with context 256; its weights are drawn wider than
at initialisation (std 0.1), so that the greedy choices are far from ties (the time does not depend on the values). Runs are interleaved
(`concepts.interleaved_rounds`) on a process with two torch threads. Each path is timed with two threads and with one,
and each is represented by its faster setting (a one-token step is small: fewer threads can win).

Goal: the cache at least 4x faster than recomputation. Prints a Markdown table, writes bench/results/generate.md and
ends with `generate speed-up (KV cache vs recompute, 256 tokens at context 256): X.XX`.
"""
import os, sys

import torch

from _results import write_results

from bigmodel_nb.attention import GPT, LM_RECIPES
from bigmodel_nb.concepts import TransformerConfig, count_parameters, torch_threads, interleaved_rounds, machine_info, markdown_table, time_stats
from bigmodel_nb.data import shakespeare_split
from bigmodel_nb.rnn import generate

N, CTX = 256, 256
ROUNDS = int(os.environ.get('BENCH_ROUNDS', 15))  # the spread between runs is wide on a shared VM: 15 rounds for a stable median
GOAL = 4.0


def main():
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', 2)))
    tok = shakespeare_split(verbose=False).tokenizer
    torch.manual_seed(0)
    model = GPT(TransformerConfig(tok.vocab_size, **{**LM_RECIPES['gpt'].arch, 'n_ctx': CTX})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2: p.normal_(0, 0.1)
    prompt = '\n'
    threads = torch.get_num_threads()
    def gen(n_threads, context=None):
        with torch_threads(n_threads): return generate(model, tok, prompt, N, top_k=1, context=context)
    def through_modules(n_threads):  # a no-op forward hook makes `step` call the modules instead of `decode_one`
        hook = model.register_forward_pre_hook(lambda *a: None)
        try: return gen(n_threads)
        finally: hook.remove()
    runs = {f'recompute, {threads} threads': lambda: gen(threads, CTX), 'recompute, 1 thread': lambda: gen(1, CTX),
            f'KV cache, {threads} threads': lambda: gen(threads), 'KV cache, 1 thread': lambda: gen(1),
            f'(KV cache through the modules, {threads} threads)': lambda: through_modules(threads),
            '(KV cache through the modules, 1 thread)': lambda: through_modules(1)}
    texts = {k: f() for k, f in runs.items()}
    if len(set(texts.values())) != 1:
        sys.exit("the cached and recomputed greedy texts differ:\n" + '\n'.join(f'{k}: {v!r}' for k, v in texts.items()))
    times = interleaved_rounds(runs, rounds=ROUNDS, repeats=1, warmup=1)
    st = {k: time_stats(v) for k, v in times.items()}
    base, cached = (min((k for k in st if k.startswith(p)), key=lambda k: st[k]['median']) for p in ('recompute', 'KV cache'))
    speedup = st[base]['median'] / st[cached]['median']
    rows = [{'path': k, 'ms for 256 tokens': 1e3 * s['median'], 'p10 ms': 1e3 * s['p10'], 'p90 ms': 1e3 * s['p90'],
             'ms per token': 1e3 * s['median'] / N, 'runs': s['n']} for k, s in st.items()]
    body = (f"Machine: {machine_info()}\n\nGPT {count_parameters(model):,} parameters ({model.cfg}, recipe 'gpt' "
            f"at context {CTX}); greedy, prompt of one character, {N} new tokens; the same text on every path "
            f"({texts[base][1:41]!r}...). Medians over {ROUNDS} interleaved rounds.\n\n"
            + markdown_table(rows, fmt={'ms for 256 tokens': '.0f', 'p10 ms': '.0f', 'p90 ms': '.0f', 'ms per token': '.2f'})
            + f"\n\nSpeed-up of the faster cached run ({cached}) over the faster recomputation ({base}): {speedup:.2f}x (goal >= {GOAL}x: {'met' if speedup >= GOAL else 'NOT met'})")
    write_results('generate', 'Generation: KV cache against recomputation', body)
    print(f'generate speed-up (KV cache vs recompute, 256 tokens at context 256): {speedup:.2f}')


if __name__ == '__main__':
    main()
