"""Fine-tuning chapter 06a's measurements: pretrained against scratch, and accuracy against trainable parameters.

The task (`bigmodel_nb.finetune.play_passages`): which of five plays (Macbeth, Romeo and Juliet, The Tempest,
Othello, Julius Caesar; none of them in the pretraining text) a 64-character passage comes from; train and test cut
from separate contiguous blocks of each play; every test passage scored. Each fine-tuning run: `fine_tune`, 100
AdamW steps of 16 passages, cosine schedule, k labelled passages per class drawn with the run's seed.

The pretrained models are the cached ones (`get_pretrained`: the chapter 05 `gpt` recipe's architecture, 200 s each,
masked LM for the encoder, next character for the GPT); absent, they are trained first (200 s each).

Two parts, each short enough for one exclusive hold of the CPU, each adding its rows to bench/results/lora.json
(`python bench/lora.py` runs both, one after the other):
  python bench/lora.py --part gain     masked-LM encoder, GPT and from scratch, full fine-tuning, k = 8 and 32, 3 seeds
  python bench/lora.py --part params   from the masked-LM encoder at k = 32: a linear head, LoRA r = 1, 2, 4, 8, 16
Prints the Markdown of every row measured so far (medians over seeds, min..max), writes bench/results/lora.md, and ends
with `finetune gain at 8 per class (masked LM - scratch, accuracy points): X`.
"""
import argparse, json, time

import torch

from _results import RESULTS, write_results

from bigmodel_nb.concepts import atomic_write, machine_info, markdown_table
from bigmodel_nb.data import shakespeare_split
from bigmodel_nb.finetune import finetune_rows, get_pretrained, mlm_encoder, play_passages, summarize

STORE = RESULTS / 'lora.json'
SECONDS = 200


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--part', choices=['gain', 'params', 'all'], default='all')
    ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_info(), flush=True)
    split = shakespeare_split()
    V = split.tokenizer.vocab_size
    pre = {kind: get_pretrained(kind, split, SECONDS) for kind in ('mlm', 'gpt')}
    data = play_passages(split.tokenizer)
    t0 = time.perf_counter()
    rows = []
    if a.part in ('gain', 'all'):
        rows += finetune_rows({'masked LM': pre['mlm'], 'GPT': pre['gpt'], 'from scratch': mlm_encoder(V, seed=0)}, data, ks=(8, 32))
    if a.part in ('params', 'all'):
        rows += finetune_rows({'masked LM': pre['mlm']}, data, ks=(32,), methods=[('linear', None)] + [('lora', r) for r in (1, 2, 4, 8, 16)])
    print(f"part {a.part}: {len(rows)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    store = json.loads(STORE.read_text()) if STORE.is_file() else {'rows': []}
    names = {(r['model'], r['k']) for r in rows}
    store['rows'] = [r for r in store['rows'] if (r['model'], r['k']) not in names] + [dict(r, machine=machine_info()) for r in rows]
    store['summary'] = summarize(store['rows'])
    store['pretrained'] = {k: {f: m.info.get(f) for f in ('model', 'params', 'train_seconds', 'steps', 'valid_masked_nats',
                                                          'valid_masked_accuracy', 'valid_nats', 'machine')} for k, m in pre.items()}
    with atomic_write(STORE) as tmp: tmp.write_text(json.dumps(store, indent=1))
    summ = store['summary']
    gain = [r for r in summ if r['model'].endswith(', full')]
    params = [r for r in summ if r['model'].startswith('masked LM') and r['k'] == 32]
    params.sort(key=lambda r: r['trainable'])
    fmt = lambda rs: markdown_table([{'model': r['model'], 'k per class': r['k'], 'trainable': r['trainable'],
                                      'median accuracy %': round(100 * r['median_accuracy'], 1),
                                      'min..max %': f"{100 * r['min']:.1f}..{100 * r['max']:.1f}", 'seeds': r['seeds'],
                                      'test passages': r['test_passages']} for r in rs])
    pre_rows = markdown_table([{'pretrained': k, **{f: v for f, v in d.items() if v is not None and f != 'machine'}} for k, d in store['pretrained'].items()])
    body = (f"Machine: {machine_info()}. Each run: 100 AdamW steps of 16 passages; accuracy on every test passage; "
            f"median over seeds 0, 1, 2 (min..max).\n\nPretrained models (cached, `get_pretrained`):\n\n{pre_rows}\n\n"
            f"Full fine-tuning from each pretrained model and from scratch:\n\n{fmt(gain)}\n\n"
            f"Accuracy against trainable parameters, from the masked-LM encoder, 32 labelled passages per class:\n\n{fmt(params)}\n")
    write_results('lora', 'Fine-tuning: pretrained vs scratch, LoRA ranks (bench/lora.py)', body)
    med = {(r['model'], r['k']): r['median_accuracy'] for r in summ}
    if ('masked LM, full', 8) in med and ('from scratch, full', 8) in med:
        print(f"finetune gain at 8 per class (masked LM - scratch, accuracy points): {100 * (med[('masked LM, full', 8)] - med[('from scratch, full', 8)]):.1f}")


if __name__ == '__main__':
    main()
