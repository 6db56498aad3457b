"""Benchmark of the pretraining chapter's distillation: the strong CNN (`get_trained_cnn()`) teaches a student
`FashionCNN(STUDENT)` with under a tenth of its parameters.

(a) All labels: the student alone and distilled (`Distill`, teacher on the same augmented batch, logits cached per
    distinct view) with the same recipe and the same number of steps. Goal: median over seeds of the
    distilled/alone test-error ratio <= 0.95.
(b) Unlabelled transfer set (Hinton et al. 2015): the student sees the labels of 10 images per class and the teacher's
    soft targets on all 60,000 training images (no labels); against the same student trained on the 100 labelled
    images alone (`train_few`, the chapter's few-label recipe). Goal: error <= 0.35 x the 100-label student's.

Each run appends one JSON line to bench/results/distill_runs.jsonl (runs are step-counted: no lock needed, and seeds
can run in separate processes); `--report` writes bench/results/distill.md from them. Last line: `distill ratio: <r>`.
Options: --part a|b, --seeds 0 1 2, --epochs E, --T 4, --alpha 0.9, --mixup 0, --report.
"""
import argparse, json, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bigmodel_nb.cnn import FashionCNN, get_trained_cnn
from bigmodel_nb.concepts import count_parameters, machine_info, markdown_table
from bigmodel_nb.data import image_dataloaders
from bigmodel_nb.learner import accuracy_on
from bigmodel_nb.cnn import save_cnn
from dataclasses import asdict
from bigmodel_nb.pretrain import DISTILL_ALPHA, DISTILL_T, student_path, DISTILL_RECIPE, STUDENT, FineTuneRecipe, few_labels, median_spread, train_few, train_student

from _results import RESULTS, write_results

RUNS = RESULTS / 'distill_runs.jsonl'


def log(row):
    RUNS.parent.mkdir(exist_ok=True)
    with open(RUNS, 'a') as f: f.write(json.dumps(row) + '\n')
    print(json.dumps(row), flush=True)


def run(a):
    dls = image_dataloaders('fashion_mnist', valid_pct=0.0, seed=0, verbose=False, limit=a.limit)
    teacher = get_trained_cnn(verbose=False)
    cache, base = {}, dict(epochs=a.epochs, T=a.T, alpha=a.alpha, mixup=a.mixup, machine=machine_info(),
                           teacher_acc=teacher.info['test_acc'], teacher_params=count_parameters(teacher), student_params=count_parameters(FashionCNN(STUDENT)))
    for s in a.seeds:
        r = replace(DISTILL_RECIPE, epochs=a.epochs, seed=s)
        if a.part == 'a':
            for arm in a.arms:
                t = time.perf_counter()
                kw = dict(teacher=teacher, T=a.T, alpha=a.alpha, mixup=a.mixup, cache=cache) if arm == 'distilled' else {}
                _, row = train_student(dls, r, **kw)
                log(dict(base, part='a', arm=arm, seed=s, error=row['error'], steps=row['steps'], train_s=row['train_s'], wall_s=round(time.perf_counter() - t, 1)))
                if arm == 'distilled' and s == 0 and a.limit is None and (a.epochs, a.T, a.alpha, a.mixup) == (DISTILL_RECIPE.epochs, DISTILL_T, DISTILL_ALPHA, 0.0):
                    want = dict(recipe=asdict(r), T=DISTILL_T, alpha=DISTILL_ALPHA, limit=None)  # what `get_student()` loads
                    save_cnn(_, student_path(), info={**want, **row}); print(f"saved the distilled student to {student_path()}")
        else:
            lab = few_labels(dls.train.y, 10, seed=s)
            _, row = train_few(dls, lab, replace(FineTuneRecipe(), seed=s), cfg=STUDENT, name='student, 100 labels')
            log(dict(base, part='b', arm='100 labels alone', seed=s, error=1 - row['test_acc'], steps=row['steps'], train_s=row['train_s']))
            _, row = train_student(dls, r, teacher=teacher, T=a.T, alpha=a.alpha, mixup=a.mixup, cache=cache, idx=lab, unlabelled=True)
            log(dict(base, part='b', arm='100 labels + transfer set', seed=s, error=row['error'], steps=row['steps'], train_s=row['train_s'], labelled=row['labelled']))


