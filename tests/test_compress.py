"Tests of `bigmodel_nb.compress` on a small CNN trained for seconds on the real scikit-learn digits."
import copy

import pytest
import torch
from torch import nn

from bigmodel_nb.compress import (add_ratios, check_goals, compression_report, compression_table, file_size,
                                  load_sparse, make_permanent, measure, ort_predictor, ort_quantize_dynamic,
                                  ort_quantize_static, prune_channels, prune_finetune, prune_global, recalibrate_bn,
                                  quantize_dynamic_int8, quantize_int8, dequantize_int8, quantize_static_int8,
                                  save_sparse, save_torch, sparsity, time_rows, export_onnx)
from bigmodel_nb.concepts import torch_threads
from bigmodel_nb.data import TensorLoader, image_dataloaders
from bigmodel_nb.learner import Learner, accuracy_on, digits_cnn


@pytest.fixture(scope='module')
def dls(): return image_dataloaders('digits', batch_size=64, seed=0, verbose=False)


@pytest.fixture(scope='module')
def cnn(dls):
    torch.manual_seed(0)
    m = digits_cnn(width=16)
    Learner(m, dls, lr=1e-2, progress=False, device='cpu').fit(3)
    return m.eval()


@pytest.fixture(scope='module')
def mlp(dls):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    Learner(m, dls, lr=3e-3, progress=False, device='cpu').fit(4)
    return m.eval()


def agreement(a, b, x):
    with torch.no_grad(): return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def test_model_is_trained(cnn, dls):
    assert accuracy_on(cnn, dls.test) > 0.9


def test_int8_from_scratch_matches_torch_fake_quant():
    torch.manual_seed(0); w = torch.randn(8, 4, 3, 3)
    q, s = quantize_int8(w)
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(8, dtype=torch.int32), 0, -127, 127)
    assert q.dtype == torch.int8 and torch.allclose(dequantize_int8(q, s), ref, atol=1e-7)
    assert (dequantize_int8(q, s) - w).abs().max() <= s.max() / 2 + 1e-7


def test_dynamic_int8_agrees_and_shrinks(mlp, dls, tmp_path):
    q = quantize_dynamic_int8(mlp)
    assert agreement(q, mlp, dls.test.x) >= 0.97
    ratio = file_size(save_torch(q, tmp_path/'q.pt')) / file_size(save_torch(mlp, tmp_path/'f.pt'))
    assert ratio <= 0.3
    assert isinstance(mlp[1], nn.Linear)  # the original is untouched


@pytest.mark.parametrize('layer, x', [(nn.LSTM(16, 32, batch_first=True), (4, 10, 16)),
                                      (nn.GRU(16, 32, batch_first=True), (4, 10, 16)), (nn.Linear(16, 32), (4, 16))])
def test_dynamic_int8_bare_layer_is_quantized(layer, x):
    "A model that IS the layer (not a parent of it) is quantized too: `quantize_dynamic` alone would hand it back float"
    torch.manual_seed(0); layer = layer.eval(); x = torch.randn(*x)
    q = quantize_dynamic_int8(layer)
    assert 'quantized' in type(q).__module__, type(q)
    assert 'quantized' not in type(layer).__module__  # the original is untouched
    with torch.no_grad():
        out, q_out = (o[0] if isinstance(o, tuple) else o for o in (layer(x), q(x)))
    err = float((out - q_out).abs().max())
    assert 1e-4 < err < 0.05  # int8 weights move the outputs, a little


def test_static_int8_agrees_and_shrinks(cnn, dls, tmp_path):
    q = quantize_static_int8(cnn, dls.train, n_batches=5)
    assert agreement(q, cnn, dls.test.x) >= 0.95
    assert abs(accuracy_on(q, dls.test) - accuracy_on(cnn, dls.test)) <= 0.03
    ratio = file_size(save_torch(q, tmp_path/'q.pt')) / file_size(save_torch(cnn, tmp_path/'f.pt'))
    assert ratio <= 0.4  # a 23k-parameter model: the per-file overhead is a bigger share than on the chapter's CNN


def test_ort_roundtrip_and_quantization(cnn, dls, tmp_path):
    p = export_onnx(cnn, dls.test.x[:1], tmp_path/'m.onnx')  # batch 1 example: the batch stays dynamic
    run = ort_predictor(p)
    x = dls.test.x[:64]
    with torch.no_grad(): assert torch.allclose(run(x), cnn(x), atol=1e-4)
    assert run(x[:1]).shape == (1, 10)
    qs = ort_quantize_static(p, tmp_path/'qs.onnx', dls.train, n_batches=5)
    qd = ort_quantize_dynamic(p, tmp_path/'qd.onnx')
    assert agreement(ort_predictor(qs), cnn, dls.test.x) >= 0.95
    assert agreement(ort_predictor(qd), cnn, dls.test.x) >= 0.95
    assert file_size(qs) < 0.5 * file_size(p)


