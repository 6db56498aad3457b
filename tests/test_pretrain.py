"Tests of bigmodel_nb.pretrain (chapter 06): few labels, NT-Xent, kd_loss and at_loss against float64 formulas, the freezing and distillation callbacks, the views, the lifecycle step"
import json, math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigmodel_nb.cnn import CNNConfig, CNNRecipe, FashionCNN, get_trained_cnn, load_cnn
from bigmodel_nb.concepts import check_against, count_parameters
from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.learner import Callback, Learner, evaluate
from bigmodel_nb.pretrain import (STUDENT, Distill, FineTuneRecipe, FreezeEncoder, MaskPatches, PretrainRecipe, TwoViews,
                                  at_loss, attention_map, class_subset, copy_modules, few_labels, kd_loss, nt_xent, pretrain,
                                  stage_ends, step_distill, train_few)


@pytest.fixture(scope='module')
def dls():
    return image_dataloaders('fashion_mnist', valid_pct=0.0, seed=0, limit=6000, verbose=False)


def test_few_labels_exact_and_seeded():
    y = torch.arange(10).repeat_interleave(7)
    idx = few_labels(y, 5, seed=3)
    assert torch.bincount(y[idx]).tolist() == [5] * 10 and len(set(idx.tolist())) == 50
    assert torch.equal(idx, few_labels(y, 5, seed=3)) and not torch.equal(idx, few_labels(y, 5, seed=4))
    assert torch.bincount(y[few_labels(y, 7)]).tolist() == [7] * 10  # every example of every class
    with pytest.raises(ValueError, match='holds only 7'): few_labels(y, 8)
    with pytest.raises(ValueError, match='positive int'): few_labels(y, 0)
    with pytest.raises(ValueError, match='positive int'): few_labels(y, 2.5)


def _nt_xent_loops(z1, z2, tau):
    z = torch.cat([z1, z2]); n2 = len(z); out = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        s = [torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / tau for k in range(n2)]
        out.append(torch.logsumexp(torch.stack([s[k] for k in range(n2) if k != i]), 0) - s[j])
    return torch.stack(out).mean()


@pytest.mark.parametrize('n,d,tau', [(1, 2, 0.5), (3, 5, 0.1), (6, 16, 2.0)])
def test_nt_xent_matches_the_formula(n, d, tau):
    torch.manual_seed(n)
    z1, z2 = (torch.randn(n, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    check_against(partial(nt_xent, tau=tau), partial(_nt_xent_loops, tau=tau), z1, z2, eps=1e-10)
    with pytest.raises(ValueError, match='one shape'): nt_xent(z1, z2[:, :1])
    with pytest.raises(ValueError, match='tau must be > 0'): nt_xent(z1, z2, tau=-1)


def _kd_direct(s, t, y, T, alpha):
    pt = torch.exp(t / T) / torch.exp(t / T).sum(-1, keepdim=True)
    ls = s / T - torch.log(torch.exp(s / T).sum(-1, keepdim=True))
    kl = (pt * (torch.log(pt) - ls)).sum(-1).mean()
    lab = y != -100
    ce = -(s - torch.log(torch.exp(s).sum(-1, keepdim=True)))[lab, y[lab]].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize('n,c,T,alpha', [(3, 10, 1.0, 0.5), (8, 4, 2.0, 0.9), (5, 10, 8.0, 0.0), (2, 3, 0.5, 1.0)])
def test_kd_loss_matches_float64_formula(n, c, T, alpha):
    torch.manual_seed(c)
    s = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    t, y = 2 * torch.randn(n, c, dtype=torch.float64), torch.randint(0, c, (n,))
    y[-1] = -100
    check_against(lambda s: kd_loss(s, t, y, T, alpha), lambda s: _kd_direct(s, t, y, T, alpha), s, eps=1e-10)


def test_kd_loss_bad_input():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match='one shape'): kd_loss(s, t[:, :9], y)
    with pytest.raises(ValueError, match='one shape'): kd_loss(s[0], t[0], y)
    for T in (0, -2.0, float('inf')):
        with pytest.raises(ValueError, match='must be a number > 0'): kd_loss(s, t, y, T=T)
    for a in (-0.01, 1.01):
        with pytest.raises(ValueError, match=r'must be in \[0, 1\]'): kd_loss(s, t, y, alpha=a)
    with pytest.raises(ValueError, match='pass labels, or alpha=1'): kd_loss(s, t, None, alpha=0.5)
    assert torch.isclose(kd_loss(s, t, y, alpha=0.), F.cross_entropy(s, y))


def test_freeze_encoder_probe_keeps_weights_and_bn_stats(dls):
    torch.manual_seed(0)
    m = FashionCNN(); before = {k: v.clone() for k, v in m.state_dict().items()}
    sub = TensorLoader(dls.train.x[:100], dls.train.y[:100], 25, shuffle=True)
    Learner(m, (sub, None), progress=False, cbs=FreezeEncoder(6)).fit(2)
    after = m.state_dict()
    frozen = [k for k in after if k.split('.')[0] in {'0', '1', '2', '4', '5'}]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # weights and running statistics alike
    assert not torch.equal(after['8.weight'], before['8.weight'])  # the last layer trained
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match='in \\[0, 1\\]'): FreezeEncoder(3, pct=1.5)


