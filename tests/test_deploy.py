"Tests of `bigmodel_nb.deploy`: dynamic-batch export and parity, the predictor's preprocessing and input checks, the model package."
import json, shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bigmodel_nb.cnn import FashionCNN
from bigmodel_nb.data import load_fashion_mnist, normalize
from bigmodel_nb.compress import fold_pooled_batchnorm
from bigmodel_nb.deploy import (PACKAGE_FILES, PACKAGE_FORMAT, PACKAGE_INT8, PackageError, Predictor, architecture, compare_latency,
                                export_onnx, latency_markdown, latency_stats, load_package, load_package_weights,
                                onnx_signature, ort_session, parity_check, save_package, serving_graph, verify_package,
                                with_pixel_input)

torch.set_num_threads(1)

LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def small_cnn():
    "A small FashionCNN (batch norm included), random weights with non-trivial batch-norm statistics."
    torch.manual_seed(0)
    m = FashionCNN({'channels': [8, 16], 'convs': [1, 1]})
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5); mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope='module')
def fashion():
    "Raw uint8 test images, their labels, and the normalization of the training set."
    ds = load_fashion_mnist(verbose=False)
    xf = ds.x_train[:5000].float().div(255)
    mean, std = xf.mean().reshape(1), xf.std().reshape(1)
    return ds.x_test[:256], ds.y_test[:256], mean, std


@pytest.fixture(scope='module')
def config(fashion):
    _, _, mean, std = fashion
    return {'name': 'test-cnn', 'architecture': architecture(small_cnn()),
            'preprocessing': {'input_shape': [1, 28, 28], 'pixel_scale': 255.0, 'mean': mean.tolist(), 'std': std.tolist()},
            'labels': LABELS, 'input_name': 'input', 'output_name': 'logits'}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    model = small_cnn()
    path = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path_factory.mktemp('onnx') / 'm.onnx')
    return model, path


@pytest.fixture(scope='module')
def predictor(exported, config):
    return Predictor(exported[1], config, threads=1)


@pytest.fixture(scope='module')
def package(tmp_path_factory, exported, config, fashion):
    model = exported[0]
    x, y, mean, std = fashion
    folder = tmp_path_factory.mktemp('pkg') / 'test-cnn'
    save_package(model, folder, normalize(x[:16], mean, std), config, metrics={'test accuracy': 0.1},
                 card={'data': 'Fashion-MNIST', 'intended_use': 'tests', 'limits': 'random weights'})
    return folder


# export and parity

def test_export_signature_dynamic_batch(exported):
    model, path = exported
    sig = onnx_signature(path)
    assert sig['inputs'] == {'input': {'dtype': 'float32', 'shape': ['batch', 1, 28, 28]}}
    assert sig['outputs'] == {'logits': {'dtype': 'float32', 'shape': ['batch', 10]}}
    assert not model.training  # eval mode restored (it was eval)


@pytest.mark.parametrize('bs', [1, 7, 64])
def test_export_matches_torch(exported, bs):
    model, path = exported
    sess = ort_session(path, threads=1)
    x = torch.randn(bs, 1, 28, 28)
    with torch.no_grad(): ref = model(x).numpy()
    got = sess.run(None, {'input': x.numpy()})[0]
    assert got.shape == (bs, 10)
    assert np.abs(got - ref).max() < 1e-4


def test_export_folds_pooled_batchnorm(exported, fashion, tmp_path):
    "Conv → MaxPool → BatchNorm → Relu becomes Conv → Relu → MaxPool; a block with a negative scale stays; outputs stay torch's."
    model, path = exported
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert 'BatchNormalization' not in ops and ops[:3] == ['Conv', 'Relu', 'MaxPool']
    x, _, mean, std = fashion
    flipped = small_cnn()
    with torch.no_grad(): flipped[1][2].weight[3] *= -1  # one decreasing channel in the second block
    plain = export_onnx(flipped, torch.randn(1, 1, 28, 28), tmp_path / 'plain.onnx', fold_bn=False)
    folded, n = fold_pooled_batchnorm(onnx.load(plain))
    assert n == 1 and [o.op_type for o in folded.graph.node].count('BatchNormalization') == 1
    onnx.checker.check_model(folded, full_check=True)
    xn = normalize(x, mean, std)
    with torch.no_grad(): ref = flipped(xn).numpy()
    np.testing.assert_allclose(ort_session(folded.SerializeToString(), 1).run(None, {'input': xn.numpy()})[0], ref, atol=1e-4)
    assert fold_pooled_batchnorm(folded)[1] == 0  # nothing left to fold


