"""Benchmark of the recurrent chapter's character model (the goal of `bigmodel_nb.rnn`).

A character LSTM (`CharLM`: embedding 64, one `nn.LSTM` layer of 512, linear head) trained on the first 90% of the
first 1,115,394 characters of Shakespeare (`shakespeare_split`) with `train_lm`: windows of 100 characters, state
carried across consecutive windows (truncated BPTT, `char_lm_dataloaders(stateful=True)`), AdamW with a cosine
schedule paced by `TimeBudget`, gradient clipping at 1. Then `evaluate_lm` over the WHOLE validation split (the last
10%), the LSTM reading it as one stream with its state carried. Goal: <= 1.55 nats within 10 minutes of training on
a 2-core CPU. Last line: `char_lm: <nats> nats (<bits> bits/char) on the whole validation split after <s> s of training`.

Options: --seconds (training budget, default 590), --hidden, --batch, --seq-len, --lr, --stateless (fresh state per
window), --threads (default 2), --out FILE.
"""
import argparse, json

import torch

from bigmodel_nb.concepts import machine_info, markdown_table
from bigmodel_nb.data import char_lm_dataloaders, shakespeare_split
from bigmodel_nb.rnn import CharLM, CharLMConfig, generate, train_lm

from _results import write_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seconds', type=float, default=590., help='seconds of training (evaluation excluded), default 590')
    ap.add_argument('--arch', default='lstm', choices=['rnn', 'lstm', 'gru'])
    ap.add_argument('--hidden', type=int, default=512)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--seq-len', type=int, default=100)
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--stateless', action='store_true', help='start every window from a zero state (no truncated BPTT)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mach = machine_info()
    print(f"machine: {mach}", flush=True)
    split = shakespeare_split()
    dls = char_lm_dataloaders(split, seq_len=args.seq_len, batch_size=args.batch, stateful=not args.stateless)
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(vocab_size=split.tokenizer.vocab_size, arch=args.arch, hidden=args.hidden))
    model, row, curve = train_lm(model, dls, args.seconds, lr=args.lr, valid_every=60, progress=False)
    for r in curve: print(f"  {r['train_seconds']:6.1f} s  step {r['step']:5d}  validation windows {r['loss']:.4f} nats", flush=True)
    sample = generate(model, split.tokenizer, "ROMEO:", n=300, temperature=0.8, seed=0)
    print(sample, flush=True)
    table = markdown_table([{k: v for k, v in row.items() if k != 'machine'}],
                           fmt={'valid_nats': '.4f', 'valid_bpc': '.4f', 'params': ',d'})
    body = (f"{table}\n\nTraining: windows of {args.seq_len}, batch {args.batch}, AdamW lr {args.lr:g} with a cosine schedule paced by "
            f"the clock, clipping 1.0, {'fresh state per window' if args.stateless else 'state carried across windows (truncated BPTT)'}; "
            f"`valid_nats` is `evaluate_lm` over the whole validation split ({len(split.valid):,} characters, the state carried).\n\n"
            f"Curve (validation windows of {args.seq_len}, stateless): "
            + ', '.join(f"{r['train_seconds']:.0f} s {r['loss']:.3f}" for r in curve)
            + f"\n\nSample (temperature 0.8):\n\n```\n{sample}\n```\n\nMachine: {mach}")
    write_results('char_lm', 'Character LSTM on Shakespeare (chapter 04)', body, out=args.out, show=False)
    print(json.dumps({k: v for k, v in row.items()}), flush=True)
    goal = 'met' if row['valid_nats'] <= 1.55 and row['train_seconds'] <= 600 else 'missed'
    print(f"char_lm: {row['valid_nats']:.4f} nats ({row['valid_bpc']:.3f} bits/char) on the whole validation split after "
          f"{row['train_seconds']:.0f} s of training, {row['params']:,} parameters ({mach}); goal <= 1.55 nats in 600 s: {goal}")


if __name__ == '__main__':
    main()
