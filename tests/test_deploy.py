"Tests of `bigmodel_nb.deploy`: dynamic-batch export and parity, the predictors' preprocessing and input checks, model packages of both kinds."
import json, shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bigmodel_nb.cnn import CNNConfig, FashionCNN
from bigmodel_nb.concepts import TransformerConfig, TransformerLM
from bigmodel_nb.data import CharTokenizer, channel_stats, load_fashion_mnist, normalize
from bigmodel_nb.compress import fold_pooled_batchnorm
from bigmodel_nb.deploy import (PACKAGE_FILES, PACKAGE_FORMAT, PACKAGE_INT8, PACKAGE_KINDS, PackageError, Predictor, TokenPredictor,
                                compare_latency, export_onnx, export_token_model, image_config, latency_table, load_package,
                                load_package_weights, onnx_signature, ort_session, parity_check, save_package, serving_graph,
                                token_config, tokenizer_from_spec, tokenizer_spec, verify_package, with_pixel_input,
                                DecoderWithPast, KVBatch, decoder_parity, decoder_parts)
from bigmodel_nb.attention import GPT

torch.set_num_threads(1)

LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def small_cnn():
    "A small FashionCNN (batch norm included), random weights with non-trivial batch-norm statistics."
    torch.manual_seed(0)
    m = FashionCNN(CNNConfig(channels=(8, 16), convs=(1, 1)))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5); mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope='module')
def fashion():
    "Raw uint8 test images, their labels, and the normalization of (part of) the training set."
    ds = load_fashion_mnist(verbose=False)
    mean, std = channel_stats(ds.x_train[:5000])
    return ds.x_test[:256], ds.y_test[:256], mean, std


@pytest.fixture(scope='module')
def config(fashion):
    _, _, mean, std = fashion
    return image_config(name='test-cnn', mean=mean, std=std, labels=LABELS, input_shape=(1, 28, 28))


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
    model = FashionCNN(CNNConfig(c_in=3, size=16, channels=(8, 16), convs=(1, 1), hidden=0)).eval()
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
    "Rows in seconds from the interleaved rounds; the faster contender is faster; the table shows the unit in its header."
    rows = compare_latency({'a': lambda bs: (lambda: sum(range(2000 * bs))), 'b': lambda bs: (lambda: None)},
                           batch_sizes=(1, 8), repeats=20, warmup=2, rounds=4, rest=0)
    assert [(r['runner'], r['batch']) for r in rows] == [('a', 1), ('b', 1), ('a', 8), ('b', 8)]
    assert all(len(r['times']) == 20 for r in rows)
    assert rows[0]['vs_first'] == 1.0 and rows[1]['vs_first'] < 0.5  # doing nothing beats summing 2,000 numbers
    assert rows[2]['median'] > rows[0]['median'] and rows[2]['per_image'] == pytest.approx(rows[2]['median'] / 8)
    assert 1e-6 < rows[0]['median'] < 1.0  # seconds
    table = latency_table(rows)
    assert table.count('\n') == 5 and '| median (µs) |' in table and '| median / a |' in table
    assert f"{rows[0]['median'] * 1e3:,.1f}" in latency_table(rows, 'ms')
    with pytest.raises(ValueError, match="'µs' or 'ms'"): latency_table(rows, 's')


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
    assert cfg['kind'] == man['kind'] == 'image_classifier' and cfg['architecture']['name'] == 'FashionCNN'
    assert (p.folder, p.manifest, p.card) == (package, man, card)  # the predictor knows its package
    rebuilt = load_package_weights(package)  # rebuilt from the config's architecture, by the registry
    assert type(rebuilt) is FashionCNN and rebuilt.cfg == model.cfg
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()): assert torch.equal(a, b), k


def test_package_unregistered_model(tmp_path, config):
    "A model class nobody registered cannot be packaged (its weights could not be rebuilt): refused before any work."
    with pytest.raises(TypeError, match='not a registered architecture'):
        save_package(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), tmp_path / 'p', torch.randn(2, 1, 28, 28), config)
    assert list(tmp_path.iterdir()) == []


