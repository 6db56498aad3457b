"Tests of `bigmodel_nb.interpret`: attacks against torchattacks, calibration against torchmetrics, attributions against Captum, explain, the lifecycle steps, bad input."
import copy
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel_nb.cnn import CNNConfig, FashionCNN
from bigmodel_nb.data import DataLoaders, TensorLoader, channel_stats, load_fashion_mnist, normalize
from bigmodel_nb.deploy import image_config, load_package, save_package
from bigmodel_nb.interpret import (AdversarialTraining, PixelModel, attack_accuracy, calibration_metrics, calibration_split,
                                   deletion_curve, ece, explain, explain_command, fgsm, fit_temperature, fit_top_label,
                                   fuzz_predictor, grad_cam, gradient_map, integrated_gradients, rank_correlation,
                                   randomized_copy, reliability, smoothgrad, step_attack, step_calibrate, temperature_scale,
                                   to_uint8, top_label_scale, TopLabelMap, pgd)
from bigmodel_nb.learner import Learner

torch.set_num_threads(1)
LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return FashionCNN(CNNConfig(channels=(8, 16), convs=(1, 1), hidden=32)).eval()


@pytest.fixture(scope='module')
def data():
    ds = load_fashion_mnist(verbose=False)
    mean, std = channel_stats(ds.x_train[:5000])
    return ds, mean, std


@pytest.fixture(scope='module')
def trained(data):
    "A small CNN trained for one pass over 3,000 images: good enough for gradients that mean something."
    ds, mean, std = data
    m = small_cnn(); m.train()
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    x, y = normalize(ds.x_train[:3000], mean, std), ds.y_train[:3000]
    for _ in range(2):
        for i in range(0, 3000, 100):
            opt.zero_grad(); F.cross_entropy(m(x[i:i + 100]), y[i:i + 100]).backward(); opt.step()
    return m.eval()


@pytest.fixture(scope='module')
def pixels(data):
    ds, _, _ = data
    return ds.x_test[:64].float() / 255, ds.y_test[:64]


@pytest.fixture(scope='module')
def package(tmp_path_factory, trained, data):
    ds, mean, std = data
    cfg = image_config(name='t', mean=mean, std=std, labels=LABELS, input_shape=(1, 28, 28))
    return save_package(trained, tmp_path_factory.mktemp('pkg') / 'p', normalize(ds.x_test[:2], mean, std), cfg)


def test_pixel_model(trained, data, pixels):
    _, mean, std = data
    pm = PixelModel(trained, mean, std)
    x, _ = pixels
    with torch.no_grad(): torch.testing.assert_close(pm(x), trained(normalize((x * 255).round().to(torch.uint8), mean, std)), atol=1e-4, rtol=0)
    torch.testing.assert_close(pm.pixels(pm.normalize(x)), x, atol=1e-6, rtol=0)


def test_attacks_match_torchattacks(trained, data, pixels):
    import torchattacks
    pm = copy.deepcopy(PixelModel(trained, *data[1:])).eval().double()  # float64: in float32 a gradient within rounding of 0 can flip its sign
    x, y = pixels[0].double(), pixels[1]
    torch.testing.assert_close(fgsm(pm, x, y, 0.05), torchattacks.FGSM(pm, eps=0.05)(x, y), atol=1e-9, rtol=0)
    ref = torchattacks.PGD(pm, eps=0.1, alpha=0.01, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(pgd(pm, x, y, 0.1, steps=7, alpha=0.01, random_start=False), ref, atol=1e-9, rtol=0)


def test_pgd_stays_in_ball_and_hurts(trained, data, pixels):
    pm = PixelModel(trained, *data[1:]).eval()
    x, y = pixels
    xa = pgd(pm, x, y, 0.1, steps=10)
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad(): clean, adv = (pm(x).argmax(-1) == y).float().mean(), (pm(xa).argmax(-1) == y).float().mean()
    assert adv < clean - 0.3, (clean, adv)
    torch.testing.assert_close(pgd(pm, x, y, 0.1, steps=3, seed=1), pgd(pm, x, y, 0.1, steps=3, seed=1))  # seeded start


@pytest.mark.parametrize('kw, msg', [(dict(eps=1.5), 'eps must be a number in \\[0, 1\\]'), (dict(eps=-0.1), 'eps must be'),
                                     (dict(eps=0.1, steps=0), 'steps must be an integer'), (dict(eps=0.1, steps=2.5), 'steps must be')])
def test_attack_bad_arguments(trained, data, pixels, kw, msg):
    pm = PixelModel(trained, *data[1:])
    with pytest.raises(ValueError, match=msg): pgd(pm, *pixels, **kw)


def test_attack_bad_images(trained, data, pixels):
    pm = PixelModel(trained, *data[1:])
    x, y = pixels
    with pytest.raises(ValueError, match='images must lie in \\[0, 1\\]'): fgsm(pm, x * 2 - 0.5, y, 0.1)
    with pytest.raises(ValueError, match='expected float pixels'): fgsm(pm, (x * 255).to(torch.uint8), y, 0.1)


def test_to_uint8_stays_in_ball():
    clean = np.array([[[[0, 10, 250, 128]]]], np.uint8)
    adv = torch.tensor([[[[0.2, 0.0, 1.0, 0.4]]]])
    out = to_uint8(adv, clean, 0.1)
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - clean).max() <= 25
    assert out.tolist() == [[[[25, 0, 255, 103]]]]
    with pytest.raises(ValueError, match='eps must be'): to_uint8(adv, clean, 2)


