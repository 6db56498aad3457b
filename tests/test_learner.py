"Tests of `bigmodel_nb.learner`: exact resume, atomic checkpoints, metrics vs scikit-learn, callbacks, errors."
import contextlib, os, subprocess, sys, textwrap
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file
from torch import nn

from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.learner import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                                 CancelFitException, CancelStepException, CancelTrainException, CancelValidateException,
                                 Checkpoint, EarlyStopping, GradientClip, Learner, MixedPrecision, accuracy,
                                 StopAfter, TimeBudget, accuracy_on, confusion_matrix, digits_cnn, f1_score, perplexity,
                                 precision, recall, sched_cos, sched_one_cycle, seed_fit)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def digits():
    return image_dataloaders('digits', batch_size=64, seed=0, verbose=False)


def linear_data(n=96, bs=16, shuffle=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g); y = x @ torch.tensor([[1.], [-2.], [0.5]]) + 0.3
    return (TensorLoader(x[:n - 32], y[:n - 32], bs, shuffle=shuffle), TensorLoader(x[n - 32:], y[n - 32:], 32))


def lin_learner(cbs=None, lr=0.05, **kw):
    torch.manual_seed(0)
    return Learner(nn.Linear(3, 1), linear_data(), F.mse_loss, torch.optim.SGD, lr=lr, cbs=cbs, progress=False,
                   device='cpu', **kw)


def weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


# --- checkpoints and resume ------------------------------------------------------------------------------------------

def cnn_learner(digits, seed=0, **kw):
    torch.manual_seed(seed)
    data = (TensorLoader(digits.train.x, digits.train.y, 64, shuffle=True, seed=3), digits.valid)
    return Learner(digits_cnn(width=4), data, metrics=accuracy, lr=1e-2, progress=False, device='cpu', **kw)


@pytest.mark.parametrize('sched', ['one_cycle', 'cos'])
def test_resume_equals_uninterrupted(digits, tmp_path, sched):
    ck = tmp_path / 'ck.safetensors'
    full = cnn_learner(digits, cbs=EarlyStopping(patience=10)).fit(3, sched=sched)
    part = cnn_learner(digits, cbs=EarlyStopping(patience=10)).fit(3, sched=sched, cbs=[Checkpoint(ck), StopAfter(1)])
    assert len(part.recorder.log) == 1
    resumed = cnn_learner(digits, seed=99, cbs=EarlyStopping(patience=10)).fit(3, sched=sched, resume=ck)
    assert_same(weights(full), weights(resumed))
    assert resumed.recorder.values('valid_loss') == full.recorder.values('valid_loss')
    assert resumed.recorder.losses == full.recorder.losses
    assert resumed.early_stopping.best == full.early_stopping.best
    fo, ro = full.opt.state_dict(), resumed.opt.state_dict()
    for pid in fo['state']:
        for k, v in fo['state'][pid].items(): assert torch.equal(v, ro['state'][pid][k]), (pid, k)


def test_resume_with_torch_dataloader(tmp_path):
    "Plain torch DataLoaders shuffle from the global RNG, which the checkpoint restores."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 3, generator=g), torch.randn(80, 1, generator=g)
    def make(seed=0):
        torch.manual_seed(seed)
        ds = torch.utils.data.TensorDataset(x, y)
        data = SimpleNamespace(train=torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True),
                               valid=torch.utils.data.DataLoader(ds, batch_size=40))
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        return Learner(model, data, F.mse_loss, lr=1e-2, progress=False, device='cpu')
    full = make().fit_one_cycle(4)
    make().fit_one_cycle(4, cbs=[Checkpoint(tmp_path / 'c.safetensors'), StopAfter(2)])
    resumed = make(5).fit_one_cycle(4, resume=tmp_path / 'c.safetensors')
    assert_same(weights(full), weights(resumed))


def test_checkpoint_every_and_monitor(tmp_path):
    ck = Checkpoint(tmp_path / 'a.safetensors', every=2)
    lin_learner(cbs=ck).fit(5, sched=None)
    assert ck.saved == [1, 3, 4]  # every second epoch, and the last
    best = Checkpoint(tmp_path / 'b.safetensors', monitor='valid_loss')
    l = lin_learner(cbs=best).fit(4, sched=None)
    v = l.recorder.values('valid_loss')
    assert best.saved == [i for i in range(4) if v[i] == min(v[:i + 1])]


