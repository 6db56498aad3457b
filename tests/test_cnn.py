"Tests of `bigmodel_nb.cnn` beyond the chapter: from-scratch conv/pool vs torch on random shapes (outputs and gradients), the output-size rule, the seed's shapes, bad inputs, the CIFAR-format path, the configs, the opt-in time budget, flip TTA, save/load of the trained CNN."
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from bigmodel_nb import cnn
from bigmodel_nb.cnn import (CNNConfig, CNNRecipe, Conv2d, FashionCNN, FlipTTA, LeNet, MaxPool2d, avg_pool2d, conv2d,
                             conv_out_size, get_trained_cnn, im2col, load_cnn, max_pool2d, save_cnn, train_fashion_cnn)
from bigmodel_nb.concepts import Net, check_against
from bigmodel_nb.data import image_dataloaders, write_cifar_batches
from bigmodel_nb.learner import accuracy_on

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    "Keep every test out of the real user cache."
    monkeypatch.setenv('BIGMODEL_NB_CACHE', str(tmp_path/'cache'))
    monkeypatch.delenv('BIGMODEL_NB_CIFAR10', raising=False)


# --- from-scratch conv and pooling vs torch, on random shapes -------------------------------------

@st.composite
def conv_case(draw):
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h, w = draw(st.integers(max(1, kh - 2*ph), 10)), draw(st.integers(max(1, kw - 2*pw), 10))
    return (n, c, h, w), (o, c, kh, kw), (sh, sw), (ph, pw), draw(st.booleans())


