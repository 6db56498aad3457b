"Property tests of `bigmodel_nb.concepts`: every calculator against what torch really builds, runs or allocates."
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigmodel_nb.concepts import (
    KNOWN_CONFIGS, TransformerConfig, TransformerLM, activation_bytes, chinchilla_tokens, compute_optimal,
    count_parameters, default_device, dtype_bytes, forward_flops, model_size_bytes, optimizer_state_bytes, set_seed,
    training_flops, training_memory, transformer_params)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def counted_flops(fn):
    "FLOPs torch's own counter sees while `fn()` runs (attention on the math kernel, so its products are visible)."
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter: fn()
    return counter.get_total_flops()


@st.composite
def transformer_configs(draw):
    n_heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return TransformerConfig(
        vocab_size=draw(st.integers(1, 40)), n_ctx=draw(st.integers(1, 12)), d_model=n_heads * head_dim,
        n_layers=draw(st.integers(1, 3)), n_heads=n_heads, d_ff=draw(st.one_of(st.none(), st.integers(1, 24))),
        tied=draw(st.booleans()), head_bias=draw(st.booleans()), bias=draw(st.booleans()),
        final_norm=draw(st.booleans()), emb_norm=draw(st.booleans()), n_types=draw(st.integers(0, 2)),
        pooler=draw(st.booleans()), pre_norm=draw(st.booleans()))


@FAST
@given(transformer_configs())
def test_transformer_formula_matches_real_model(cfg):
    model = TransformerLM(cfg)
    assert transformer_params(cfg)['total'] == count_parameters(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.n_ctx))
    assert model(tokens).shape == (2, cfg.n_ctx, cfg.vocab_size)


@settings(max_examples=6, deadline=None)
@given(transformer_configs(), st.integers(1, 3))
def test_training_flops_match_flop_counter(cfg, batch):
    "6 N D plus the attention term is exact for a real forward + backward, N being the weights that multiply."
    model = TransformerLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx))
    measured = counted_flops(lambda: model(tokens).sum().backward())
    n = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff) + cfg.vocab_size * cfg.d_model
    assert measured == training_flops(n, tokens.numel(), cfg.n_layers, cfg.n_ctx, cfg.d_model)
    assert measured == 3 * forward_flops(model, tokens)


def test_known_configs():
    published = {'BERT-base': 109_482_240, 'BERT-large': 335_141_888, 'GPT-2 small': 124_439_808,
                 'GPT-2 medium': 354_823_168, 'GPT-2 large': 774_030_080, 'GPT-2 XL': 1_557_611_200}
    for name, n in published.items(): assert transformer_params(KNOWN_CONFIGS[name])['total'] == n
    assert round(transformer_params(KNOWN_CONFIGS['GPT-3 175B'])['total'] / 1e9, 1) == 174.6


def test_heads_do_not_change_the_count():
    counts = {count_parameters(TransformerLM(TransformerConfig(50, 8, 24, 2, h))) for h in (1, 2, 3, 4, 6)}
    assert len(counts) == 1


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(1, 16), st.integers(1, 16), st.booleans())
def test_linear_flops_match_flop_counter(batch_dims, d_in, d_out, bias):
    layer, x = nn.Linear(d_in, d_out, bias=bias), torch.randn(*batch_dims, d_in)
    assert forward_flops(layer, x) == counted_flops(lambda: layer(x)) == 2 * np.prod(batch_dims) * d_in * d_out


@FAST
@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 2), st.integers(0, 2), st.integers(1, 2), st.integers(1, 2), st.data())
def test_conv_flops_match_flop_counter(nd, groups, c_in_per_group, c_out_per_group, kernel, stride, padding, dilation,
                                       batch, data):
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1](groups * c_in_per_group, groups * c_out_per_group, kernel,
                                                     stride=stride, padding=padding, dilation=dilation, groups=groups)
    min_size = max(1, dilation * (kernel - 1) + 1 - 2 * padding)
    spatial = [data.draw(st.integers(min_size, min_size + 5)) for _ in range(nd)]
    x = torch.randn(batch, groups * c_in_per_group, *spatial)
    assert forward_flops(conv, x) == counted_flops(lambda: conv(x))


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6),
       st.booleans(), st.sampled_from([None, 5]))