def test_export_restores_training_mode(tmp_path):
    model = small_cnn().train()
    export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / 'm.onnx')
    assert model.training
    assert [p.name for p in tmp_path.iterdir()] == ['m.onnx']  # no temporary file left


def test_parity_check_random_and_real(exported, fashion):
    model, path = exported
    x, _, mean, std = fashion
    r = parity_check(model, path, [torch.randn(bs, 1, 28, 28) for bs in (1, 7, 64)])
    assert r['passed'] and r['batches'] == [1, 7, 64] and r['n'] == 72 and r['max_abs_diff'] < 1e-4
    real = parity_check(model, path, normalize(x, mean, std))
    assert real['passed'] and real['argmax_agreement'] == 1.0
    json.dumps(real)  # a plain dict, ready for a report


# predictor

def test_preprocess_equals_data_module(predictor, fashion):
    x, _, mean, std = fashion
    ref = normalize(x, mean, std).numpy()
    np.testing.assert_allclose(predictor.preprocess(x.numpy()), ref, atol=1e-5)
    np.testing.assert_allclose(predictor.preprocess(x[:, 0].numpy()), ref, atol=1e-5)  # (N, H, W)
    np.testing.assert_allclose(predictor.preprocess(x), ref, atol=1e-5)  # a torch tensor
    np.testing.assert_allclose(predictor.preprocess(x.numpy() / np.float32(255)), ref, atol=1e-5)  # floats 0..1
    np.testing.assert_array_equal(predictor.preprocess(ref, normalized=True), ref)
    assert predictor.preprocess(x.numpy()).dtype == np.float32