def test_package_failed_overwrite_keeps_old(package, exported, config, fashion, tmp_path):
    "A save that fails half-way (here: parity) leaves the old package whole and no temporary folder behind."
    d = _copy(package, tmp_path)
    before = verify_package(d)
    x, _, mean, std = fashion
    with pytest.raises(ValueError, match='does not match torch'):
        save_package(exported[0], d, normalize(x[:4], mean, std), config, overwrite=True, atol=-1.0)
    assert verify_package(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ['pkg']


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
    (json.dumps({'format': PACKAGE_FORMAT, 'kind': 'image_classifier', 'files': {}}), 'does not list'),
    (json.dumps({'format': PACKAGE_FORMAT, 'kind': 'image_classifier', 'files': {'../x': {'sha256': '0' * 64, 'bytes': 1}}}), 'malformed'),
    (json.dumps({'format': PACKAGE_FORMAT, 'kind': 'sound_model', 'files': {}}), "kind 'sound_model'"),
    (json.dumps({'format': True, 'files': {}}), 'malformed'),
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


def test_package_newer_format(package, tmp_path):
    d = _copy(package, tmp_path)
    man = json.loads((d / 'manifest.json').read_text()); man['format'] = PACKAGE_FORMAT + 1
    (d / 'manifest.json').write_text(json.dumps(man))
    for f in (load_package, verify_package, load_package_weights):
        with pytest.raises(PackageError, match=rf'written by a newer bigmodel_nb \(format {PACKAGE_FORMAT + 1}.*pip install -U bigmodel_nb'): f(d)


def test_package_older_format(package, tmp_path):
    d = _copy(package, tmp_path)
    man = json.loads((d / 'manifest.json').read_text()); man['format'] = 'bigmodel_nb.package/1'
    (d / 'manifest.json').write_text(json.dumps(man))
    with pytest.raises(PackageError, match='written by an older bigmodel_nb.*save_package'): load_package(d)


# token models

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows"


@pytest.fixture(scope='module')
def tiny_lm():
    "A small, untrained TransformerLM (registered in concepts), its tokenizer, and windows of real token ids."
    torch.manual_seed(0)
    tok = CharTokenizer(TEXT)
    lm = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, n_ctx=32, d_model=32, n_layers=2, n_heads=4)).eval()
    ids = torch.stack([tok.encode(TEXT[i:i + 32]) for i in range(0, 60, 10)])  # (6, 32)
    return lm, tok, ids


@pytest.fixture(scope='module')
def token_package(tmp_path_factory, tiny_lm):
    lm, tok, ids = tiny_lm
    folder = tmp_path_factory.mktemp('tokpkg') / 'tiny-lm'
    save_package(lm, folder, ids[:2, :8], token_config(tok, max_sequence=32, name='tiny-lm'), card={'data': 'one sentence'})
    return folder


def test_token_config_and_tokenizer(tiny_lm):
    _, tok, _ = tiny_lm
    cfg = token_config(tok, max_sequence=32)
    assert cfg['kind'] == 'token_model' and cfg['input'] == {'name': 'tokens', 'dtype': 'int64', 'shape': ['batch', 'sequence'],
                                                             'max_sequence': 32}
    back = tokenizer_from_spec(json.loads(json.dumps(tokenizer_spec(tok))))
    assert back.vocab == tok.vocab and back.encode(TEXT).tolist() == tok.encode(TEXT).tolist()
    with pytest.raises(ValueError, match="unknown tokenizer type 'bpe'"): tokenizer_from_spec({'type': 'bpe', 'vocab': []})
    with pytest.raises(ValueError, match='sorted list of distinct'): tokenizer_from_spec({'type': 'char', 'vocab': ['b', 'a']})


def test_token_export_example_checked(tiny_lm, tmp_path):
    lm, _, ids = tiny_lm
    for bad in (ids[:1, :8], ids[:2, :1], ids[:2, :8].float(), ids[0]):
        with pytest.raises(ValueError, match='int64 token ids'): export_token_model(lm, bad, tmp_path / 'x.onnx')
    assert list(tmp_path.iterdir()) == []