def test_attention_flops_match_flop_counter(heads, head_dim, batch, L, S, batch_first, kdim):
    E = heads * head_dim
    mha = nn.MultiheadAttention(E, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
    shape = (lambda n: (batch, n)) if batch_first else (lambda n: (n, batch))
    q, k = torch.randn(*shape(L), E), torch.randn(*shape(S), kdim or E)
    assert forward_flops(mha, q, k, k) == counted_flops(lambda: mha(q, k, k, need_weights=False))


def measured(model, opt, x):
    model(x).sum().backward(); opt.step()
    return {'weights': sum(p.numel() * p.element_size() for p in model.parameters()),
            'gradients': sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
            'optimizer': optimizer_state_bytes(opt)}


OPTIMIZERS = {'sgd': lambda ps: torch.optim.SGD(ps, lr=0.1),
              'momentum': lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
              'adam': lambda ps: torch.optim.Adam(ps), 'adamw': lambda ps: torch.optim.AdamW(ps)}


@FAST
@given(st.lists(st.integers(1, 12), min_size=2, max_size=4), st.sampled_from(sorted(OPTIMIZERS)),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), st.booleans())
def test_training_memory_matches_a_real_step(widths, opt_name, dtype, freeze_first):
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])]).to(dtype)
    if freeze_first:
        for p in model[0].parameters(): p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable: return
    real = measured(model, OPTIMIZERS[opt_name](trainable), torch.randn(3, widths[0], dtype=dtype))
    ours = training_memory(model, opt_name)
    assert {k: ours[k] for k in real} == real
    assert ours['total'] == sum(real.values())


def test_adam_state_of_a_tied_transformer():
    "A tied embedding/head is one tensor: one gradient and one pair of Adam moments."
    model = TransformerLM(TransformerConfig(30, 8, 16, 2, 2, tied=True))
    real = measured(model, torch.optim.Adam(model.parameters()), torch.randint(0, 30, (2, 8)))
    assert {k: training_memory(model, 'adam')[k] for k in real} == real


def test_training_memory_from_a_count():
    mem = training_memory(1_000_000, 'adam', 'bf16', activations=123)
    assert mem == {'weights': 2_000_000, 'gradients': 2_000_000, 'optimizer': 4_000_000, 'activations': 123,
                   'total': 8_000_123}
    assert training_memory(10, 'sgd')['total'] == 80


def test_model_size_matches_real_dtypes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert model_size_bytes(model, dtype) == model_size_bytes(model.to(dtype))
    assert model_size_bytes(model, buffers=True) > model_size_bytes(model)


def test_activation_bytes_grow_with_the_batch():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    one = activation_bytes(model, (1, 8))
    assert one == 4 * (8 + 16)  # the input kept by the first Linear, the ReLU output kept for ReLU and the second Linear
    assert activation_bytes(model, (5, 8)) == 5 * one


def test_chinchilla():
    n, d = compute_optimal(training_flops(1e9, chinchilla_tokens(1e9)))
    assert n == pytest.approx(1e9) and d == pytest.approx(2e10)
    assert compute_optimal(6e20, tokens_per_param=10)[1] == pytest.approx(10 * compute_optimal(6e20, 10)[0])


def test_set_seed_repeats_every_generator():
    def draw(): return random.random(), np.random.rand(), torch.rand(3).tolist()
    set_seed(7); a = draw()
    set_seed(7); assert draw() == a
    set_seed(8); assert draw() != a


def test_default_device_order(monkeypatch):
    assert default_device().type in ('cuda', 'mps', 'cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert default_device() == torch.device('cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert default_device() == torch.device('mps')
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert default_device() == torch.device('cpu')


@pytest.mark.parametrize('call, message', [
    (lambda: dtype_bytes('float12'), 'expected a torch.dtype or one of'),
    (lambda: model_size_bytes(-1), 'must be >= 0'),
    (lambda: training_memory(10, 'rmsprop'), 'expected one of sgd, momentum, adam, adamw'),
    (lambda: forward_flops(nn.Conv2d(3, 4, 3), (1, 2, 8, 8)), 'expects inputs of shape (batch, 3, H, W)'),
    (lambda: forward_flops(nn.Conv1d(3, 4, 3), (3, 8, 8, 8)), 'expects inputs of shape (batch, 3, L)'),
    (lambda: forward_flops(nn.Linear(4, 2), (3, 5)), 'last dimension is 4'),
    (lambda: forward_flops(nn.Linear(4, 2), (3, -4)), 'tuple of positive ints'),
    (lambda: forward_flops(nn.Linear(4, 2), 'abc'), 'tuple of positive ints'),
    (lambda: forward_flops(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(0), nn.Unflatten(0, (7, 7))), (1, 1, 6, 6)),
     'could not run on an input of shape (1, 1, 6, 6)'),
    (lambda: TransformerConfig(10, 4, 10, 1, 3), 'must be a multiple of n_heads'),
    (lambda: TransformerConfig(10, 0, 12, 1, 3), 'n_ctx must be >= 1'),
    (lambda: TransformerLM(TransformerConfig(10, 4, 12, 1, 3))(torch.zeros(1, 5, dtype=torch.long)), 'longer than n_ctx=4'),
    (lambda: chinchilla_tokens(-1), 'must be >= 0'),
    (lambda: compute_optimal(-1), 'must be >= 0'),
    (lambda: training_flops(-1, 10), 'must be >= 0'),
])
def test_errors_say_what_was_expected(call, message):
    with pytest.raises(ValueError) as err: call()
    assert message in str(err.value)