def test_attack_accuracy_served_path(trained, data, package, pixels):
    pm, pred = PixelModel(trained, *data[1:]).eval(), load_package(package)
    raw, y = (pixels[0] * 255).round().to(torch.uint8).numpy(), pixels[1]
    clean = attack_accuracy(pm, pred, raw, y, 0)
    assert clean == attack_accuracy(pm, None, raw, y, 0) == float((pred(raw).labels == y.numpy()).mean())
    f, p = attack_accuracy(pm, pred, raw, y, 0.1, 'fgsm'), attack_accuracy(pm, pred, raw, y, 0.1, 'pgd', 10)
    assert p <= f < clean
    with pytest.raises(ValueError, match="attack must be 'pgd' or 'fgsm'"): attack_accuracy(pm, pred, raw, y, 0.1, 'cw')


def test_adversarial_training_replaces_batch(data):
    ds, mean, std = data
    x, y = normalize(ds.x_train[:256], mean, std), ds.y_train[:256]
    seen = []
    from bigmodel_nb.learner import Callback
    class Spy(Callback):
        order = 0
        def before_batch(self):
            if self.learn.training: seen.append(self.learn.xb.clone())
    m = small_cnn()
    cb = AdversarialTraining(0.1, mean, std, steps=2, ramp=0)
    learn = Learner(m, (TensorLoader(x, y, 128), None), lr=1e-3, cbs=[cb, Spy()], progress=False)
    bn = m[0][2]; before = bn.running_mean.clone()
    learn.fit(1)
    assert len(seen) == 2
    pix = lambda z: z * std[:, None, None] + mean[:, None, None]
    d = (pix(seen[0]) - pix(x[:128])).abs()
    assert d.max() <= 0.1 + 1e-5 and d.max() > 0.05  # replaced, inside the ball
    assert not torch.equal(before, bn.running_mean)  # the training step still updates BatchNorm
    with pytest.raises(ValueError, match='eps must be'): AdversarialTraining(2, mean, std)


def test_ece_reliability_match_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, 10, generator=g) * 3
    y = torch.randint(0, 10, (3000,), generator=g)
    p = logits.softmax(-1)
    assert abs(ece(p, y) - float(multiclass_calibration_error(p, y, 10, n_bins=15, norm='l1'))) < 1e-6
    rows = reliability(p, y)
    assert sum(r['n'] for r in rows) == 3000 and all(r['lo'] < r['conf'] <= r['hi'] for r in rows)
    m = calibration_metrics(p, y)
    assert abs(m['nll'] - float(F.cross_entropy(logits, y))) < 1e-5
    assert abs(m['brier'] - float(((p - F.one_hot(y, 10)) ** 2).sum(-1).mean())) < 1e-6
    with pytest.raises(ValueError, match='expected probabilities'): ece(p, y[:10])