def test_token_package_round_trip(token_package, tiny_lm):
    "save -> verify -> load: a TokenPredictor whose outputs equal torch's on several batch sizes and sequence lengths."
    lm, tok, ids = tiny_lm
    man = verify_package(token_package)
    assert man['kind'] == 'token_model' and set(man['files']) == {*PACKAGE_FILES, *PACKAGE_KINDS['token_model']}
    sig = onnx_signature(token_package / 'model.onnx')
    assert sig['inputs'] == {'tokens': {'dtype': 'int64', 'shape': ['batch', 'sequence']}}
    p = load_package(token_package, threads=1)
    assert isinstance(p, TokenPredictor) and p.tokenizer.vocab == tok.vocab and p.folder == token_package
    for n, t in [(1, 1), (1, 32), (2, 5), (3, 17), (6, 32)]:
        x = ids[:n, :t]
        with torch.no_grad(): ref = lm(x)
        np.testing.assert_allclose(p.logits(x), ref.numpy(), atol=1e-4)
        out = p(x.numpy())
        np.testing.assert_allclose(out.probs, torch.softmax(ref[:, -1], -1).numpy(), atol=1e-5)
        assert out.probs.shape == (n, tok.vocab_size) and out.names == [tok.vocab[i] for i in out.labels]
    text = TEXT[:20]
    np.testing.assert_array_equal(p.logits(text), p.logits(tok.encode(text)))  # text in, through the restored tokenizer
    assert p(text).names == p([text]).names
    rebuilt = load_package_weights(token_package)
    assert type(rebuilt) is TransformerLM and rebuilt.cfg == lm.cfg
    for (k, a), b in zip(lm.state_dict().items(), rebuilt.state_dict().values()): assert torch.equal(a, b), k
    card = (token_package / 'README.md').read_text()
    assert '- Kind: token_model' in card and f'a vocabulary of {tok.vocab_size}' in card


def test_parity_check_token_logits(token_package, tiny_lm):
    "parity_check on (N, T, V) outputs counts one prediction per position, and fails on other weights."
    lm, tok, ids = tiny_lm
    r = parity_check(lm, token_package / 'model.onnx', [ids[:1, :3], ids[:4, :9]])
    assert r['passed'] and r['n'] == 5 and r['predictions'] == 3 + 36
    torch.manual_seed(1)
    other = TransformerLM(lm.cfg).eval()
    assert not parity_check(other, token_package / 'model.onnx', ids[:2, :8])['passed']


@pytest.mark.parametrize('x,what', [
    ('To be, or not to be!', "'!' is not in the tokenizer's vocabulary"),
    (['To be', 'or not to be'], 'one length'),
    (np.zeros((2, 5), np.float32), 'wrong dtype float32'),
    (np.zeros((2, 5), bool), 'wrong dtype bool'),
    (np.zeros((1, 2, 3), np.int64), 'wrong shape (1, 2, 3)'),
    (np.zeros((1, 0), np.int64), 'empty batch or sequence'),
    (np.zeros((0, 4), np.int64), 'empty batch or sequence'),
    (np.zeros((1, 33), np.int64), 'longer than this model'),
    (np.array([[0, 1, -1]]), 'token id -1 is out of the vocabulary'),
    (np.array([[0, 1, 999]]), 'token id 999 is out of the vocabulary'),
    ({'text': 'To be'}, 'got dict'),
])
def test_token_predictor_bad_input(token_package, x, what):
    p = load_package(token_package, threads=1)
    with pytest.raises(ValueError) as e: p(x)
    assert what in str(e.value)