def _rnd(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@settings(max_examples=40, deadline=None)
@given(conv_case(), st.integers(0, 2**16))
def test_conv2d_matches_torch(case, seed):
    xs, ws, s, p, with_bias = case
    x, w = _rnd(xs, seed), _rnd(ws, seed + 1)
    b = _rnd((ws[0],), seed + 2) if with_bias else None
    args = (x, w, b) if with_bias else (x, w)
    y = check_against(lambda *a: conv2d(*a, stride=s, padding=p) if with_bias else conv2d(a[0], a[1], None, s, p),
                      lambda *a: F.conv2d(*a, stride=s, padding=p) if with_bias else F.conv2d(a[0], a[1], None, s, p), *args)
    assert y.shape[-2:] == (conv_out_size(xs[2], ws[2], s[0], p[0]), conv_out_size(xs[3], ws[3], s[1], p[1]))


@settings(max_examples=30, deadline=None)
@given(conv_case(), st.integers(0, 2**16))
def test_im2col_matches_unfold(case, seed):
    xs, ws, s, p, _ = case
    x = _rnd(xs, seed)
    assert torch.allclose(im2col(x, ws[2:], s, p), F.unfold(x, ws[2:], padding=p, stride=s))


@st.composite
def pool_case(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h, w = draw(st.integers(kh, 11)), draw(st.integers(kw, 11))
    return (n, c, h, w), (kh, kw), stride, (ph, pw)


@settings(max_examples=40, deadline=None)
@given(pool_case(), st.integers(0, 2**16))
def test_pooling_matches_torch(case, seed):
    xs, k, s, p = case
    x = _rnd(xs, seed)
    check_against(lambda x: max_pool2d(x, k, s, p), nn.MaxPool2d(k, s, p), x)
    check_against(lambda x: avg_pool2d(x, k, s, p), nn.AvgPool2d(k, s, p), x)


@pytest.mark.parametrize('n,k,s,p', [(32, 5, 1, 0), (28, 2, 2, 0), (28, 3, 1, 1), (7, 3, 2, 1), (10, 4, 3, 2), (5, 5, 1, 0)])
def test_output_size_rule(n, k, s, p):
    assert conv_out_size(n, k, s, p) == nn.Conv2d(1, 1, k, s, p)(torch.zeros(1, 1, n, n)).shape[-1]
    if p <= k // 2: assert conv_out_size(n, k, s, p) == nn.MaxPool2d(k, s, p)(torch.zeros(1, 1, n, n)).shape[-1]


def test_scratch_layers_match_torch_layers():
    torch.manual_seed(0)
    ref, ours = LeNet(1, 28), LeNet(1, 28, conv=Conv2d, pool=MaxPool2d)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


# --- the seed's network and LeNet ------------------------------------------------------------------

def test_seed_net_shapes():
    net = Net()
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert sum(p.numel() for p in net.parameters()) == 62006
    assert net.fc1.in_features == 16 * 5 * 5


def test_lenet_is_the_seed_net_for_cifar_and_fits_28x28():
    net, lenet = Net(), LeNet(3, 32)
    lenet.load_state_dict(net.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(lenet(x), net(x))
    m = LeNet(1, 28)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10) and m.fc1.in_features == 16 * 4 * 4


@pytest.mark.parametrize('model,x,msg', [
    (LeNet(1, 28), torch.randn(2, 3, 28, 28), 'expected images of shape (N, 1, 28, 28)'),
    (LeNet(1, 28), torch.randn(2, 1, 32, 32), 'expected images of shape (N, 1, 28, 28)'),
    (LeNet(1, 28), torch.randn(1, 28, 28), 'add a batch dimension'),
    (FashionCNN(), torch.randn(2, 3, 32, 32), 'build the model with c_in=3, size=32'),
])
def test_bad_input_has_a_clear_error(model, x, msg):
    with pytest.raises(ValueError, match=None) as e: model(x)
    assert msg in str(e.value)


def test_bad_conv_arguments():
    with pytest.raises(ValueError, match='input has 2 channels but the weight expects 3'): conv2d(torch.randn(1, 2, 8, 8), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match='expected a 4-D batch'): conv2d(torch.randn(2, 8, 8), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match='does not fit'): conv2d(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 3, 3))
    with pytest.raises(TypeError, match='expected a torch.Tensor'): max_pool2d([[1.0]], 2)
    with pytest.raises(ValueError, match='at most half the window'): avg_pool2d(torch.randn(1, 1, 8, 8), 2, padding=2)
    with pytest.raises(ValueError, match='too small'): LeNet(1, 12)


# --- the CIFAR-10 path on a fixture in the CIFAR python-pickle format ------------------------------

def test_seed_cifar10_on_fixture(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)
    folder = write_cifar_batches(tmp_path/'cifar-10-batches-py', {'data_batch_1': batch(40), 'data_batch_2': batch(40), 'test_batch': batch(20)})
    learn, row = cnn.seed_cifar10(epochs=1, path=folder, progress=False)
    assert isinstance(learn.model, Net) and row['batch_size'] == 4 and row['train_images'] == 80 and row['threads'] == 1
    assert len(learn.recorder.losses) == 20 and row['test_images'] == 20
    # the reported accuracy is the trained model's, on the 20 test images normalised with the training statistics
    dls = image_dataloaders('cifar10', batch_size=4, valid_pct=0.0, path=folder, verbose=False)
    with torch.no_grad(): preds = learn.model.eval()(dls.test.x).argmax(-1)
    assert row['test_acc'] == int((preds == dls.test.y).sum()) / 20
    torch.manual_seed(0)
    start = Net().state_dict()   # seed_cifar10 seeds torch with 0 before building its Net: the same starting weights
    assert all(not torch.equal(start[k], v) for k, v in learn.model.state_dict().items())   # 20 SGD steps moved every tensor


# --- the strong CNN: config, save/load, get_trained_cnn -----------------------------------------------

def test_cnn_config_and_recipe():
    assert sum(p.numel() for p in FashionCNN().parameters()) == 390_890
    assert CNNConfig(**json.loads(json.dumps(asdict(CNNConfig())))) == CNNConfig()   # survives JSON (tuples come back as lists)
    assert CNNRecipe(**json.loads(json.dumps(asdict(CNNRecipe())))) == CNNRecipe()
    assert CNNRecipe().time_budget is None and CNNRecipe().epochs == 7          # fixed epochs unless a budget is asked for
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr_max'"): CNNRecipe(lr_max=1)
    with pytest.raises(ValueError, match='same length'): CNNConfig(channels=[8, 16], convs=[1])
    with pytest.raises(TypeError, match='takes a CNNConfig, got dict'): FashionCNN({'channels': [4, 8]})
    small = FashionCNN(CNNConfig(channels=[4, 8], convs=[1, 1]))
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_flip_tta_is_mirror_invariant():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 5, 4))
    x = torch.randn(8, 2, 3, 5)
    with torch.no_grad():
        p = FlipTTA(m)(x)
        assert torch.allclose(p.sum(-1), torch.ones(8)) and torch.allclose(p, FlipTTA(m)(x.flip(-1)), atol=1e-6)
        assert not torch.allclose(p, FlipTTA(m)(x.flip(-2)), atol=1e-3)
        assert torch.allclose(p, (m(x).softmax(-1) + m(x.flip(-1)).softmax(-1)) / 2)