def test_predict_matches_torch(predictor, exported, fashion):
    model, _ = exported
    x, _, mean, std = fashion
    p = predictor(x.numpy())
    with torch.no_grad(): logits = model(normalize(x, mean, std))
    np.testing.assert_array_equal(p.labels, logits.argmax(1).numpy())
    np.testing.assert_allclose(p.probs, torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert p.names == [LABELS[i] for i in p.labels]
    np.testing.assert_allclose(predictor.logits(x.numpy()), logits.numpy(), atol=1e-4)
    np.testing.assert_array_equal(predictor(x.numpy(), batch_size=100).labels, p.labels)  # chunked


@pytest.mark.parametrize('x,what', [
    (np.zeros((2, 3, 32, 32), np.uint8), 'wrong shape (2, 3, 32, 32)'),
    (np.zeros((2, 28), np.uint8), 'wrong shape (2, 28)'),
    (np.zeros((2, 28, 28), np.int64), 'wrong dtype int64'),
    (np.zeros((2, 28, 28), bool), 'wrong dtype bool'),
    (np.full((1, 28, 28), np.nan, np.float32), 'NaN'),
    (np.zeros((0, 28, 28), np.uint8), 'empty batch'),
    (np.full((1, 28, 28), 255.0, np.float32), 'must lie in 0..1'),
    ([[0] * 28] * 28, 'got list'),
])
def test_predictor_bad_input(predictor, x, what):
    with pytest.raises(ValueError) as e: predictor(x)
    msg = str(e.value)
    assert what in msg and 'expected' in msg
    assert '(N, 1, 28, 28)' in msg or 'normalized' in msg


def test_predictor_bad_normalized_input(predictor):
    x = np.zeros((1, 1, 28, 28), np.float32); x[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match='NaN or infinite'): predictor(x, normalized=True)
    with pytest.raises(ValueError, match='normalized=True'): predictor(np.zeros((1, 28, 28), np.uint8), normalized=True)


def test_serving_graph_three_channels(tmp_path):
    "Per-channel normalization in the graph, for 3-channel images: a valid ONNX file whose outputs match torch on normalized input."
    torch.manual_seed(0)
    model = FashionCNN({'c_in': 3, 'size': 16, 'channels': [8, 16], 'convs': [1, 1], 'hidden': 0}).eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / 'rgb.onnx')
    pre = {'input_shape': [3, 16, 16], 'pixel_scale': 255.0, 'mean': [0.49, 0.48, 0.45], 'std': [0.25, 0.24, 0.26]}
    serving = serving_graph(onnx.load(path), pre)
    onnx.checker.check_model(serving, full_check=True)
    assert [i.name for i in serving.graph.input] == ['pixels'] and [o.name for o in serving.graph.output] == ['logits', 'probabilities', 'labels']
    p = Predictor(path, {'preprocessing': pre, 'labels': list('abcdefghij')}, threads=1)
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)  # the arithmetic of every pixel value
    mean, std = torch.tensor(pre['mean']).view(1, 3, 1, 1), torch.tensor(pre['std']).view(1, 3, 1, 1)
    ref_in = (torch.from_numpy(x).float() / 255 - mean) / std
    np.testing.assert_allclose(p.preprocess(x), ref_in.numpy(), atol=1e-5)
    with torch.no_grad(): ref = model(ref_in)
    out = p(x)
    np.testing.assert_allclose(p.logits(x), ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.probs, torch.softmax(ref, 1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(out.labels, ref.argmax(1).numpy())
    plain = ort.InferenceSession(serving.SerializeToString(), providers=['CPUExecutionProvider'])  # no library involved
    np.testing.assert_array_equal(plain.run(['labels'], {'pixels': x})[0], out.labels)
    # the graph's own normalized tensor is `preprocess`, bit for bit
    front = with_pixel_input(onnx.load(path), pre)
    front.graph.output.append(onnx.helper.make_tensor_value_info(p.in_name, onnx.TensorProto.FLOAT, None))
    np.testing.assert_array_equal(ort_session(front.SerializeToString(), 1).run([p.in_name], {'pixels': x})[0], p.preprocess(x))


def test_predictor_float_session_on_demand(exported, config, fashion):
    "uint8 pixels never build the float session; floats do, once, and give the same answer."
    x = fashion[0].numpy()
    p = Predictor(exported[1], config, threads=1)
    labels = p(x).labels
    np.testing.assert_array_equal(p(x[::2]).labels, labels[::2])  # a strided view, as it is
    assert 'float_session' not in p.__dict__
    np.testing.assert_array_equal(p(x / np.float32(255)).labels, labels)
    assert 'float_session' in p.__dict__


def test_predictor_bad_config(exported, config):
    bad = {**config, 'preprocessing': {**config['preprocessing'], 'mean': [0.1, 0.2, 0.3]}}
    with pytest.raises(ValueError, match='one per channel'): Predictor(exported[1], bad)


# latency utilities

def test_latency_utilities():
    rows = compare_latency({'a': lambda bs: (lambda: sum(range(bs))), 'b': lambda bs: (lambda: None)},
                           batch_sizes=(1, 8), repeats=20, warmup=2, rounds=4)
    assert [(r['runner'], r['batch']) for r in rows] == [('a', 1), ('b', 1), ('a', 8), ('b', 8)]
    assert all(len(r['times']) == 20 and r['median_us'] <= r['p99_us'] for r in rows)
    assert rows[0]['vs_first'] == 1.0
    assert latency_markdown(rows).count('\n') == 5
    assert latency_stats([1e-6, 2e-6, 3e-6])['median_us'] == pytest.approx(2.0)


# package

def test_package_round_trip(package, exported, fashion):
    model, _ = exported
    x, _, mean, std = fashion
    assert sorted(p.name for p in package.iterdir()) == sorted([*PACKAGE_FILES, 'manifest.json'])
    man = verify_package(package)
    assert man['format'] == PACKAGE_FORMAT and set(man['files']) == set(PACKAGE_FILES)
    p = load_package(package, threads=1)
    with torch.no_grad(): ref = model(normalize(x, mean, std)).argmax(1).numpy()
    np.testing.assert_array_equal(p(x.numpy()).labels, ref)
    cfg = p.config
    assert cfg['labels'] == LABELS and cfg['parity']['passed'] and cfg['metrics'] == {'test accuracy': 0.1}
    card = (package / 'README.md').read_text()
    for section in ('## Data', '## Metrics', '## Intended use', '## Limits', 'Fashion-MNIST'): assert section in card
    rebuilt = load_package_weights(package)  # rebuilt from the config's architecture
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()): assert torch.equal(a, b), k


def test_package_refuses_overwrite(package, exported, config):
    with pytest.raises(FileExistsError, match='overwrite=True'):
        save_package(exported[0], package, torch.randn(2, 1, 28, 28), config)


def _copy(package, tmp_path):
    d = tmp_path / 'pkg'; shutil.copytree(package, d); return d


def test_package_tampered_file(package, tmp_path):
    d = _copy(package, tmp_path)
    b = bytearray((d / 'model.onnx').read_bytes()); b[-100] ^= 1; (d / 'model.onnx').write_bytes(bytes(b))
    with pytest.raises(PackageError, match='model.onnx fails its checksum'): load_package(d)


def test_package_edited_config(package, tmp_path):
    d = _copy(package, tmp_path)
    (d / 'config.json').write_text((d / 'config.json').read_text().replace('Coat', 'Jacket'))
    with pytest.raises(PackageError, match='config.json fails its checksum'): load_package(d)
    with pytest.raises(PackageError, match='config.json'): load_package_weights(d, small_cnn())


def test_package_missing_file(package, tmp_path):
    d = _copy(package, tmp_path); (d / 'weights.safetensors').unlink()
    with pytest.raises(PackageError, match='weights.safetensors is missing'): load_package(d)


def test_package_extra_file(package, tmp_path):
    d = _copy(package, tmp_path); (d / 'evil.py').write_text('import os')
    with pytest.raises(PackageError, match=r"not in the manifest: \['evil.py'\]"): load_package(d)


@pytest.mark.parametrize('manifest,what', [
    (None, 'manifest.json is missing'),
    ('{"files": ', 'malformed'),
    ('[]', 'malformed'),
    (json.dumps({'format': 'other/1', 'files': {}}), 'malformed'),
    (json.dumps({'format': PACKAGE_FORMAT, 'files': {}}), 'does not list'),
    (json.dumps({'format': PACKAGE_FORMAT, 'files': {'../x': {'sha256': '0' * 64, 'bytes': 1}}}), 'malformed'),
])
def test_package_bad_manifest(package, tmp_path, manifest, what):
    d = _copy(package, tmp_path)
    if manifest is None: (d / 'manifest.json').unlink()
    else: (d / 'manifest.json').write_text(manifest)
    with pytest.raises(PackageError, match=what) as e: load_package(d)
    assert isinstance(e.value, ValueError) and 'save_package' in str(e.value)


def test_package_missing_folder(tmp_path):
    with pytest.raises(PackageError, match='no package folder'): load_package(tmp_path / 'nowhere')


def test_package_int8(package, exported, config, fashion, tmp_path):
    "With calibration batches the package also ships `model.int8.onnx`, checksummed and served with `int8=True`."
    model, _ = exported
    x, _, mean, std = fashion
    xn = normalize(x, mean, std)
    folder = save_package(model, tmp_path / 'int8', xn[:16], config, calib=list(xn[16:].split(32)), n_calib=4)
    man = verify_package(folder)
    assert set(man['files']) == {*PACKAGE_FILES, PACKAGE_INT8}
    inits = onnx.load(str(folder / PACKAGE_INT8)).graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in inits)  # conv weights stored as int8
    p8 = load_package(folder, threads=1, int8=True)
    assert p8.config['int8']['calibration_batches'] == 4 and p8.config['int8']['checked_on'] == 16
    with torch.no_grad(): ref = model(xn).argmax(1).numpy()
    assert (p8(x.numpy()).labels == ref).mean() >= 0.9  # INT8 rounding may flip a near tie, not the bulk
    assert 'INT8 (model.int8.onnx) vs torch' in (folder / 'README.md').read_text()
    flip = bytearray((folder / PACKAGE_INT8).read_bytes()); flip[-50] ^= 1; (folder / PACKAGE_INT8).write_bytes(bytes(flip))
    with pytest.raises(PackageError, match='model.int8.onnx fails its checksum'): load_package(folder, int8=True)
    with pytest.raises(PackageError, match='no model.int8.onnx'): load_package(package, int8=True)
