"Chapter 05 (bigmodel_nb.attention) checked from outside the notebook: references, shapes, errors."
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigmodel_nb.attention import (GPT, AdditiveAttention, Encoder, MultiHeadAttention, Rotary, attention,
                                   blocked_attention, build_lm, causal_mask, merge_masks, mha_from_torch,
                                   scratch_attention, sinusoidal_positions)
from bigmodel_nb.concepts import (TransformerConfig, architecture_of, build_architecture, check_against,
                                  count_parameters, forward_flops, transformer_params)


def qkv(B, H, L, S, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g, dtype=torch.float64, requires_grad=True) for n in (L, S, S)]


def sdpa(mask=None, causal=False):
    def f(q, k, v):
        m = merge_masks(mask, causal_mask(q.shape[-2], k.shape[-2])) if causal and mask is not None else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal and mask is None)
    return f


@pytest.mark.parametrize('shape,causal', [((1, 1, 1, 1, 2), False), ((2, 3, 6, 9, 4), False), ((2, 2, 9, 9, 8), True),
                                          ((1, 2, 9, 4, 8), True)])
def test_scratch_and_library_attention_match_sdpa(shape, causal):
    check_against(lambda q, k, v: scratch_attention(q, k, v, causal=causal)[0], sdpa(None, causal), *qkv(*shape), eps=1e-12)
    check_against(lambda q, k, v: attention(q, k, v, causal=causal)[0], sdpa(None, causal), *qkv(*shape), eps=1e-12)


def test_masks_bool_float_and_padding():
    pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    for m in (pad, torch.randn(2, 1, 4, 5, dtype=torch.float64)):
        for causal in (False, True):
            check_against(lambda q, k, v: attention(q, k, v, m, causal)[0], sdpa(m, causal), *qkv(2, 2, 4, 5, 8), eps=1e-12)


@pytest.mark.parametrize('bad,msg', [(torch.ones(4, 5, dtype=torch.int32), 'got torch.int32'),
                                     (torch.ones(3, 5, dtype=torch.bool), 'L=4, S=5'), ([[1]], 'got list')])
def test_bad_masks(bad, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(')): attention(*qkv(1, 1, 4, 5, 2), mask=bad)


def test_mha_matches_torch_outputs_weights_and_weight_gradients():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(12, 3, batch_first=True).double()
    ours = mha_from_torch(ref)
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(2, n, 12, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6)]
    kpm, am = torch.tensor([[False] * 6, [False] * 5 + [True]]), ~causal_mask(4, 6)
    check_against(lambda q, k, v: ours(q, k, v, kpm, am, need_weights=True),
                  lambda q, k, v: ref(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=False), *x, eps=1e-10)
    out = ours(*x, kpm, am)[0].sum(); out.backward()
    ref(*x, key_padding_mask=kpm, attn_mask=am)[0].sum().backward()
    torch.testing.assert_close(torch.cat([ours.q.weight.grad, ours.k.weight.grad, ours.v.weight.grad]), ref.in_proj_weight.grad)
    torch.testing.assert_close(ours.out.weight.grad, ref.out_proj.weight.grad)


def test_mha_errors():
    with pytest.raises(ValueError, match='divisible'): MultiHeadAttention(10, 4)
    m, x = MultiHeadAttention(8, 2), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r'key_padding_mask: expected shape \(1, 3\)'): m(x, x, x, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))


def test_additive_attention_against_float64_formula():
    torch.manual_seed(0)
    m = AdditiveAttention(3, 2, 4).double()
    q, k, v = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    s = torch.einsum('h,blsh->bls', m.w.weight[0], torch.tanh((q @ m.W_q.weight.T)[:, :, None] + (k @ m.W_k.weight.T)[:, None]))
    w = s.masked_fill(pad[:, None], -math.inf).softmax(-1)
    out, weights = m(q, k, v, pad)
    torch.testing.assert_close(weights, w); torch.testing.assert_close(out, w @ v)
    assert weights[1, :, 3:].abs().max() == 0