def test_atomic_write_exception_keeps_old(tmp_path, monkeypatch):
    import bigmodel_nb.learner as L
    ck = tmp_path / 'ck.safetensors'
    learn = lin_learner().fit(1, sched=None)
    learn.save(ck); before = ck.read_bytes()
    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(L, 'save_file', broken)
    learn.fit(2, sched=None)  # new weights
    with pytest.raises(OSError, match='disk full'): learn.save(ck)
    assert ck.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ck.safetensors']  # no temp file left
    lin_learner().load(ck)


def test_atomic_write_hard_crash_keeps_old(tmp_path):
    "A process killed mid-write (no cleanup at all) leaves the previous checkpoint whole and loadable."
    ck = tmp_path / 'ck.safetensors'
    code = textwrap.dedent(f'''
        import os, sys, torch
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_learner as T
        import bigmodel_nb.learner as L
        learn = T.lin_learner().fit(1, sched=None)
        learn.save({str(ck)!r})
        print('saved', flush=True)
        learn.fit(2, sched=None)
        real = L.save_file
        def crash(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes(); Path(filename).write_bytes(data[:len(data) // 2])
            os._exit(3)
        L.save_file = crash
        learn.save({str(ck)!r})
    ''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert 'saved' in r.stdout
    leftovers = [p for p in tmp_path.iterdir() if p.name != 'ck.safetensors']
    assert len(leftovers) == 1 and '.tmp-' in leftovers[0].name  # the half-written temp file
    one_epoch = lin_learner().fit(1, sched=None)
    assert_same(weights(lin_learner().load(ck)), weights(one_epoch))
    with pytest.raises(ValueError, match='not a readable safetensors'): lin_learner().load(leftovers[0])


# --- safetensors -----------------------------------------------------------------------------------------------------

def test_safetensors_roundtrip(tmp_path):
    learn = lin_learner().fit(2, sched=None)
    learn.save(tmp_path / 'w.safetensors', with_opt=False)
    sd = load_file(tmp_path / 'w.safetensors')
    assert_same(sd, weights(learn))
    other = lin_learner(lr=0.3).fit(1, sched=None).load(tmp_path / 'w.safetensors')
    assert_same(weights(other), weights(learn))
    # a full checkpoint keeps the model's tensors under their own names
    learn.save(tmp_path / 'c.safetensors')
    full = load_file(tmp_path / 'c.safetensors')
    assert_same({k: v for k, v in full.items() if not k.startswith('__')}, weights(learn))


def test_tied_weights_save(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__(); self.emb = nn.Embedding(5, 4); self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight
        def forward(self, x): return self.out(self.emb(x))
    torch.manual_seed(0)
    x = torch.randint(0, 5, (32,))
    learn = Learner(Tied(), (TensorLoader(x, x, 8), None), progress=False, device='cpu').fit(1)
    learn.save(tmp_path / 't.safetensors')
    torch.manual_seed(1)
    other = Learner(Tied(), (TensorLoader(x, x, 8), None), progress=False, device='cpu').load(tmp_path / 't.safetensors')
    assert_same(weights(other), weights(learn))
    assert other.model.out.weight is other.model.emb.weight


# --- metrics ---------------------------------------------------------------------------------------------------------

labels = st.integers(2, 8).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60)))


@settings(max_examples=60, deadline=None)
@given(labels)
def test_metrics_match_sklearn(case):
    k, pairs = case
    yt, yp = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    t, p = torch.tensor(yt), torch.tensor(yp)
    assert abs(float(accuracy(p, t)) - skm.accuracy_score(yt, yp)) < 1e-6
    for ours, theirs in ((precision, skm.precision_score), (recall, skm.recall_score), (f1_score, skm.f1_score)):
        assert abs(float(ours(p, t, num_classes=k)) - theirs(yt, yp, average='macro', zero_division=0)) < 1e-6, ours
        per = ours(p, t, average=None, num_classes=k).numpy()
        ref = theirs(yt, yp, average=None, labels=range(k), zero_division=0)
        np.testing.assert_allclose(per, ref, atol=1e-6)
    np.testing.assert_array_equal(confusion_matrix(p, t, k).numpy(), skm.confusion_matrix(yt, yp, labels=range(k)))


def test_metrics_from_logits():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(300, 6, generator=g), torch.randint(0, 6, (300,), generator=g)
    yp = logits.argmax(1).numpy()
    assert abs(float(f1_score(logits, y)) - skm.f1_score(y, yp, average='macro')) < 1e-6
    assert confusion_matrix(logits, y).shape == (6, 6)
    assert abs(float(perplexity(logits, y)) - float(torch.exp(F.cross_entropy(logits, y)))) < 1e-4
    assert abs(float(perplexity(torch.zeros(2, 3, 7), torch.zeros(2, 3, dtype=torch.long))) - 7) < 1e-4
    with pytest.raises(ValueError, match='macro'): precision(logits, y, average='micro')


def test_schedules_match_torch():
    for total in (7, 50, 333):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
        s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=total, cycle_momentum=False)
        for i in range(total):
            assert abs(opt.param_groups[0]['lr'] - sched_one_cycle(i, total, 0.3)) < 1e-12
            opt.step(); s.step()
        assert abs(sched_cos(total // 2, total, 1.0) - 0.5 * (1 + np.cos(np.pi * (total // 2) / total))) < 1e-12


def test_recorder_lrs_follow_schedule():
    l = lin_learner().fit_one_cycle(3, 0.1)
    total = 3 * len(l.data.train)
    assert l.recorder.lrs == [sched_one_cycle(i, total, 0.1) for i in range(total)]


# --- callbacks -------------------------------------------------------------------------------------------------------

def test_early_stopping_stops():
    es = EarlyStopping(patience=2)
    l = lin_learner(cbs=es, lr=0.0).fit(10, sched=None)  # lr 0: the loss never improves
    assert es.stopped_epoch == 2 and len(l.recorder.log) == 3
    es = EarlyStopping('valid_loss', patience=2)
    l = lin_learner(cbs=es, lr=0.05).fit(4, sched=None)  # improving: runs to the end
    assert es.stopped_epoch is None and len(l.recorder.log) == 4
    with pytest.raises(KeyError, match='accuracy'): lin_learner(cbs=EarlyStopping('accuracy')).fit(1)


class Raise(Callback):
    "Raise `exc` at `event`."
    def __init__(self, event, exc): self.exc = exc; setattr(self, event, self._raise)
    def _raise(self): raise self.exc


class Count(Callback):
    order = 50
    def __init__(self): self.n = {}
    def __getattr__(self, e):
        if e.startswith(('before_', 'after_')): return lambda: self.n.__setitem__(e, self.n.get(e, 0) + 1)
        raise AttributeError(e)


@pytest.mark.parametrize('event,exc,check', [
    ('before_fit', CancelFitException, lambda n, moved: n.get('before_epoch', 0) == 0 and n['after_cancel_fit'] == 1 and not moved),
    ('before_epoch', CancelEpochException, lambda n, moved: n.get('before_train', 0) == 0 and n['after_cancel_epoch'] == 2 and n['after_epoch'] == 2),
    ('before_train', CancelTrainException, lambda n, moved: n['after_cancel_train'] == 2 and n['before_validate'] == 2 and not moved),
    ('before_validate', CancelValidateException, lambda n, moved: n['after_cancel_validate'] == 2 and moved),
    ('after_pred', CancelBatchException, lambda n, moved: n.get('after_loss', 0) == 0 and n['after_batch'] == n['after_cancel_batch'] and not moved),
    ('before_backward', CancelBackwardException, lambda n, moved: n['after_cancel_backward'] == 8 and n['before_step'] == 8),
    ('before_step', CancelStepException, lambda n, moved: n['after_cancel_step'] == 8 and n['after_batch'] == 10 and not moved),
])
def test_cancel_exceptions(event, exc, check):
    c = Count()
    l = lin_learner(cbs=[Raise(event, exc), c])  # 4 training and 1 validation batch per epoch
    w0 = weights(l)
    l.fit(2, sched=None)
    moved = not all(torch.equal(w0[k], v) for k, v in weights(l).items())
    assert check(c.n, moved), c.n


def test_callback_names_and_removal():
    es = EarlyStopping()
    l = lin_learner(cbs=es)
    assert l.early_stopping is es and l.recorder is not None
    l.fit(1, cbs=GradientClip(1.0), sched='cos')
    assert not hasattr(l, 'gradient_clip') and not hasattr(l, 'lr_schedule')  # fit-only callbacks are removed
    assert [type(c).__name__ for c in l.cbs] == ['Recorder', 'EarlyStopping']


def test_gradient_clip_clips():
    seen = []
    class Probe(Callback):
        order = 10
        def before_step(self):
            seen.append(float(torch.cat([p.grad.reshape(-1) for p in self.learn.model.parameters()]).norm()))
    gc = GradientClip(0.1)
    lin_learner(cbs=[gc, Probe()], lr=0.5).fit(1, sched=None)
    assert max(float(n) for n in gc.norms) > 0.1 and max(seen) <= 0.1 + 1e-5


class DtypeProbe(Callback):
    "The dtypes of the predictions, in training and in validation."
    def before_fit(self): self.dtypes = set()
    def after_pred(self): self.dtypes.add((self.learn.training, self.learn.pred.dtype))


def test_mixed_precision_cpu(capsys):
    probe = DtypeProbe()
    l = lin_learner(cbs=[MixedPrecision(), probe]).fit(1, sched=None)
    assert 'off on cpu' in capsys.readouterr().out and l.scaler is None
    assert probe.dtypes == {(True, torch.float32), (False, torch.float32)}  # off: float32 throughout
    l = lin_learner(cbs=[MixedPrecision(torch.bfloat16), probe]).fit(1, sched=None)
    assert probe.dtypes == {(True, torch.bfloat16), (False, torch.bfloat16)}  # bfloat16 really ran, both phases
    assert l.recorder.log[-1]['train_loss'] == l.recorder.log[-1]['train_loss']  # not nan
    assert l.autocast is contextlib.nullcontext  # and autocast is off again after the fit
    with torch.no_grad(): assert l.model(torch.zeros(1, 3)).dtype == torch.float32


def test_progress_and_summary(capsys):
    l = lin_learner(cbs=None)
    l2 = Learner(l.model, l.data, F.mse_loss, progress=True, device='cpu').fit(2, sched=None)
    out = capsys.readouterr().out
    assert 'train_loss' in out and 'valid_loss' in out
    l2.summary()
    assert 'Total params: 4' in capsys.readouterr().out
    table = l2.recorder.table().splitlines()
    assert table[:2] == ['| epoch | train_loss | valid_loss | time |', '|---:|---:|---:|---:|']
    assert len(table) == 4 and table[2].startswith('| 0 | ') and table[3].startswith('| 1 | ')
    assert table[2].split(' | ')[1] == f"{l2.recorder.log[0]['train_loss']:.4f}"


def test_get_preds_predict_validate(digits):
    l = cnn_learner(digits).fit(1)
    preds, targs, xs = l.get_preds(digits.test, with_input=True)
    assert preds.shape == (len(digits.test.x), 10) and torch.equal(targs, digits.test.y) and torch.equal(xs, digits.test.x)
    res = l.validate(digits.test)
    assert abs(res['accuracy'] - skm.accuracy_score(targs, preds.argmax(1))) < 1e-6
    assert abs(res['loss'] - float(F.cross_entropy(preds, targs))) < 1e-5
    label, idx, probs = l.predict(digits.test.x[3])
    assert idx == int(preds[3].argmax()) and label == idx and abs(float(probs.sum()) - 1) < 1e-5
    l.data.classes = digits.classes  # with class names, predict names the class
    assert l.predict(digits.test.x[3])[0] == digits.classes[idx]
    assert torch.equal(l.confusion_matrix(digits.test), confusion_matrix(preds, targs))


# --- bad input -------------------------------------------------------------------------------------------------------

def test_bad_inputs(tmp_path, digits):
    with pytest.raises(TypeError, match='train'): Learner(nn.Linear(1, 1), object())
    with pytest.raises(ValueError, match='unknown schedule'): lin_learner().fit(1, sched='linear')
    with pytest.raises(FileNotFoundError, match='no checkpoint'): lin_learner().load(tmp_path / 'nope.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='not a readable safetensors'): lin_learner().load(tmp_path / 'junk.safetensors')
    l = cnn_learner(digits).fit(1)
    l.save(tmp_path / 'cnn.safetensors')
    other = Learner(digits_cnn(width=8), digits, progress=False, device='cpu')
    with pytest.raises(ValueError, match='different architecture') as e: other.load(tmp_path / 'cnn.safetensors')
    assert 'shape mismatch' in str(e.value) and 'strict=False' in str(e.value)
    with pytest.raises(ValueError, match='different architecture'): lin_learner().load(tmp_path / 'cnn.safetensors')
    # strict=False loads only what fits
    partial_ = Learner(nn.Sequential(*digits_cnn(width=4)[:2]), digits, progress=False, device='cpu')
    partial_.load(tmp_path / 'cnn.safetensors', strict=False, with_opt=False)
    assert torch.equal(partial_.model[0][0].weight, l.model[0][0].weight)
    # an optimizer with other parameter groups is refused with a message
    two = cnn_learner(digits)
    two.opt = torch.optim.AdamW([{'params': list(two.model.parameters())[:2]}, {'params': list(two.model.parameters())[2:]}])
    with pytest.raises(ValueError, match='optimizer state'): two.load(tmp_path / 'cnn.safetensors')


def test_fit_is_constant_fit_one_cycle_is_not():
    assert set(lin_learner().fit(2, 0.1).recorder.lrs) == {0.1}
    l = lin_learner().fit_one_cycle(2, 0.1); total = 2 * len(l.data.train)
    assert l.recorder.lrs == [sched_one_cycle(i, total, 0.1) for i in range(total)]


def test_time_budget_survives_a_checkpoint(tmp_path):
    "A resumed run gets only the rest of its budget: the time used before the stop is in the checkpoint."
    import time
    class Slow(Callback):
        def after_batch(self): time.sleep(0.01)
    ck = tmp_path / 'c.safetensors'
    lin_learner(cbs=[Slow(), TimeBudget(3600)]).fit_one_cycle(3, 0.1, cbs=[Checkpoint(ck), StopAfter(2)])
    tb = TimeBudget(3600)
    l = lin_learner(cbs=[tb, StopAfter(3)])
    used = []
    class Spy(Callback):
        order = 50
        def before_epoch(self): used.append(tb.progress() * tb.seconds)
    l.fit_one_cycle(3, 0.1, cbs=Spy(), resume=ck)
    assert used[0] >= 2 * 4 * 0.01  # two epochs of four slowed batches were already spent


def test_accuracy_on_module_and_function(digits):
    torch.manual_seed(0)
    m = digits_cnn().train()
    acc = accuracy_on(m, digits.test)
    assert m.training  # mode restored
    assert acc == accuracy_on(lambda x: m.eval()(x).numpy(), digits.test)
    with pytest.raises(ValueError, match='no items'): accuracy_on(m, [])


def test_learner_equals_the_seed_loop(digits, capsys):
    "With the seed's SGD and a constant rate, the Learner ends with the weights of the exported seed loop, bit for bit."
    def loader(): return TensorLoader(digits.train.x, digits.train.y, 64, shuffle=True, seed=0)
    torch.manual_seed(0); net_seed = digits_cnn(width=4)
    torch.manual_seed(1); seed_fit(net_seed, loader(), epochs=2, lr=0.01, print_every=5)
    out = capsys.readouterr().out
    assert out.count('loss:') == 2 * (len(loader()) // 5) and out.rstrip().endswith('Finished Training')
    torch.manual_seed(0); net_learn = digits_cnn(width=4)
    learn = Learner(net_learn, (loader(), None), nn.CrossEntropyLoss(), partial(torch.optim.SGD, momentum=0.9), lr=0.01,
                    progress=False, device='cpu')
    torch.manual_seed(1); learn.fit(2)
    assert_same(net_seed.state_dict(), net_learn.state_dict())
    torch.manual_seed(0); other = digits_cnn(width=4)  # the same, at a rate of 0.011: the check can fail
    torch.manual_seed(1); Learner(other, (loader(), None), nn.CrossEntropyLoss(), partial(torch.optim.SGD, momentum=0.9),
                                  lr=0.011, progress=False, device='cpu').fit(2)
    assert not torch.equal(net_seed[0][0].weight, other[0][0].weight)


def test_time_budget_refuses_no_time():
    for s in (0, -1):
        with pytest.raises(ValueError, match='seconds must be > 0'): TimeBudget(s)