def report():
    rows = [json.loads(l) for l in RUNS.read_text().splitlines() if l.strip()]
    out, ratio_a = [], None
    cfgs = sorted({(r['part'], r['epochs'], r['T'], r['alpha'], r['mixup']) for r in rows})
    body = f"Machine (of the last run): {rows[-1]['machine']}\n\nTeacher: the strong CNN, {rows[-1]['teacher_params']:,} parameters, " \
           f"{100 * rows[-1]['teacher_acc']:.2f}% test accuracy; student `STUDENT` {rows[-1]['student_params']:,} parameters " \
           f"({rows[-1]['student_params'] / rows[-1]['teacher_params']:.1%}). All errors on the 10,000 test images.\n\n"
    table = []
    for part, E, T, alpha, mixup in cfgs:
        sel = [r for r in rows if (r['part'], r['epochs'], r['T'], r['alpha'], r['mixup']) == (part, E, T, alpha, mixup)]
        arms = sorted({r['arm'] for r in sel}, key=lambda x: (x != 'alone', x))
        by = {arm: {r['seed']: r for r in sel if r['arm'] == arm} for arm in arms}
        base_arm, other = ('alone', 'distilled') if part == 'a' else ('100 labels alone', '100 labels + transfer set')
        seeds = sorted(set(by.get(base_arm, {})) & set(by.get(other, {})))
        ratios = [by[other][s]['error'] / by[base_arm][s]['error'] for s in seeds]
        for arm in arms:
            e = [by[arm][s]['error'] for s in sorted(by[arm])]
            table.append(dict(part=part, config=f"{E} epochs, T={T}, alpha={alpha}, mixup={mixup}", arm=arm, seeds=len(e), steps=by[arm][sorted(by[arm])[0]]['steps'],
                              error=median_spread(e)['median'], spread=f"{100 * min(e):.2f}–{100 * max(e):.2f}",
                              ratio=None if arm == base_arm or not ratios else float(np.median(ratios)),
                              ratios=None if arm == base_arm else ', '.join(f'{x:.3f}' for x in ratios)))
        if part == 'a' and ratios and len(seeds) >= 3: ratio_a = (float(np.median(ratios)), len(seeds), f"{E} epochs, T={T}, alpha={alpha}, mixup={mixup}")
        if part == 'b' and ratios: out.append((float(np.median(ratios)), len(seeds)))
    body += markdown_table(table, ['part', 'config', 'arm', 'seeds', 'steps', 'error', 'spread', 'ratio', 'ratios'],
                           dict(error='median test error', spread='min–max %', ratio='median error ratio (per seed, paired)', ratios='per-seed ratios'),
                           dict(error='.2%', ratio='.3f'))
    body += "\n\n"
    if ratio_a: body += f"Goal (a): median distilled/alone error ratio <= 0.95 over 3 seeds: {ratio_a[0]:.3f} ({ratio_a[2]}) — {'MET' if ratio_a[0] <= 0.95 else 'NOT met'}\n\n"
    for r, n in out: body += f"Goal (b): transfer-set student error <= 0.35 x the 100-label student's: median ratio {r:.3f} over {n} seed(s) — {'MET' if r <= 0.35 else 'NOT met'}\n\n"
    write_results('distill', 'Distillation benchmark: the strong CNN into a student with under a tenth of its parameters', body)
    print(f"distill ratio: {ratio_a[0]:.3f}" if ratio_a else "distill ratio: n/a (fewer than 3 seeds of part a)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--part', default='a', choices=['a', 'b'])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--arms', nargs='+', default=['alone', 'distilled'])
    ap.add_argument('--epochs', type=int, default=DISTILL_RECIPE.epochs)
    ap.add_argument('--T', type=float, default=4.0)
    ap.add_argument('--alpha', type=float, default=0.9)
    ap.add_argument('--mixup', type=float, default=0.0)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--report', action='store_true')
    ap.add_argument('--limit', type=int, default=None, help='a stratified subset of the training images (smoke tests only)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    report() if a.report else run(a)
