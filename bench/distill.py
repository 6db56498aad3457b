"""Benchmark of the pretraining chapter's distillation: the strong CNN (`get_trained_cnn()`) teaches a student
`FashionCNN(STUDENT)` with under a tenth of its parameters (`--student` picks another shape from `STUDENT_SHAPES`;
`--teacher no-smoothing` the same network trained by the same recipe without label smoothing, trained once and cached).

(a) All labels: the student alone and distilled (`Distill`, teacher on the same augmented batch, logits cached per
    distinct view) with the same recipe and the same number of steps. Goal: median over seeds of the
    distilled/alone test-error ratio <= 0.95.
(b) Unlabelled transfer set (Hinton et al. 2015): the student sees the labels of 10 images per class and the teacher's
    soft targets on all 60,000 training images (no labels); against the same student trained on the 100 labelled
    images alone (`train_few`, the chapter's few-label recipe). Goal: error <= 0.35 x the 100-label student's.

Each run appends one JSON line to bench/results/distill_runs.jsonl (runs are step-counted: no lock needed, and seeds
can run in separate processes); `--report` writes bench/results/distill.md from them. Last line: `distill ratio: <r>`.
Options: --part a|b, --teacher strong|no-smoothing, --student NAME, --seeds 0 1 2, --epochs E, --T 4, --alpha 0.9, --mixup 0, --attention 0, --report.
"""
import argparse, json, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bigmodel_nb.cnn import CNNConfig, CNNRecipe, FashionCNN, get_trained_cnn, load_cnn, save_cnn, train_fashion_cnn
from bigmodel_nb.concepts import count_parameters, machine_info, markdown_table
from bigmodel_nb.data import cache_dir, image_dataloaders
from bigmodel_nb.learner import accuracy_on
from dataclasses import asdict
from bigmodel_nb.pretrain import DISTILL_ALPHA, DISTILL_T, student_path, DISTILL_RECIPE, STUDENT, FineTuneRecipe, few_labels, median_spread, train_few, train_student

from _results import RESULTS, write_results

RUNS = RESULTS / 'distill_runs.jsonl'
# students with under a tenth of the teacher's parameters: the chapter's, and two smaller shapes
STUDENT_SHAPES = {'student': STUDENT, 'tiny': CNNConfig(channels=(8, 16, 32), hidden=0),
                  'two-stage': CNNConfig(channels=(16, 32), convs=(1, 1), hidden=0)}
# teachers: the strong CNN as the CNN chapter trains it (label smoothing 0.1), and the same network and recipe without
# label smoothing (Mueller et al. 2019: smoothing erases what a teacher knows about the wrong classes)
NO_SMOOTHING = CNNRecipe(label_smoothing=0.0)


def get_teacher(name, dls):
    "The teacher called `name`: 'strong' (`get_trained_cnn()`), or 'no-smoothing' (trained once with `NO_SMOOTHING`, then cached)"
    if name == 'strong': return get_trained_cnn(verbose=False)
    path = cache_dir() / 'models' / 'fashion_cnn_no_smoothing.safetensors'
    if path.is_file():
        m = load_cnn(path)
        if m.info.get('recipe') == asdict(NO_SMOOTHING): return m
    t = time.perf_counter()
    m, row = train_fashion_cnn(recipe=NO_SMOOTHING, dls=dls, progress=False, name='strong CNN, no label smoothing')
    save_cnn(m, path, info={'recipe': asdict(NO_SMOOTHING), **row})
    print(f"trained the teacher without label smoothing: {row['test_acc']:.2%} in {time.perf_counter() - t:.0f} s; saved {path}", flush=True)
    m.info = {'recipe': asdict(NO_SMOOTHING), **row}
    return m


def log(row):
    RUNS.parent.mkdir(exist_ok=True)
    with open(RUNS, 'a') as f: f.write(json.dumps(row) + '\n')
    print(json.dumps(row), flush=True)