@pytest.mark.parametrize('shape,causal,bq,bk', [((1, 2, 13, 13, 8), True, 4, 5), ((2, 1, 7, 11, 4), False, 3, 4),
                                                ((1, 1, 11, 6, 4), True, 4, 4), ((1, 3, 40, 40, 16), True, 16, 8)])
def test_blocked_attention_matches_sdpa(shape, causal, bq, bk):
    check_against(lambda q, k, v: blocked_attention(q, k, v, causal, bq, bk), sdpa(None, causal), *qkv(*shape), eps=1e-12)


def test_blocked_attention_float32_large_scores():
    q, k, v = torch.randn(1, 2, 50, 8) * 40, torch.randn(1, 2, 50, 8) * 40, torch.randn(1, 2, 50, 8)
    torch.testing.assert_close(blocked_attention(q, k, v, True, 16, 16), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-4, rtol=1e-4)


def test_positions():
    pe = sinusoidal_positions(10, 6)
    torch.testing.assert_close(pe[2, 4:], torch.tensor([math.sin(2 / 10000 ** (4 / 6)), math.cos(2 / 10000 ** (4 / 6))]))
    rot = Rotary(8, 32).double()
    q, k = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)
    s = lambda m, n: (rot(q, m) * rot(k, n)).sum().item()
    assert abs(s(7, 2) - s(27, 22)) < 1e-6 and abs(s(7, 2) - s(7, 3)) > 1e-6


CONFIGS = [TransformerConfig(65, 64, 128, 4, 4, bias=False), TransformerConfig(33, 10, 24, 2, 3, positions='rotary', tied=False),
           TransformerConfig(17, 9, 16, 3, 2, d_ff=20, positions='sinusoidal', head_bias=True),
           TransformerConfig(40, 12, 32, 2, 4, emb_norm=True, n_types=2, pooler=True, pre_norm=False, final_norm=False, positions='none')]


@pytest.mark.parametrize('cfg', CONFIGS)
def test_parameter_count_matches_transformer_params(cfg):
    for cls in (GPT, Encoder): assert count_parameters(cls(cfg)) == transformer_params(cfg)['total']


def test_flops_match_flop_counter():
    m, ids = GPT(CONFIGS[1]), torch.randint(0, 33, (3, 10))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c: m(ids)
    assert forward_flops(m, ids) == c.get_total_flops()


@pytest.mark.parametrize('positions', ['learned', 'rotary', 'sinusoidal'])
def test_kv_cache_equals_full_forward(positions):
    torch.manual_seed(0)
    m = GPT(TransformerConfig(21, 8, 16, 2, 2, positions=positions)).eval()
    ids = torch.randint(0, 21, (2, 11))
    with torch.no_grad():
        logits, st = m.step(ids[:, :3]); out = [logits]
        for t in range(3, 8): logits, st = m.step(ids[:, t:t + 1], st); out.append(logits)
        torch.testing.assert_close(torch.cat(out, 1), m(ids[:, :8]), atol=1e-5, rtol=1e-5)
        for t in range(8, 11):  # the window slides
            logits, st = m.step(ids[:, t:t + 1], st)
            torch.testing.assert_close(logits[:, -1], m(ids[:, t - 7:t + 1])[:, -1], atol=1e-5, rtol=1e-5)


def test_model_errors_and_registry():
    m = GPT(TransformerConfig(10, 6, 8, 1, 2))
    with pytest.raises(ValueError, match='longer than the context n_ctx=6'): m(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match='token id 10 is outside the vocabulary'): m(torch.tensor([[10]]))
    with pytest.raises(ValueError, match='int64 token ids'): m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match='bool tensor of shape'): Encoder(m.cfg)(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="expected one of"): build_lm('transformer-xl')
    twin = build_architecture(architecture_of(m)); twin.load_state_dict(m.state_dict())
    ids = torch.randint(0, 10, (2, 6))
    torch.testing.assert_close(twin(ids), m(ids))
    assert count_parameters(build_lm('nanogpt')) == transformer_params(build_lm('nanogpt').cfg)['total']