def test_token_package_tampered(token_package, tmp_path):
    d = tmp_path / 'tok'; shutil.copytree(token_package, d)
    (d / 'tokenizer.json').write_text((d / 'tokenizer.json').read_text().replace('"a"', '"@"'))
    with pytest.raises(PackageError, match='tokenizer.json fails its checksum'): load_package(d)
    shutil.rmtree(d); shutil.copytree(token_package, d); (d / 'tokenizer.json').unlink()
    with pytest.raises(PackageError, match='tokenizer.json is missing'): load_package(d)
    shutil.rmtree(d); shutil.copytree(token_package, d)
    man = json.loads((d / 'manifest.json').read_text()); del man['files']['tokenizer.json']; (d / 'tokenizer.json').unlink()
    (d / 'manifest.json').write_text(json.dumps(man))
    with pytest.raises(PackageError, match=r"does not list \['tokenizer.json'\]"): load_package(d)


def test_token_package_refuses_int8(tiny_lm, tmp_path):
    lm, tok, ids = tiny_lm
    with pytest.raises(ValueError, match='INT8 packages are made for image classifiers'):
        save_package(lm, tmp_path / 'p', ids[:2, :8], token_config(tok, 32), calib=[ids])
    with pytest.raises(ValueError, match="config kind 'sound'"):
        save_package(lm, tmp_path / 'p', ids[:2, :8], {'kind': 'sound'})


# calibration temperature and signatures

def test_package_temperature_calibrates_probabilities(exported, config, fashion, tmp_path):
    model = exported[0]
    x, _, mean, std = fashion
    xn = normalize(x[:32], mean, std)
    p = load_package(save_package(model, tmp_path / 'cal', xn[:2], config, temperature=0.5))
    plain = load_package(save_package(model, tmp_path / 'plain', xn[:2], config))
    out, ref = p(x[:32].numpy()), plain(x[:32].numpy())
    with torch.no_grad(): want = (model(xn) / 0.5).softmax(-1).numpy()
    np.testing.assert_allclose(out.probs, want, atol=1e-5)
    assert (out.labels == ref.labels).all() and p.temperature == 0.5 and plain.temperature is None
    assert not np.allclose(out.probs, ref.probs, atol=1e-3)  # the temperature did change the probabilities
    np.testing.assert_allclose(p.predict(xn.numpy(), normalized=True).probs, want, atol=1e-5)  # the float path too
    assert json.loads((tmp_path / 'cal' / 'config.json').read_text())['calibration']['temperature'] == 0.5
    assert 'temperature scaling' in (tmp_path / 'cal' / 'README.md').read_text()


@pytest.mark.parametrize('t', [0, -1.0, float('nan'), float('inf'), '0.5', True])
def test_package_bad_temperature(exported, config, tmp_path, t):
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        save_package(exported[0], tmp_path / 'bad', torch.randn(2, 1, 28, 28), config, temperature=t)
    assert not (tmp_path / 'bad').exists()


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
    from bigmodel_nb.deploy import generate_key, save_key
    k = generate_key()
    priv, pub = save_key(k, tmp_path_factory.mktemp('keys') / 'packager')
    return k, priv, pub


@pytest.fixture(scope='module')
def signed(tmp_path_factory, exported, config, keys):
    return save_package(exported[0], tmp_path_factory.mktemp('signed') / 'pkg', torch.randn(2, 1, 28, 28), config, sign_with=keys[0])


def _forge(d):
    "Relabel the model and rewrite the manifest to match: every checksum passes."
    import hashlib
    cfg = json.loads((d / 'config.json').read_text()); cfg['labels'] = ['Safe'] * 10; (d / 'config.json').write_text(json.dumps(cfg))
    m = json.loads((d / 'manifest.json').read_text())
    b = (d / 'config.json').read_bytes()
    m['files']['config.json'] = {'sha256': hashlib.sha256(b).hexdigest(), 'bytes': len(b)}
    (d / 'manifest.json').write_text(json.dumps(m))


