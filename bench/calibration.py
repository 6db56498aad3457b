"""Benchmark of the interpretation chapter's calibration: the strong CNN's probabilities before and after calibration.

The CNN chapter's strong CNN (`get_trained_cnn()`, trained on all 60,000 training images with label smoothing) on the
10,000 test images: the maps are fitted on a stratified half (`calibration_split`, seed 0) and every figure comes from the
other half. Side by side: the softmax; temperature scaling (one T, fitted by NLL); temperature scaling followed by
top-label Platt scaling (two numbers, fitted by NLL; reached by a per-image temperature, so no label changes);
temperature scaling followed by top-label beta calibration (Kull et al. 2017: three numbers, monotone, fitted by NLL,
reached the same way); a temperature per predicted class (ten numbers, fitted by NLL; labels kept); and, for
reference, vector scaling (a weight and a bias per class, fitted by NLL), which may change labels. Also: the mean ECE
of a perfectly calibrated model on the same number of images (labels drawn from the calibrated probabilities), and the
same maps fitted on the other half (the halves swapped).
Goal: ECE ≤ 1.0% after calibration with the accuracy unchanged. Last line: `calibration: <best label-preserving ECE>%`.

Writes bench/results/calibration.md.
"""
import torch
import torch.nn.functional as F

from bigmodel_nb.cnn import get_trained_cnn
from bigmodel_nb.concepts import machine_info, markdown_table
from bigmodel_nb.data import image_dataloaders
from bigmodel_nb.interpret import (calibration_metrics, calibration_split, ece_floor, fit_temperature, fit_top_label,
                                   temperature_scale, top_label_scale)

from _results import write_results


def vector_scaling(logits, y):
    "A weight and a bias per class, fitted by NLL (L-BFGS): the map (changes labels in general)."
    w = torch.ones(logits.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=200, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad(); loss = F.cross_entropy(logits * w + b, y); loss.backward(); return loss
    opt.step(closure)
    return lambda z: (z * w + b).detach().softmax(-1)


def classwise_temperature(logits, y):
    "One temperature per predicted class, fitted by NLL (L-BFGS): each image's logits over the T of its top label (labels kept)."
    c = logits.argmax(-1)
    log_t = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad(); loss = F.cross_entropy(logits / log_t.exp()[c][:, None], y); loss.backward(); return loss
    opt.step(closure)
    t = log_t.detach().exp()
    return lambda z: (z / t[z.argmax(-1)][:, None]).softmax(-1)


def rows_for(logits, y, fit, ev):
    T = fit_temperature(logits[fit], y[fit])
    platt, beta = (fit_top_label(temperature_scale(logits[fit], T), y[fit], kind) for kind in ('platt', 'beta'))
    vs = vector_scaling(logits[fit], y[fit])
    maps = {'softmax (uncalibrated)': logits[ev].softmax(-1), f'temperature scaling (T = {T:.3f})': temperature_scale(logits[ev], T),
            'temperature + top-label Platt (a = {:.3f}, b = {:.3f})'.format(*platt.params): top_label_scale(logits[ev], platt, T),
            'temperature + top-label beta (a = {:.3f}, b = {:.3f}, m = {:.3f})'.format(*beta.params): top_label_scale(logits[ev], beta, T),
            'temperature per predicted class (10 parameters)': classwise_temperature(logits[fit], y[fit])(logits[ev]),
            'vector scaling (20 parameters; labels may change)': vs(logits[ev])}
    base = logits[ev].argmax(-1)
    rows = [dict(map=k, labels_kept=bool((p.argmax(-1) == base).all()), **calibration_metrics(p, y[ev])) for k, p in maps.items()]
    return rows, temperature_scale(logits[ev], T)


def main():
    torch.manual_seed(0)
    model = get_trained_cnn(verbose=False)
    dls = image_dataloaders('fashion_mnist', valid_pct=0.0, verbose=False)
    with torch.no_grad(): logits = torch.cat([model(b) for b in dls.test.x.split(1000)]).double()
    y = dls.test.y
    fit, ev = calibration_split(y)
    rows, cal = rows_for(logits, y, fit, ev)
    swapped, _ = rows_for(logits, y, ev, fit)
    floor = ece_floor(cal, draws=50)
    fmt = {'acc': '.2%', 'ece': '.2%', 'nll': '.4f', 'brier': '.4f'}
    best = min((r for r in rows[1:] if r['labels_kept']), key=lambda r: r['ece'])
    ok = best['ece'] <= 0.01 and best['acc'] == rows[0]['acc']
    body = '\n'.join([
        f"Machine: {machine_info()}.", '',
        f"Model: the CNN chapter's strong CNN ({model.info.get('test_acc', float('nan')):.2%} test accuracy, label smoothing 0.1). "
        f"Fitted on a stratified half of the test set ({len(fit)} images), measured on the other ({len(ev)}); ECE with 15 equal-width bins.", '',
        markdown_table(rows, headers={'labels_kept': 'labels unchanged'}, fmt=fmt), '',
        f"Halves swapped (fitted on the second half, measured on the first):", '',
        markdown_table(swapped, headers={'labels_kept': 'labels unchanged'}, fmt=fmt), '',
        f"ECE of a perfectly calibrated model on {len(ev)} images (labels drawn from the temperature-scaled probabilities, "
        f"mean of 50 draws): {floor:.2%}.", '',
        f"Goal (ECE ≤ 1.0% after calibration, accuracy unchanged): {'met' if ok else 'NOT met'} by '{best['map']}' "
        f"({best['ece']:.2%}, accuracy {best['acc']:.2%} vs {rows[0]['acc']:.2%})."])
    write_results('calibration', 'Calibration of the strong CNN', body)
    print(f"calibration: {best['ece'] * 100:.2f}%")


if __name__ == '__main__':
    main()
