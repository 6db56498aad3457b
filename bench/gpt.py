"""nanoGPT's CPU recipe (the baseline) against chapter 05's GPT, at equal wall time, on the Shakespeare split.

Both are `bigmodel_nb.attention` recipes (`LM_RECIPES`), trained by the RNN chapter's `train_lm` (AdamW, cosine
schedule paced by the clock, gradient clipping 1.0) and scored by its `evaluate_lm`: mean next-character
cross-entropy in nats over the whole validation split (the last 10% of the first 1,115,394 characters), each GPT
sliding its own window. The baseline is nanoGPT's shakespeare_char CPU recipe (4 layers, 4 heads, 128 wide, context
64, batch 12, peak rate 1e-3, no dropout, no biases); nanoGPT's own code did its 2,000 iterations on this split in
126 s on a 2-core CPU (1.921 nats), so the baseline gets a 126 s budget (`BENCH_SECONDS`) and the GPT the same.

Three parts, each short enough for one exclusive hold of the CPU, each adding its rows to bench/results/gpt.json
(rows of recipes that have since changed are dropped):
  python bench/gpt.py              the baseline and the GPT at equal time (the goal: >= 0.08 nats below)
  python bench/gpt.py --ablations  the GPT with one thing changed per row (its departures from the baseline undone,
                                   a longer context, a larger batch), same budget
  python bench/gpt.py --long       the GPT for 600 s (`BENCH_LONG`; the goal: <= 1.60 nats within 10 minutes)
Prints the Markdown of every row measured so far, writes bench/results/gpt.md, and ends (default part) with
`gpt nats below the baseline at the baseline's wall time: X.XXX`.
"""
import json, os, sys
from dataclasses import asdict, replace

import torch

from _results import RESULTS, write_results

from bigmodel_nb.attention import LM_RECIPES, train_gpt
from bigmodel_nb.concepts import atomic_write, machine_info, markdown_table
from bigmodel_nb.data import shakespeare_split

SECONDS = float(os.environ.get('BENCH_SECONDS', 126))
LONG = float(os.environ.get('BENCH_LONG', 600))
GOAL_GAP, GOAL_LONG = 0.08, 1.60
STORE = RESULTS / 'gpt.json'


def ablations():
    "The GPT with one thing changed, each: its departures from nanoGPT undone, a longer context, a larger batch."
    g = LM_RECIPES['gpt']
    return {'gpt, learned positions': replace(g, arch={**g.arch, 'positions': 'learned'}),
            'gpt, context 128': replace(g, arch={**g.arch, 'n_ctx': 128}),
            'gpt, batch 32': replace(g, batch_size=32),  # (more tokens per step, fewer steps)
            'gpt, peak rate 1e-3': replace(g, lr=1e-3)}


def run(name, recipe, split, seconds):
    _, row, curve = train_gpt(recipe, split, seconds, valid_every=seconds / 4)
    row.update(model=name, budget_seconds=seconds, recipe=asdict(recipe))
    row['tokens_per_second'] = row['steps'] * recipe.batch_size * recipe.arch['n_ctx'] / row['train_seconds']
    print({k: v for k, v in row.items() if k != 'recipe'}, flush=True)
    return row, curve


def main():
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', 2)))
    part = sys.argv[1] if len(sys.argv) > 1 else '--main'
    split = shakespeare_split(verbose=False)
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    current = {'nanogpt': LM_RECIPES['nanogpt'], 'gpt': LM_RECIPES['gpt'], **ablations(), 'gpt, 10 minutes': LM_RECIPES['gpt']}
    store = {k: v for k, v in store.items() if k in current and v['row'].get('recipe') == asdict(current[k])}  # rows of today's recipes only
    if part == '--main':
        for name in ('nanogpt', 'gpt'):
            row, curve = run(name, LM_RECIPES[name], split, SECONDS)
            store[name] = {'row': row, 'curve': curve}
    elif part == '--ablations':
        for name, recipe in ablations().items():
            row, curve = run(name, recipe, split, SECONDS)
            store[name] = {'row': row, 'curve': curve}
    elif part == '--long':
        row, curve = run('gpt, 10 minutes', LM_RECIPES['gpt'], split, LONG)
        store['gpt, 10 minutes'] = {'row': row, 'curve': curve}
    else: sys.exit(f'unknown part {part!r}: use --main, --ablations or --long')
    with atomic_write(STORE) as tmp: tmp.write_text(json.dumps(store, indent=1))
    rows = [{k: v for k, v in s['row'].items() if k not in ('recipe', 'machine', 'valid_bpc')} for s in store.values()]
    lines = [f"Machine: {machine_info()}", "",
             "Mean next-character cross-entropy (nats) over the whole validation split, `evaluate_lm` (sliding window). "
             f"Equal budget: {SECONDS:.0f} s of training (evaluations excluded).", "",
             markdown_table(rows, fmt={'valid_nats': '.4f', 'tokens_per_second': ',.0f'}), ""]
    gap = None
    if 'nanogpt' in store and 'gpt' in store:
        gap = store['nanogpt']['row']['valid_nats'] - store['gpt']['row']['valid_nats']
        lines.append(f"- the GPT is {gap:.3f} nats below the baseline at the baseline's wall time "
                     f"(goal >= {GOAL_GAP}: {'met' if gap >= GOAL_GAP else 'NOT met'})")
    if 'gpt, 10 minutes' in store:
        n = store['gpt, 10 minutes']['row']['valid_nats']
        lines.append(f"- the GPT after {LONG:.0f} s: {n:.4f} nats (goal <= {GOAL_LONG}: {'met' if n <= GOAL_LONG else 'NOT met'})")
    write_results('gpt', "nanoGPT's CPU recipe against chapter 05's GPT at equal time", '\n'.join(lines))
    if gap is not None: print(f"gpt nats below the baseline at the baseline's wall time: {gap:.3f}")


if __name__ == '__main__':
    main()
