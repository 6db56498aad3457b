"""Benchmark of the interpretation chapter's adversarial part: the standard CNN against the adversarially trained one.

1. `--train`: adversarial training of a `FashionCNN` with the chapter's `RobustRecipe()` (one FGSM step from a random
   start per batch, ε = 0.1 reached after the first 30% of the run, a 600 s `TimeBudget` on this machine), saved where
   `get_robust_cnn()` looks. Run it alone, under the exclusive lock: the budget makes the model depend on the speed.
2. Default: both models packaged (`save_package`), attacked with FGSM and PGD-20 (random start) from their torch
   weights, the adversarial images rounded to uint8 and scored by the packaged `Predictor` (the served path), at
   ε ∈ {0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3} on a stratified 1,000 test images; clean accuracy on all 10,000 test
   images; gradient-masking checks (PGD never above FGSM, PGD-50 not above PGD-20, ≤ 10% at ε = 0.5).
   Goal: PGD-20 at ε = 0.1 ≥ 70% with ≥ 85% clean, after ≤ 10 minutes of adversarial training on 2 cores.
   Last line: `robustness: <PGD-20 accuracy at ε = 0.1 of the adversarially trained CNN>%`.

Writes bench/results/robustness.md. Options: --train, --n N (attacked images), --seconds S (training budget).
"""
import argparse, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

from bigmodel_nb.cnn import get_trained_cnn
from bigmodel_nb.concepts import machine_info, markdown_table
from bigmodel_nb.data import image_dataloaders, stratified_split
from bigmodel_nb.deploy import save_package, load_package, image_config
from bigmodel_nb.interpret import (EPSILONS, PixelModel, RobustRecipe, attack_accuracy, get_robust_cnn, robust_cnn_path,
                                   robustness_rows, train_robust_cnn)
from bigmodel_nb.cnn import save_cnn
from dataclasses import asdict

from _results import write_results


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--train', action='store_true', help='train (and save) the adversarially trained CNN, then stop')
    p.add_argument('--n', type=int, default=1000, help='attacked test images (stratified)')
    p.add_argument('--seconds', type=float, default=600, help='adversarial training budget in seconds')
    a = p.parse_args(argv)
    recipe = RobustRecipe(seconds=a.seconds)
    if a.train:
        print(f"machine: {machine_info()}; torch threads: {torch.get_num_threads()} (the runtime's default)")
        t = time.perf_counter()
        model, row = train_robust_cnn(recipe=recipe, progress=True)
        save_cnn(model, robust_cnn_path(), info={'recipe': asdict(recipe), **row})
        print(f"trained in {time.perf_counter() - t:.0f} s ({row['epochs']} epochs): clean test accuracy {row['test_acc']:.2%}; "
              f"saved {robust_cnn_path()}")
        return
    dls = image_dataloaders('fashion_mnist', valid_pct=0.0, verbose=False)
    std_cnn, rob_cnn = get_trained_cnn(verbose=False), get_robust_cnn(recipe)
    tmp = Path(tempfile.mkdtemp())
    models, clean = {}, {}
    raw_all = PixelModel(std_cnn, dls.mean, dls.std).pixels(dls.test.x).mul(255).round().to(torch.uint8).numpy()
    y_all = dls.test.y.numpy()
    for name, m in (('standard CNN', std_cnn), ('adversarially trained CNN', rob_cnn)):
        pred = load_package(save_package(m, tmp/name.replace(' ', '_'), dls.test.x[:2], image_config(dls, name=name)))
        models[name] = (PixelModel(m, dls.mean, dls.std).eval(), pred)
        clean[name] = float((pred(raw_all).labels == y_all).mean())
    idx = stratified_split(dls.test.y, (a.n / len(dls.test.y),), seed=0)[0]
    raw, y = raw_all[idx.numpy()], dls.test.y[idx]
    t = time.perf_counter()
    rows = robustness_rows(models, raw, y, EPSILONS)
    pm, pred = models['adversarially trained CNN']
    checks = dict(pgd_never_above_fgsm=all(r['pgd'] <= r['fgsm'] for r in rows))
    p20, p50 = attack_accuracy(pm, pred, raw, y, 0.1, 'pgd', 20), attack_accuracy(pm, pred, raw, y, 0.1, 'pgd', 50)
    e5 = attack_accuracy(pm, pred, raw, y, 0.5, 'pgd', 20)
    checks.update(pgd50_not_above_pgd20=p50 <= p20, at_eps_0_5_at_most_10pct=e5 <= 0.10)
    secs = time.perf_counter() - t
    info = rob_cnn.info
    rob = next(r['pgd'] for r in rows if r['model'] == 'adversarially trained CNN' and r['eps'] == 0.1)
    ok = rob >= 0.70 and clean['adversarially trained CNN'] >= 0.85 and info.get('train_s', 1e9) <= 600
    body = '\n'.join([
        f"Machine: {machine_info()}; torch threads: {torch.get_num_threads()}.", '',
        f"Adversarially trained CNN: `{info.get('recipe')}`, trained {info.get('train_s')} s ({info.get('epochs')} epochs) "
        f"on {info.get('train_images')} images (its own run of `bench/robustness.py --train`).", '',
        "Clean accuracy on all 10,000 test images, through the packaged predictor: " +
        ', '.join(f"{k} {v:.2%}" for k, v in clean.items()) + '.', '',
        f"Accuracy under attack on {len(y)} stratified test images (adversarial images rounded to uint8, scored by the "
        f"packaged predictor; PGD-20 with a random start, α = 2.5ε/20; {secs:.0f} s of attacks):", '',
        markdown_table(rows, headers={'eps': 'ε', 'fgsm': 'FGSM', 'pgd': 'PGD-20'}, fmt={'fgsm': '.1%', 'pgd': '.1%'}), '',
        f"Gradient-masking checks (adversarially trained CNN): PGD-20 {p20:.1%} vs PGD-50 {p50:.1%} at ε = 0.1; "
        f"PGD-20 at ε = 0.5: {e5:.1%}; " + ', '.join(f"{k}: {v}" for k, v in checks.items()) + '.', '',
        f"Goal (PGD-20 at ε = 0.1 ≥ 70% with ≥ 85% clean after ≤ 600 s of adversarial training): {'met' if ok else 'NOT met'} "
        f"({rob:.1%} robust, {clean['adversarially trained CNN']:.2%} clean, {info.get('train_s')} s)."])
    write_results('robustness', 'Adversarial robustness: standard vs adversarially trained CNN', body)
    print(f"robustness: {rob * 100:.1f}%")


if __name__ == '__main__':
    main()