class _Seen(Callback):
    order = 10
    def after_pred(self):
        if self.learn.training: self.xs.append(self.learn.xb.clone())


def test_distill_teacher_sees_the_augmented_batch_and_validation_is_ce(dls):
    torch.manual_seed(0)
    teacher = FashionCNN(CNNConfig(channels=(4, 4, 4), hidden=0)).eval()
    got = []
    teacher.register_forward_hook(lambda m, i, o: got.append(i[0].clone()))
    from bigmodel_nb.data import RandomCropFlip
    tr = TensorLoader(dls.train.x[:64], dls.train.y[:64], 32, shuffle=True, transform=RandomCropFlip(padding=2))
    va = TensorLoader(dls.test.x[:64], dls.test.y[:64], 64)
    stu = FashionCNN(CNNConfig(channels=(4, 4, 4), hidden=0))
    seen = _Seen(); seen.xs = []
    learn = Learner(stu, (tr, va), progress=False, cbs=[Distill(teacher, T=3., alpha=0.7, mixup=0.2), seen])
    learn.fit(1)
    assert len(got) == len(seen.xs) == 2 and all(torch.equal(a, b) for a, b in zip(got, seen.xs))
    assert abs(learn.recorder.log[-1]['valid_loss'] - evaluate(stu, va)['loss']) < 1e-5
    with pytest.raises(ValueError, match='mixup'): Distill(teacher, mixup=-1)


def _at_direct(fs, ft, beta):
    def q(f):
        a = (f * f).sum(1).reshape(len(f), -1) / f.shape[1]
        return a / torch.sqrt((a * a).sum(1, keepdim=True))
    return beta / 2 * sum(((q(s) - q(t)) ** 2).sum() / q(s).numel() for s, t in zip(fs, ft))


@pytest.mark.parametrize('n,shapes,beta', [(4, [(3, 6, 6), (5, 3, 3)], 10.), (2, [(1, 4, 7)], 250.)])
def test_at_loss_matches_float64_formula(n, shapes, beta):
    torch.manual_seed(n)
    ft = [torch.randn(n, c + 2, h, w, dtype=torch.float64) for c, h, w in shapes]
    fs = [torch.randn(n, c, h, w, dtype=torch.float64) for c, h, w in shapes]
    flat = torch.cat([f.flatten() for f in fs]).requires_grad_()
    unflat = lambda v: [p.view_as(f) for p, f in zip(v.split([f.numel() for f in fs]), fs)]
    check_against(lambda v: at_loss([attention_map(f) for f in unflat(v)], [attention_map(f) for f in ft], beta),
                  lambda v: _at_direct(unflat(v), ft, beta), flat, eps=1e-10)