def test_fit_temperature_recovers_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 4
    y = torch.multinomial((z / 2.0).softmax(-1), 1, generator=g)[:, 0]   # labels drawn at T = 2
    T = fit_temperature(z, y)
    assert abs(T - 2.0) < 0.1, T
    assert calibration_metrics(temperature_scale(z, T), y)['ece'] < calibration_metrics(z.softmax(-1), y)['ece']
    assert (temperature_scale(z, T).argmax(-1) == z.argmax(-1)).all()


@pytest.mark.parametrize('t', [0, -1.0, float('nan'), float('inf'), '1'])
def test_temperature_bad(t):
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'): temperature_scale(torch.zeros(2, 3), t)


@pytest.mark.parametrize('kind', ['platt', 'beta'])
def test_top_label_scale_keeps_labels_and_hits_target(kind):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 10, generator=g) * 3
    y = torch.multinomial((z / 1.5).softmax(-1), 1, generator=g)[:, 0]
    m = fit_top_label(z.softmax(-1), y, kind)
    q = top_label_scale(z, m)
    assert (q.argmax(-1) == z.argmax(-1)).all()
    conf = z.double().softmax(-1).max(-1).values
    a, b, *rest = m.params
    want = torch.sigmoid(a * torch.logit(conf) + b if kind == 'platt' else a * conf.log() - b * (1 - conf).log() + rest[0])
    torch.testing.assert_close(q.max(-1).values, want.clamp(min=0.1 + 1e-6), atol=1e-9, rtol=0)
    assert calibration_metrics(q, y)['nll'] < calibration_metrics(z.softmax(-1), y)['nll']  # the fit helps on its own data


def test_beta_fit_is_the_nll_minimum():
    "The fitted beta map's NLL is below that of nearby parameters (a, b kept ≥ 0)."
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3000, 10, generator=g) * 2
    y = torch.multinomial((z / 0.7).softmax(-1), 1, generator=g)[:, 0]
    m = fit_top_label(z.softmax(-1), y, 'beta')
    conf, pred = z.double().softmax(-1).max(-1)
    nll = lambda params: float(F.binary_cross_entropy(TopLabelMap('beta', params)(conf), (pred == y).double()))
    best = nll(m.params)
    for i in range(3):
        for d in (-0.05, 0.05):
            p = list(m.params); p[i] = max(p[i] + d, 0.) if i < 2 else p[i] + d
            assert best <= nll(tuple(p)) + 1e-12


def test_calibration_split_stratified():
    y = torch.arange(10).repeat(100)
    fit, ev = calibration_split(y)
    assert len(set(fit.tolist()) & set(ev.tolist())) == 0 and len(fit) + len(ev) == 1000
    assert torch.bincount(y[fit]).tolist() == [50] * 10


