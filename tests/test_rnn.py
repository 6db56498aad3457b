"Tests of bigmodel_nb.rnn (chapter 04): the from-scratch layers against torch.nn, BPTT, the evaluator, sampling, the CLI run"
import json, math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from bigmodel_nb.concepts import check_against
from bigmodel_nb.data import CharTokenizer
from bigmodel_nb.rnn import (GRU, LSTM, RNN, CharLM, CharLMConfig, GRUCell, LSTMCell, RNNCell, RNNFunction, RowClassifier,
                             RowConfig, evaluate_lm, from_torch, generate, gradient_through_time, lm_run)


@pytest.mark.parametrize('cls', [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize('L,bi,bf', [(1, False, True), (2, True, False), (3, True, True)])
def test_layers_equal_torch(cls, L, bi, bf):
    torch.manual_seed(L)
    ref = cls(3, 5, num_layers=L, bidirectional=bi, batch_first=bf).double(); ours = from_torch(ref)
    B, T = 2, 9
    x = torch.randn(*((B, T, 3) if bf else (T, B, 3)), dtype=torch.float64, requires_grad=True)
    h = lambda: torch.randn(L * (2 if bi else 1), B, 5, dtype=torch.float64, requires_grad=True)
    check_against(ours, ref, x, (h(), h()) if cls is nn.LSTM else h(), eps=1e-10,
                  params=(list(ours.parameters()), list(ref.parameters())))


def test_relu_rnn_and_no_bias():
    ref = nn.RNN(4, 6, nonlinearity='relu', bias=False).double(); ours = from_torch(ref)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_packed_equal_torch():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).double(); ours = from_torch(ref)
    x = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True); lengths = torch.tensor([2, 6, 1, 4])
    run = lambda m: lambda x: m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    check_against(run(ours), run(ref), x, eps=1e-10, params=(list(ours.parameters()), list(ref.parameters())))


def test_changed_weight_is_caught():
    ref = nn.GRU(3, 4).double(); ours = from_torch(ref)
    with torch.no_grad(): ours.cells[0].bias_hh[0] += 1e-3
    with pytest.raises(AssertionError, match='differs'):
        check_against(ours, ref, torch.randn(5, 2, 3, dtype=torch.float64), eps=1e-10)


def test_bad_input_and_state():
    m = LSTM(4, 6, batch_first=True)
    with pytest.raises(ValueError, match=r'expected input \(B, T, input_size\) with input_size=4, got \(2, 5, 3\)'): m(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match='a pair'): m(torch.randn(2, 5, 4), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match=r'\(1, 2, 6\)'): GRU(4, 6, batch_first=True)(torch.randn(2, 5, 4), torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match='proj_size'): from_torch(nn.LSTM(4, 6, proj_size=3))
    with pytest.raises(ValueError, match='dropout'): from_torch(nn.RNN(4, 6, num_layers=2, dropout=0.5))


def test_bptt_by_hand():
    torch.manual_seed(0)
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 12, 4), (3, 5), (5, 4), (5, 5), (5,))]
    def ref(x, h, wi, wh, b):
        hs = []
        for t in range(x.shape[1]): h = torch.tanh(x[:, t] @ wi.T + h @ wh.T + b); hs.append(h)
        return torch.stack(hs, 1)
    check_against(RNNFunction.apply, ref, *args, eps=1e-10)


def test_gradient_through_time_fades_for_rnn():
    torch.manual_seed(0)
    g = gradient_through_time(RNNCell(8, 16), torch.randn(4, 40, 8))
    assert g.shape == (40,) and g[-2] > 100 * g[0]


def _tiny_lm(vocab=11, arch='lstm'):
    torch.manual_seed(0)
    return CharLM(CharLMConfig(vocab_size=vocab, arch=arch, hidden=16, emb=8)).eval()


@pytest.mark.parametrize('arch', ['rnn', 'lstm', 'gru'])
def test_evaluate_lm_recurrent_equals_one_pass(arch):
    m = _tiny_lm(arch=arch); ids = torch.randint(0, 11, (1200,))
    direct = F.cross_entropy(m(ids[None, :-1])[0], ids[1:]).item()
    assert abs(evaluate_lm(m, ids, chunk=97) - direct) < 1e-5


def test_evaluate_lm_sliding_scores_each_target_once():
    class Counting(nn.Module):  # uniform logits: every scored target costs log V, so the mean is log V exactly
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(1)); self.seen = 0
        def forward(self, x): self.seen += x.numel(); return torch.zeros(*x.shape, 7) + self.w
    ids = torch.randint(0, 7, (1001,))
    m = Counting()
    assert abs(evaluate_lm(m, ids, context=64, stride=16) - math.log(7)) < 1e-6
    assert m.seen >= 1000 * 64 / 16 * 0.9  # windows every 16 characters


def test_generate():
    tok = CharTokenizer("abcdefghij ")
    m = _tiny_lm(tok.vocab_size)
    a = generate(m, tok, "ab", n=20, seed=3)
    assert len(a) == 22 and a == generate(m, tok, "ab", n=20, seed=3)
    greedy = generate(m, tok, "ab", n=20, top_k=1, seed=1)
    assert greedy == generate(m, tok, "ab", n=20, top_k=1, seed=2)  # top-1 is argmax, whatever the seed
    assert greedy == generate(m, tok, "ab", n=20, temperature=1e-4, seed=5)
    with pytest.raises(ValueError, match='temperature must be > 0'): generate(m, tok, "ab", temperature=-1)
    with pytest.raises(ValueError, match=r"'XZ' \(2\)"): generate(m, tok, "aXZ", n=1)


def test_row_classifier_shapes():
    m = RowClassifier(RowConfig(arch='gru', hidden=8, bidirectional=False))
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match=r'got \(3, 28\)'): m(torch.randn(3, 28))


def test_lm_run_quick(tmp_path):
    run = lm_run(tmp_path, arch='gru', quick=True, log=lambda *a: None)
    m = json.loads((run/'metrics.json').read_text())
    vocab = len(json.loads((run/'package'/'tokenizer.json').read_text())['vocab'])
    assert m['arch'] == 'gru' and m['quick'] and m['valid_nats'] < math.log(vocab) and m['curve']
    assert (run/'curve.png').read_bytes()[:4] == b'\x89PNG'
    assert 'ROMEO:' in (run/'samples.txt').read_text()
    from bigmodel_nb.deploy import load_package
    p = load_package(run/'package')
    assert p.logits("ROMEO: hello").shape[-1] == vocab
    with pytest.raises(ValueError, match='minutes must be > 0'): lm_run(tmp_path, minutes=0)