def run(a):
    dls = image_dataloaders('fashion_mnist', valid_pct=0.0, seed=0, verbose=False, limit=a.limit)
    teacher = get_teacher(a.teacher, dls)
    cfg = STUDENT_SHAPES[a.student]
    cache, base = {}, dict(teacher=a.teacher, student=a.student, threads=torch.get_num_threads(), epochs=a.epochs, T=a.T, alpha=a.alpha, mixup=a.mixup, attention=a.attention, machine=machine_info(),
                           teacher_acc=teacher.info['test_acc'], teacher_params=count_parameters(teacher), student_params=count_parameters(FashionCNN(cfg)))
    for s in a.seeds:
        r = replace(DISTILL_RECIPE, epochs=a.epochs, seed=s)
        if a.part == 'a':
            for arm in a.arms:
                t = time.perf_counter()
                kw = dict(teacher=teacher, T=a.T, alpha=a.alpha, mixup=a.mixup, attention=a.attention, cache=cache) if arm == 'distilled' else {}
                _, row = train_student(dls, r, cfg=cfg, **kw)
                log(dict(base, part='a', arm=arm, seed=s, error=row['error'], steps=row['steps'], train_s=row['train_s'], wall_s=round(time.perf_counter() - t, 1)))
                if arm == 'distilled' and s == 0 and a.student == 'student' and a.teacher == 'strong' and a.limit is None and (a.epochs, a.T, a.alpha, a.mixup, a.attention) == (DISTILL_RECIPE.epochs, DISTILL_T, DISTILL_ALPHA, 0.0, 0.0):
                    want = dict(recipe=asdict(r), T=DISTILL_T, alpha=DISTILL_ALPHA, limit=None)  # what `get_student()` loads
                    save_cnn(_, student_path(), info={**want, **row}); print(f"saved the distilled student to {student_path()}")
        else:
            lab = few_labels(dls.train.y, 10, seed=s)
            _, row = train_few(dls, lab, replace(FineTuneRecipe(), seed=s), cfg=cfg, name='student, 100 labels')
            log(dict(base, part='b', arm='100 labels alone', seed=s, error=1 - row['test_acc'], steps=row['steps'], train_s=row['train_s']))
            _, row = train_student(dls, r, cfg=cfg, teacher=teacher, T=a.T, alpha=a.alpha, mixup=a.mixup, attention=a.attention, cache=cache, idx=lab, unlabelled=True)
            log(dict(base, part='b', arm='100 labels + transfer set', seed=s, error=row['error'], steps=row['steps'], train_s=row['train_s'], labelled=row['labelled']))