def test_attributions_match_captum(trained, data, pixels):
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency
    pm = PixelModel(trained, *data[1:]).eval()
    x = pixels[0][:16]; t = pm(x).argmax(-1)
    torch.testing.assert_close(gradient_map(pm, x, t), Saliency(pm).attribute(x, target=t, abs=True), atol=1e-6, rtol=0)
    ig = integrated_gradients(pm, x, t, steps=32)
    ref = IntegratedGradients(pm).attribute(x, baselines=0., target=t, n_steps=32, method='riemann_trapezoid')
    torch.testing.assert_close(ig * 31 / 32, ref, atol=1e-5, rtol=1e-4)  # Captum's trapezoid weights add up to (n-1)/n
    for layer in (trained[0], trained[1]):
        ref = LayerAttribution.interpolate(LayerGradCam(pm, layer).attribute(x, target=t, relu_attributions=True), (28, 28), interpolate_mode='bilinear')[:, 0]
        torch.testing.assert_close(grad_cam(pm, x, layer, t), ref.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(smoothgrad(pm, x, t, n=2, sigma=0.), gradient_map(pm, x, t))
    assert not torch.allclose(smoothgrad(pm, x, t, n=4, sigma=0.2), gradient_map(pm, x, t))


def test_integrated_gradients_completeness(trained, data, pixels):
    pm = PixelModel(trained, *data[1:]).eval()
    x = pixels[0][:8]; t = pm(x).argmax(-1)
    ig = integrated_gradients(pm, x, t, steps=1024)  # the gradient jumps along the path: the trapezoid error falls as 1/n
    with torch.no_grad(): gap = (pm(x) - pm(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    assert ((ig.sum((1, 2, 3)) - gap).abs() / gap.abs()).max() < 0.01
    with pytest.raises(ValueError, match='steps must be ≥ 2'): integrated_gradients(pm, x, t, steps=1)


def test_rank_correlation_and_randomized_copy(trained):
    a = torch.rand(3, 28, 28)
    torch.testing.assert_close(rank_correlation(a, a), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rank_correlation(a, -a), -torch.ones(3, dtype=torch.float64))
    r = randomized_copy(trained)
    assert all(not torch.equal(p, q) for (n, p), q in zip(trained.named_parameters(), r.parameters()) if p.dim() > 1)
    assert not r.training


def test_deletion_curve(trained, data, pixels):
    pm = PixelModel(trained, *data[1:]).eval()
    x, y = pixels
    rel = torch.rand(len(x), 28, 28)
    with torch.no_grad(): clean = float((pm(x).argmax(-1) == y).float().mean())
    accs = deletion_curve(pm, x, y, rel, 'morf', (0, 1.0))
    assert accs[0] == clean
    with torch.no_grad(): blank = float((pm(torch.zeros_like(x)).argmax(-1) == y).float().mean())
    assert accs[1] == blank and deletion_curve(pm, x, y, rel, 'lerf', (1.0,)) == [blank]
    # MoRF by the map itself vs LeRF: removing the brightest pixels first changes the input more than the darkest
    assert deletion_curve(pm, x, y, x[:, 0], 'morf', (0.2,))[0] <= deletion_curve(pm, x, y, x[:, 0], 'lerf', (0.2,))[0]
    with pytest.raises(ValueError, match="order must be"): deletion_curve(pm, x, y, rel, 'up')


def test_explain_and_command(package, pixels, tmp_path, capsys):
    raw = (pixels[0] * 255).round().to(torch.uint8).numpy()
    ex = explain(package, raw[0], k=3)
    pred = load_package(package)
    p = pred(raw[:1])
    assert ex['label_ids'][0] == int(p.labels[0]) and abs(ex['probs'][0] - float(p.probs[0].max())) < 1e-6
    assert ex['cam'].shape == (28, 28) and ex['cam'].min() >= 0 and ex['layer'] == '1'
    assert explain(package, raw[0, 0] / 255.)['labels'] == ex['labels']  # float pixels in 0..1, (H, W)
    np.save(tmp_path / 'img.npy', raw[0, 0])
    out = explain_command(package, tmp_path / 'img.npy', k=2, out=tmp_path / 'cam.png')
    assert (tmp_path / 'cam.png').stat().st_size > 1000 and out['labels'] == ex['labels'][:2]
    assert 'Grad-CAM' in capsys.readouterr().out
    with pytest.raises(ValueError, match='explain takes one image'): explain(package, raw[:2])
    with pytest.raises(ValueError, match='k must be an integer'): explain(package, raw[0], k=11)
    with pytest.raises(ValueError, match='uint8 pixels or floats in 0..1'): explain(package, raw[0].astype(np.float32))
    np.save(tmp_path / 'two.npy', raw[:2])
    with pytest.raises(ValueError, match='holds 2 images'): explain_command(package, tmp_path / 'two.npy')


def test_fuzz_predictor(package):
    seen = fuzz_predictor(load_package(package), examples=60)
    assert sum(seen.values()) == 60 and seen['ValueError'] > 0


def test_steps_calibrate_and_attack(trained, data, package, tmp_path):
    ds, mean, std = data
    te = TensorLoader(normalize(ds.x_test[:1000], mean, std), ds.y_test[:1000], 500)
    dls = DataLoaders(None, None, te, classes=LABELS, mean=mean, std=std)
    T, res = step_calibrate(trained, dls, tmp_path)
    assert res['fit_images'] + res['eval_images'] == 1000 and abs(res['fit_images'] - res['eval_images']) <= 10 and T > 0 and (tmp_path / 'reliability.png').is_file()
    assert res['nll_after'] <= res['nll_before'] + 1e-9
    att = step_attack(package, dls, n=100)
    assert abs(att['attack_images'] - 100) <= 10 and att['pgd_acc'] <= att['fgsm_acc'] <= att['clean_acc']