def test_at_loss_bad_input():
    f = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): attention_map(f[0])
    with pytest.raises(ValueError, match='one teacher map per student map'): at_loss([], [])
    with pytest.raises(ValueError, match='same height and width'): at_loss([attention_map(f)], [attention_map(f[:, :, :2])])
    with pytest.raises(ValueError, match='a number >= 0'): Distill(FashionCNN(), attention=float('nan'))


def test_distill_with_attention_transfer_trains_and_removes_its_hooks(dls):
    torch.manual_seed(0)
    teacher = FashionCNN(CNNConfig(channels=(8, 8, 8), hidden=0)).eval()
    stu = FashionCNN(CNNConfig(channels=(4, 4, 4), hidden=0))
    tr = TensorLoader(dls.train.x[:64], dls.train.y[:64], 32, shuffle=True)
    before = [p.clone() for p in stu.parameters()]
    Learner(stu, (tr, None), progress=False, cbs=[Distill(teacher, T=1., alpha=1., attention=10., cache=True)]).fit(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, stu.parameters()))
    assert all(len(m._forward_hooks) == 0 for m in [*stage_ends(stu), *stage_ends(teacher)])
    two = FashionCNN(CNNConfig(channels=(4, 4), convs=(1, 1), hidden=0))
    with pytest.raises(ValueError, match='the student has 2 stages and the teacher 3'):
        Learner(two, (tr, None), progress=False, cbs=[Distill(teacher, attention=1.)]).fit(1)


def test_views_and_masks(dls):
    x = dls.train.x[:16]
    v = TwoViews(dls.mean, dls.std, seed=1)(x)
    assert v.shape == (32, 1, 28, 28) and torch.equal(v, TwoViews(dls.mean, dls.std, seed=1)(x))
    assert not torch.equal(v[:16], v[16:])
    mp = MaskPatches(patch=7, ratio=0.5, seed=0); xm = mp(x)
    assert (xm[mp.mask] == 0).all() and torch.equal(xm[~mp.mask], x[~mp.mask])


def test_pretrain_is_a_fashioncnn_and_transfers(dls, tmp_path):
    net, info = pretrain(dls, PretrainRecipe(epochs=1, limit=512, batch_size=128), progress=False)
    assert isinstance(net, FashionCNN) and info['steps'] == 4 and info['images'] == 512
    mae, info = pretrain(dls, PretrainRecipe(objective='mae', epochs=1, limit=256, batch_size=128), progress=False)
    assert mae[-1].out_features == 784 and info['steps'] == 2
    m = copy_modules(FashionCNN(), net, 3)
    assert torch.equal(m[0][0].weight, net[0][0].weight) and not torch.equal(m[-1].weight[:1], net[-1].weight[:1, :256])
    with pytest.raises(ValueError, match="'simclr' or 'mae'"): PretrainRecipe(objective='byol')


def test_train_few_and_class_subset(dls):
    idx = few_labels(dls.train.y, 5)
    model, row = train_few(dls, idx, FineTuneRecipe(steps=4, batch_size=25))
    assert row['steps'] == 4 and row['train_images'] == 50 and row['test_images'] == len(dls.test.y)
    sub = class_subset(dls, range(5, 10))
    assert sorted(sub.train.y.unique().tolist()) == [0, 1, 2, 3, 4] and sub.classes == dls.classes[5:]
    with pytest.raises(ValueError, match='pass `pretrained`'): train_few(dls, idx, FineTuneRecipe(freeze='probe'))


def test_step_distill_quick(dls, tmp_path):
    teacher = get_trained_cnn(quick=True, verbose=False)
    res = step_distill(teacher, dls, tmp_path, quick=True)
    assert res['student_images'] == 3000 and res['student_epochs'] == 1
    assert res['student_params'] == count_parameters(FashionCNN(STUDENT)) and res['param_ratio'] <= 0.1
    assert res['teacher_ms_b1'] > 0 and res['student_ms_b1'] > 0 and 0 < res['student_acc'] <= 1
    cfg = json.loads((tmp_path / 'student_package' / 'config.json').read_text())
    assert cfg['architecture']['config']['channels'] == list(STUDENT.channels)