def test_signed_package_loads_with_trusted_key(signed, keys, fashion):
    from bigmodel_nb.deploy import load_public_key, key_id
    k, priv, pub = keys
    assert (signed / 'signature.json').is_file()
    doc = json.loads((signed / 'signature.json').read_text())
    assert doc['algorithm'] == 'Ed25519' and doc['key_id'] == key_id(k)
    for trusted in ([pub], pub, [load_public_key(pub)], [str(pub)], k):
        load_package(signed, trusted_keys=trusted)
    verify_package(signed, trusted_keys=[pub])
    load_package_weights(signed, trusted_keys=[pub])
    load_package(signed)  # without trusted keys, the checksums alone


def test_forged_package_accepted_by_checksums_refused_by_signature(signed, keys, tmp_path, fashion):
    d = tmp_path / 'forged'; shutil.copytree(signed, d); _forge(d)
    assert load_package(d)(fashion[0][:2].numpy()).names == ['Safe', 'Safe']  # checksums catch corruption, not forgery
    with pytest.raises(PackageError, match='bad signature'): load_package(d, trusted_keys=[keys[2]])
    with pytest.raises(PackageError, match='bad signature'): load_package_weights(d, trusted_keys=[keys[2]])
    with pytest.raises(PackageError, match='bad signature'): verify_package(d, trusted_keys=[keys[2]])


def test_unsigned_and_unknown_key_refused(package, signed, keys, tmp_path):
    from bigmodel_nb.deploy import generate_key, sign_package, key_id
    with pytest.raises(PackageError, match='unsigned package'): load_package(package, trusted_keys=[keys[2]])
    d = tmp_path / 'other'; shutil.copytree(signed, d)
    other = generate_key()
    assert sign_package(d, other) == key_id(other)
    with pytest.raises(PackageError, match=f'unknown key {key_id(other)}'): load_package(d, trusted_keys=[keys[2]])
    load_package(d, trusted_keys=[other.public_key()])
    # re-signing a forged package with the attacker's key does not help either
    _forge(d); sign_package(d, other)
    with pytest.raises(PackageError, match='unknown key'): load_package(d, trusted_keys=[keys[2]])


@pytest.mark.parametrize('doc, what', [('not json', 'malformed'), ('{"algorithm": "RSA", "signed": "manifest.json", "key_id": "x", "signature": ""}', 'malformed'),
                                       ('{"algorithm": "Ed25519", "signed": "manifest.json", "key_id": "x", "signature": "AAAA"}', 'malformed'),
                                       ('{"algorithm": "Ed25519", "signed": "manifest.json", "key_id": "x", "signature": "@@@"}', 'malformed')])
def test_malformed_signature_file(signed, keys, tmp_path, doc, what):
    d = tmp_path / 'bad-sig'; shutil.copytree(signed, d); (d / 'signature.json').write_text(doc)
    with pytest.raises(PackageError, match=what): load_package(d, trusted_keys=[keys[2]])
    load_package(d)  # the signature file is not in the manifest: without trusted keys it is ignored


def test_sign_package_checks_first(package, keys, tmp_path):
    from bigmodel_nb.deploy import sign_package
    d = tmp_path / 'tampered'; shutil.copytree(package, d)
    b = bytearray((d / 'model.onnx').read_bytes()); b[-100] ^= 1; (d / 'model.onnx').write_bytes(bytes(b))
    with pytest.raises(PackageError, match='fails its checksum'): sign_package(d, keys[0])
    assert not (d / 'signature.json').exists()