def test_save_load_roundtrip(tmp_path):
    m = FashionCNN(CNNConfig(channels=[4, 8], convs=[1, 2])).eval()
    path = save_cnn(m, tmp_path/'m.safetensors', info={'test_acc': 0.5})
    assert path.with_suffix('.json').is_file()
    m2 = load_cnn(path)
    assert m2.cfg == m.cfg and m2.info['test_acc'] == 0.5 and not m2.training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(): assert torch.allclose(m2(x), m(x))
    path.with_suffix('.json').unlink()  # the config is also in the file's metadata
    assert load_cnn(path).cfg == m.cfg
    with pytest.raises(FileNotFoundError, match='get_trained_cnn'): load_cnn(tmp_path/'missing.safetensors')


def test_get_trained_cnn_loads_a_matching_model_and_retrains_otherwise(tmp_path, monkeypatch):
    calls = []
    def fake_train(cfg, recipe, limit=None, progress=True):  # stands in for minutes of training
        calls.append((cfg, recipe, limit)); m = FashionCNN(cfg).eval()
        return m, {'test_acc': 0.9, 'train_s': 1.0}
    monkeypatch.setattr(cnn, 'train_fashion_cnn', fake_train)
    small = CNNConfig(channels=[4, 8], convs=[1, 1])
    path = tmp_path/'models'/'fashion_cnn.safetensors'
    m1 = get_trained_cnn(path, cfg=small, verbose=False)
    assert len(calls) == 1 and path.is_file() and m1.cfg == small and calls[0][1:] == (CNNRecipe(), None)
    m2 = get_trained_cnn(path, cfg=small, verbose=False)  # loaded, not retrained
    assert len(calls) == 1
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(): assert torch.allclose(m1(x), m2(x))
    get_trained_cnn(path, cfg=small, recipe=CNNRecipe(epochs=2), verbose=False)  # another recipe: retrained
    assert len(calls) == 2
    get_trained_cnn(path, cfg=CNNConfig(channels=[4, 8], convs=[1, 2]), recipe=CNNRecipe(epochs=2), verbose=False)  # another architecture
    assert len(calls) == 3
    get_trained_cnn(tmp_path/'q.safetensors', quick=True, cfg=small, verbose=False)   # quick: 1 epoch on 6,000 images
    assert calls[-1][1:] == (CNNRecipe(epochs=1), 6000)
    assert cnn.cnn_path().parent == tmp_path/'cache'/'models'  # the default lives in the user cache


def _digits_cnn_setup():
    dls = image_dataloaders('digits', batch_size=64, valid_pct=0.0, verbose=False)
    return dls, CNNConfig(size=8, channels=(8, 16), convs=(1, 1), hidden=32)


def test_recipe_time_budget_is_opt_in():
    dls, cfg = _digits_cnn_setup()
    model, row = train_fashion_cnn(cfg, CNNRecipe(epochs=10_000, batch_size=64, time_budget=1.0), dls=dls, progress=False)
    assert row['epochs'] < 10_000 and row['train_s'] < 15       # the clock stopped it (1 s budget; slack for a busy machine)
    assert row['threads'] == torch.get_num_threads() == 1       # threads=None leaves the runtime's setting
    m1, r1 = train_fashion_cnn(cfg, CNNRecipe(epochs=2, batch_size=64), dls=dls, progress=False)
    m2, r2 = train_fashion_cnn(cfg, CNNRecipe(epochs=2, batch_size=64), dls=dls, progress=False)
    assert r1['epochs'] == 2 and r1['test_acc'] == r2['test_acc']   # no budget: fixed epochs, the same model again
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    assert r1['test_acc'] == accuracy_on(m1, dls.test) and r1['test_acc'] > 0.5   # 2 epochs on the digits learn something