def report():
    rows = [dict({'teacher': 'strong', 'student': 'student', 'attention': 0.0}, **json.loads(l)) for l in RUNS.read_text().splitlines() if l.strip()]  # early runs: the chapter's student
    r0 = rows[-1]
    sizes = {r['student']: r['student_params'] for r in rows}
    threads = sorted({str(r.get('threads', 1)) for r in rows})
    accs = {r['teacher']: r['teacher_acc'] for r in rows if r['arm'] != 'alone'}
    names = {'strong': 'the strong CNN (`get_trained_cnn()`, label smoothing 0.1)', 'no-smoothing': 'the same network and recipe without label smoothing (`NO_SMOOTHING`)'}
    body = (f"Machine (of the last run): {r0['machine']}\n\nTeachers ({r0['teacher_params']:,} parameters): " +
            '; '.join(f"`{t}`: {names[t]}, {100 * a:.2f}% test accuracy" for t, a in accs.items()) + ". Students (`STUDENT_SHAPES`): " +
            ', '.join(f"{n} (channels {STUDENT_SHAPES[n].channels}, hidden {STUDENT_SHAPES[n].hidden}) {p:,} parameters ({p / r0['teacher_params']:.1%})" for n, p in sizes.items()) +
            f". All errors on the 10,000 test images; each run one process ({' or '.join(threads)} torch thread(s)), step-counted.\n\n")
    table, goals = [], []
    def add(name, config, runs, base=None):
        e = [runs[s]['error'] for s in sorted(runs)]
        seeds = sorted(set(runs) & set(base or {}))
        ratios = [runs[s]['error'] / base[s]['error'] for s in seeds] if base else []
        table.append(dict(part=config[0], config=config[1], arm=name, seeds=len(e), steps=runs[sorted(runs)[0]]['steps'],
                          error=median_spread(e)['median'], spread=f"{100 * min(e):.2f}–{100 * max(e):.2f}",
                          ratio=float(np.median(ratios)) if ratios else None, ratios=', '.join(f'{x:.3f}' for x in ratios) or None,
                          train_s=', '.join(str(runs[s]['train_s']) for s in sorted(runs))))
        return (float(np.median(ratios)), len(ratios)) if ratios else None
    for st, E in sorted({(r['student'], r['epochs']) for r in rows if r['part'] == 'a'}, key=lambda k: (list(STUDENT_SHAPES).index(k[0]), k[1])):
        sel = [r for r in rows if r['part'] == 'a' and r['student'] == st and r['epochs'] == E]
        alone = {r['seed']: r for r in sel if r['arm'] == 'alone'}
        if alone: add('alone', ('a', f"{st}, {E} epochs"), alone)
        variant = lambda r: (r['teacher'] != 'strong', r['teacher'], r['T'], r['alpha'], r['mixup'], r['attention'])
        for v in sorted({variant(r) for r in sel if r['arm'] == 'distilled'}):
            _, tn, T, alpha, mixup, at = v
            d = {r['seed']: r for r in sel if r['arm'] == 'distilled' and variant(r) == v}
            cfg = (f"{st}, {E} epochs, T={T:g}, alpha={alpha:g}, mixup={mixup:g}" + (f", attention={at:g}" if at else '') +
                   (f", teacher {tn}" if tn != 'strong' else ''))
            g = add('distilled', ('a', cfg), d, alone)
            if g: goals.append(('a', cfg, *g))
    key = lambda r: (r['teacher'], r['student'], r['epochs'], r['T'], r['alpha'], r['mixup'], r['attention'])
    for tn, st, E, T, alpha, mixup, at in sorted({key(r) for r in rows if r['part'] == 'b'}):
        sel = [r for r in rows if r['part'] == 'b' and key(r) == (tn, st, E, T, alpha, mixup, at)]
        base = {r['seed']: r for r in sel if r['arm'] == '100 labels alone'}
        add('100 labels alone (train_few, 300 steps)', ('b', f"{st}, few-label recipe"), base)
        cfg = (f"{st}, {E} epochs, T={T:g}, alpha={alpha:g}, mixup={mixup:g}" + (f", attention={at:g}" if at else '') +
               (f", teacher {tn}" if tn != 'strong' else ''))
        g = add('100 labels + transfer set', ('b', cfg), {r['seed']: r for r in sel if r['arm'] == '100 labels + transfer set'}, base)
        if g: goals.append(('b', cfg, *g))
    body += markdown_table(table, ['part', 'config', 'arm', 'seeds', 'steps', 'error', 'spread', 'ratio', 'ratios', 'train_s'],
                           dict(error='median test error', spread='min–max %', ratio='median error ratio (paired per seed)', ratios='per-seed ratios', train_s='training s per seed'),
                           dict(error='.2%', ratio='.3f'))
    body += "\n\n"
    for part, cfg, r, n in goals:
        lim = 0.95 if part == 'a' else 0.35
        what = 'distilled/alone error ratio' if part == 'a' else 'transfer-set/100-label error ratio'
        body += f"Goal ({part}): median {what} <= {lim} over {n} seed(s), {cfg}: {r:.3f} — {'MET' if r <= lim and n >= 3 else 'NOT met'}\n\n"
    write_results('distill', 'Distillation benchmark: the strong CNN into a student with under a tenth of its parameters', body)
    best = min(((r, c) for p, c, r, n in goals if p == 'a' and n >= 3), default=None)
    print(f"distill ratio: {best[0]:.3f} ({best[1]})" if best is not None else "distill ratio: n/a (fewer than 3 seeds of part a)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--part', default='a', choices=['a', 'b'])
    ap.add_argument('--teacher', default='strong', choices=['strong', 'no-smoothing'], help='the strong CNN, or the same trained without label smoothing')
    ap.add_argument('--student', default='student', choices=list(STUDENT_SHAPES), help="the student's shape")
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--arms', nargs='+', default=['alone', 'distilled'])
    ap.add_argument('--epochs', type=int, default=DISTILL_RECIPE.epochs)
    ap.add_argument('--T', type=float, default=4.0)
    ap.add_argument('--alpha', type=float, default=0.9)
    ap.add_argument('--mixup', type=float, default=0.0)
    ap.add_argument('--attention', type=float, default=0.0, help='attention transfer beta (0: off)')
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--report', action='store_true')
    ap.add_argument('--limit', type=int, default=None, help='a stratified subset of the training images (smoke tests only)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    report() if a.report else run(a)