def test_key_files(keys, signed, tmp_path):
    from bigmodel_nb.deploy import load_private_key, load_public_key, save_key, generate_key, key_id
    k, priv, pub = keys
    assert priv.stat().st_mode & 0o777 == 0o600 and pub.name == 'packager.pub'
    assert key_id(load_private_key(priv)) == key_id(load_public_key(pub)) == key_id(k)
    with pytest.raises(FileExistsError): save_key(k, priv)
    (tmp_path / 'junk.pem').write_text('hello')
    with pytest.raises(ValueError, match='not a PEM private key'): load_private_key(tmp_path / 'junk.pem')
    with pytest.raises(ValueError, match='not a PEM public key'): load_public_key(tmp_path / 'junk.pem')
    with pytest.raises(ValueError, match='not a PEM private key'): load_private_key(pub)
    with pytest.raises(FileNotFoundError, match='no such key file'): load_public_key(tmp_path / 'missing.pub')
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import serialization
    ecpem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / 'ec.pub').write_bytes(ecpem)
    with pytest.raises(ValueError, match='expected an Ed25519 public key'): load_public_key(tmp_path / 'ec.pub')
    with pytest.raises(ValueError, match='sign_with: expected an Ed25519 private key'):
        save_package(None, tmp_path / 'x', None, {'kind': 'image_classifier'}, sign_with='key.pem')
    with pytest.raises(ValueError, match='trusted_keys is empty'): load_package(signed, trusted_keys=[])
    with pytest.raises(ValueError, match='expected Ed25519 public keys'): load_package(signed, trusted_keys=[42])


# ---- the decoder with a key/value cache ----

def _stepped_vs_full(model, T=20, cut=7):
    "Max |logits| difference: prefill `cut` tokens, then one token per step through DecoderWithPast, vs the model's full forward."
    dec = DecoderWithPast(model.eval())
    ids = torch.randint(0, model.cfg.vocab_size, (3, T), generator=torch.Generator().manual_seed(0))
    H, dh = dec.n_heads, model.cfg.d_model // dec.n_heads
    with torch.no_grad():
        full = model(ids)
        lg, k, v = dec(ids[:, :cut], torch.arange(cut).expand(3, cut), torch.zeros(3, 0, dtype=torch.long), *[torch.zeros(3, H, 0, dh)] * (2 * dec.n_layers))
        err, K, V = (lg - full[:, :cut]).abs().max().item(), list(k), list(v)
        for t in range(cut, T):
            lg, k, v = dec(ids[:, t:t + 1], torch.full((3, 1), t), torch.ones(3, t, dtype=torch.long), *K, *V)
            err = max(err, (lg[:, 0] - full[:, t]).abs().max().item())
            K, V = [torch.cat(ab, -2) for ab in zip(K, k)], [torch.cat(ab, -2) for ab in zip(V, v)]
    return err


@pytest.mark.parametrize('cls,kw', [(TransformerLM, {}), (TransformerLM, dict(pre_norm=False, n_types=2, emb_norm=True, tied=False)),
                                    (GPT, dict(positions='learned')), (GPT, dict(positions='sinusoidal')), (GPT, dict(positions='rotary')),
                                    (GPT, dict(positions='none', pre_norm=False))])
def test_decoder_with_past_matches_full_forward(cls, kw):
    torch.manual_seed(1)
    model = cls(TransformerConfig(vocab_size=30, n_ctx=32, d_model=32, n_layers=2, n_heads=4, **kw))
    assert _stepped_vs_full(model) < 1e-4


def test_decoder_parts_unregistered():
    with pytest.raises(ValueError, match='no decoder step for Linear'): decoder_parts(nn.Linear(2, 2))


@pytest.fixture(scope='module')
def decoder_package(tmp_path_factory):
    "An untied (so its greedy text varies) TransformerLM with a short context, packaged with its decoder."
    torch.manual_seed(0)
    tok = CharTokenizer(TEXT)
    lm = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, n_ctx=12, d_model=32, n_layers=2, n_heads=4, tied=False)).eval()
    folder = tmp_path_factory.mktemp('decpkg') / 'lm'
    save_package(lm, folder, torch.stack([tok.encode(TEXT[:8]), tok.encode(TEXT[8:16])]), token_config(tok, 12, name='lm'), decoder=True)
    return lm, tok, folder


def _kv_greedy(kb, prompts, joins, n):
    outs, active, step = [[] for _ in prompts], [], 0
    while step <= max(joins) or active:
        rows = list(zip(active, kb.step([outs[i][-1] for i in active]))) if active else []
        new = [i for i, j in enumerate(joins) if j == step]
        if new: rows += list(zip(new, kb.add([prompts[i] for i in new]))); active += new
        for i, row in rows: outs[i].append(int(row.argmax()))
        done = [r for r, i in enumerate(active) if len(outs[i]) >= n]
        kb.remove(done); active = [i for r, i in enumerate(active) if r not in done]; step += 1
    return outs