def test_prune_global_exact_and_permanent(cnn):
    m = prune_global(copy.deepcopy(cnn), 0.7)
    ws = [x.weight for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    n = sum(w.numel() for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == round(0.7 * n)
    zeros = [w == 0 for w in ws]
    make_permanent(m)
    assert not any(k.endswith('_mask') or k.endswith('_orig') for k in m.state_dict())
    ws = [x.weight for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    assert all(torch.equal(w == 0, z) for w, z in zip(ws, zeros))
    assert sparsity(m) == pytest.approx(round(0.7 * n) / n)


def test_finetune_keeps_zeros(cnn, dls):
    m = prune_finetune(cnn, (TensorLoader(dls.train.x[:256], dls.train.y[:256], 64), None), 0.8, epochs=1, lr=1e-3)
    n = sum(x.weight.numel() for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))
    assert sparsity(m) >= round(0.8 * n) / n
    assert sparsity(cnn) < 0.01  # the original is untouched


def test_recalibrate_bn_matches_batch_statistics(cnn, dls):
    m = recalibrate_bn(copy.deepcopy(cnn), [(dls.train.x[:256], None)], n_batches=1)
    bn, conv = m[0][1], m[0][0]
    with torch.no_grad(): h = conv(dls.train.x[:256])
    assert not m.training and torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == cnn[0][1].momentum


def test_prune_channels_zeroes_whole_channels(cnn):
    m = prune_channels(copy.deepcopy(cnn), 0.5)
    for c in [x for x in m.modules() if isinstance(x, nn.Conv2d)]:
        assert int((c.weight.flatten(1).abs().sum(1) == 0).sum()) == round(0.5 * c.out_channels)


def test_sparse_file_roundtrip(cnn, tmp_path):
    m = make_permanent(prune_global(copy.deepcopy(cnn), 0.9))
    p = save_sparse(m, tmp_path/'s.pt')
    back = load_sparse(p)
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())
    assert file_size(p) < 0.5 * file_size(save_torch(m, tmp_path/'d.pt'))


def test_measure_time_rows_add_ratios(cnn, dls, tmp_path):
    q = quantize_static_int8(cnn, dls.train, n_batches=5)
    rows = [measure('fp32', cnn, save_torch(cnn, tmp_path/'f.pt'), dls.test, n_test=200),
            measure('int8', q, save_torch(q, tmp_path/'q.pt'), dls.test, 'int8', n_test=200)]
    assert rows[0]['accuracy'] == accuracy_on(cnn, dls.test, 200) and rows[0]['size'] == file_size(tmp_path/'f.pt')
    old = torch.get_num_threads()
    with torch_threads(2):  # a count different from the one `time_rows` sets, to see it come back
        time_rows(rows, [cnn, q], dls.test.x[:64], repeats=3, rounds=2, threads=1, warmup=1)
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == old
    for r in rows:
        for b in (1, 64): assert 0 < r[f'min_s_b{b}'] <= r[f's_b{b}'] < 10  # seconds
    add_ratios(rows)
    assert rows[0]['ratio'] == 1 and rows[0]['delta'] == 0
    assert rows[1]['ratio'] == file_size(tmp_path/'q.pt') / file_size(tmp_path/'f.pt')
    with pytest.raises(ValueError, match='one per row'): time_rows(rows, [cnn], dls.test.x[:64])
    with pytest.raises(ValueError, match='at least 64'): time_rows(rows[:1], [cnn], dls.test.x[:8])


@pytest.mark.parametrize('amount', [1.0, -0.1, 1.5, '0.5', True])
def test_bad_amount(cnn, amount):
    with pytest.raises(ValueError, match=r'\[0, 1\)'): prune_global(copy.deepcopy(cnn), amount)
    with pytest.raises(ValueError, match=r'\[0, 1\)'): prune_channels(copy.deepcopy(cnn), amount)


def test_model_without_layers_raises():
    bare = nn.Sequential(nn.ReLU(), nn.Flatten())
    for f in (lambda: prune_global(bare, 0.5), lambda: quantize_dynamic_int8(bare),
              lambda: quantize_static_int8(bare, [torch.randn(2, 4)]), lambda: sparsity(bare)):
        with pytest.raises(ValueError, match='nothing to compress'): f()


def test_other_errors(cnn, tmp_path):
    with pytest.raises(ValueError, match='make_permanent'): save_torch(prune_global(copy.deepcopy(cnn), 0.5), tmp_path/'x.pt')
    with pytest.raises(ValueError, match='method'): prune_finetune(cnn, None, 0.5, method='random')
    with pytest.raises(FileNotFoundError, match='export_onnx'): ort_quantize_dynamic(tmp_path/'none.onnx', tmp_path/'q.onnx')
    with pytest.raises(ValueError, match='no batch'): quantize_static_int8(cnn, [])


def test_report_rows_table(cnn, dls, tmp_path):
    rows = compression_report(cnn, dls, tmp_path, amounts=(0.8,), channel_amount=0, epochs=1, repeats=2, rounds=2, finetune_limit=256,
                              with_ort=False, verbose=False)
    assert [r['kind'] for r in rows] == ['fp32', 'int8', 'int8', 'pruned']
    assert all(0 < r['s_b1'] < 10 and r['min_s_b64'] <= r['s_b64'] for r in rows)
    assert rows[0]['ratio'] == 1 and rows[-1]['sparsity'] == pytest.approx(0.8, abs=1e-4) and rows[-1]['csr'] < rows[-1]['size']
    table = compression_table(rows)
    assert table.count('\n') == len(rows) + 1 and 'INT8 static' in table
    assert f"{rows[0]['s_b64'] * 1e3:.1f} ({rows[0]['min_s_b64'] * 1e3:.1f})" in table  # seconds shown in ms
    assert check_goals(rows, max_ratio=0.0)['int8'] is None


def _row(model, runtime, kind, size, acc, b1, b64, sparsity=None):
    return dict(model=model, runtime=runtime, kind=kind, size=size, accuracy=acc, s_b1=b1, s_b64=b64, sparsity=sparsity)


@pytest.fixture
def goal_rows():
    "Rows built so that each wrong rule picks a different row than the right one"
    return add_ratios([
        _row('fp32', 'torch', 'fp32', 1000, 0.900, 1.0e-3, 20e-3),
        _row('fp32', 'onnxruntime', 'fp32', 1000, 0.900, 0.3e-3, 8e-3),
        _row('ort dynamic: smallest, fastest at batch 1, slower at 64', 'onnxruntime', 'int8', 250, 0.899, 0.2e-3, 50e-3),
        _row('ort static: passes, fastest at batch 1 of those that pass', 'onnxruntime', 'int8', 280, 0.899, 0.25e-3, 7e-3),
        _row('torch static: passes, slower than ort static', 'torch', 'int8', 270, 0.898, 0.6e-3, 9e-3),
        _row('tiny but inaccurate', 'torch', 'int8', 200, 0.890, 0.1e-3, 5e-3),
        _row('fast but too big', 'onnxruntime', 'int8', 310, 0.900, 0.1e-3, 5e-3),
        _row('90% but -1.5 pts', 'torch', 'pruned', 1000, 0.885, 1e-3, 20e-3, 0.9),
        _row('80% (0.79999) -0.5 pts', 'torch', 'pruned', 1000, 0.895, 1e-3, 20e-3, 0.79999),
        _row('50% -0.1 pts', 'torch', 'pruned', 1000, 0.899, 1e-3, 20e-3, 0.5)])


def test_check_goals_picks_the_int8_model_to_ship(goal_rows):
    g = check_goals(goal_rows)
    assert g['int8']['model'].startswith('ort static') and g['pruned']['model'].startswith('80%')
    assert check_goals(goal_rows, max_slowdown=10)['int8']['model'].startswith('ort dynamic')  # the latency condition matters
    assert check_goals(goal_rows, max_int8_loss=2)['int8']['model'] == 'tiny but inaccurate'  # so does the loss bound
    assert check_goals(goal_rows, max_ratio=0.4)['int8']['model'] == 'fast but too big'  # and the size bound
    no_ort_static = [r for r in goal_rows if not r['model'].startswith('ort static')]
    assert check_goals(no_ort_static)['int8']['model'].startswith('torch static')  # compared with its own runtime's fp32
    assert check_goals(goal_rows, max_prune_loss=2)['pruned']['model'].startswith('90%')
    assert check_goals(goal_rows, min_sparsity=0.95)['pruned'] is None


def test_check_goals_needs_latencies(goal_rows):
    untimed = [{k: v for k, v in r.items() if not k.startswith('s_b')} for r in goal_rows]
    with pytest.raises(ValueError, match='time_rows'): check_goals(untimed)


def test_distilled_student_row(tmp_path):
    "The compression table's distilled-student row (chapter 06): measured like the others, sized against the fp32 teacher, ignored by the goals"
    from bigmodel_nb.cnn import get_trained_cnn
    from bigmodel_nb.concepts import count_parameters
    from bigmodel_nb.pretrain import get_student
    fdls = image_dataloaders('fashion_mnist', valid_pct=0.0, seed=0, limit=600, verbose=False)
    teacher, student = get_trained_cnn(quick=True, verbose=False), get_student(quick=True, verbose=False)
    assert count_parameters(student) <= count_parameters(teacher) / 10
    rows = [measure('fp32', teacher, save_torch(teacher, tmp_path/'fp32.pt'), fdls.test),
            measure('distilled student', student, save_torch(student, tmp_path/'student.pt'), fdls.test, kind='distilled')]
    time_rows(rows, [teacher, student], fdls.test.x[:64], repeats=1, rounds=1)
    add_ratios(rows)
    assert rows[1]['ratio'] < 0.15 and rows[1]['delta'] == pytest.approx(100 * (rows[1]['accuracy'] - rows[0]['accuracy']))
    assert check_goals(rows) == dict(int8=None, pruned=None)  # a distilled row is neither an INT8 nor a pruned candidate
    assert 'distilled student' in compression_table(rows)