def test_decoder_package_files_and_card(decoder_package):
    _, _, folder = decoder_package
    man = verify_package(folder)
    assert 'decoder.onnx' in man['files'] and man['files']['decoder.onnx']['bytes'] == (folder / 'decoder.onnx').stat().st_size
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['decoder']['file'] == 'decoder.onnx' and cfg['decoder']['parity']['passed']
    assert 'Decoder: `decoder.onnx`' in (folder / 'README.md').read_text()
    assert load_package(folder).decoder is not None


def test_decoder_tampered(decoder_package, tmp_path):
    d = tmp_path / 'p'; shutil.copytree(decoder_package[2], d)
    b = bytearray((d / 'decoder.onnx').read_bytes()); b[len(b) // 2] ^= 1; (d / 'decoder.onnx').write_bytes(bytes(b))
    with pytest.raises(PackageError, match='decoder.onnx fails its checksum'): load_package(d)


def test_kv_batch_greedy_equals_full_window(decoder_package):
    "Rows joining at different steps, of different lengths, sliding past n_ctx=12: the same greedy tokens as the full window alone."
    lm, tok, folder = decoder_package
    p = load_package(folder, threads=1, spin=False)
    prompts = [tok.encode(s).tolist() for s in ('To be', 'whether tis nobler', 'or', 'a')]
    outs = _kv_greedy(p.kv_batch(), prompts, [0, 0, 3, 7], 25)
    def full(prompt):
        seq = list(prompt)
        for _ in range(25): seq.append(int(p.logits(np.array(seq[-12:]))[0, -1].argmax()))
        return seq[len(prompt):]
    assert outs == [full(q) for q in prompts]
    assert len({tuple(o) for o in outs}) == 4 and all(len(set(o)) > 3 for o in outs)  # varied text: a real check


def test_kv_batch_logits_close_to_torch(decoder_package):
    lm, tok, folder = decoder_package
    ids = torch.stack([tok.encode(TEXT[i:i + 12]) for i in (0, 20, 40)])
    dp = decoder_parity(lm, folder / 'decoder.onnx', ids)
    assert dp['passed'] and dp['argmax_agreement'] == 1.0 and dp['n'] == 3 * 7
    kb = load_package(folder).kv_batch()
    with torch.no_grad(): want = lm(ids).numpy()
    np.testing.assert_allclose(kb.add(ids[:, :5].tolist()), want[:, 4], atol=1e-4)
    for t in range(5, 12): np.testing.assert_allclose(kb.step(ids[:, t].numpy()), want[:, t], atol=1e-4)


def test_decoder_bad_use(decoder_package, token_package, tiny_lm, tmp_path):
    lm, tok, folder = decoder_package
    with pytest.raises(ValueError, match='no decoder.onnx'): load_package(token_package).kv_batch()
    with pytest.raises(ValueError, match='made for token models'):
        save_package(lm, tmp_path / 'x', torch.zeros(2, 4, dtype=torch.long), {'kind': 'image_classifier'}, decoder=True)
    with pytest.raises(ValueError, match="expected a session of export_decoder's graph"): KVBatch(load_package(token_package).session)
    kb = load_package(folder).kv_batch()
    with pytest.raises(ValueError, match='one or more prompts'): kb.add([[]])
    kb.add([[1, 2], [3]])
    with pytest.raises(ValueError, match=r'one token per row \(2 rows\)'): kb.step([1])
    kb.remove([0]); assert len(kb) == 1 and kb.lens.tolist() == [1] and kb.tokens == [[3]]
    kb.remove([0]); assert len(kb) == 0 and kb.kv[0].shape[0] == kb.kv[0].shape[2] == 0  # empty: the memory goes back
    assert kb.add([[4, 5, 6]]).shape == (1, tok.vocab_size) and kb.lens.tolist() == [3]
