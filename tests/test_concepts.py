"Property tests of `bigmodel_nb.concepts`: every calculator against what torch really builds, runs or allocates."
import json, random, signal, subprocess, sys, textwrap, time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import torch.nn.functional as F

import bigmodel_nb
import bigmodel_nb.concepts as concepts
from bigmodel_nb.concepts import (
    ARCHITECTURES, KNOWN_CONFIGS, TransformerConfig, TransformerLM, activation_bytes, architecture_of, atomic_write,
    build_architecture, check_against, chinchilla_tokens, compute_optimal, count_parameters, cpu_name, default_device,
    dtype_bytes, forward_flops, interleaved_rounds, machine_info, markdown_table, model_size_bytes,
    optimizer_state_bytes, register_architecture, set_seed, time_calls, time_stats, torch_threads, training_flops,
    training_memory, transformer_params)

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


# --- the tools every chapter uses ------------------------------------------------------------------------------------

def test_check_against_passes_on_the_same_function_and_catches_a_wrong_output():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = check_against(torch.tanh, lambda x: torch.tanh(x), x)
    assert torch.equal(out, torch.tanh(x))
    with pytest.raises(AssertionError, match=r'output 0 differs from the reference: max \|Δ\| = '):
        check_against(lambda x: torch.tanh(x) + 1e-6, torch.tanh, x)
    with pytest.raises(AssertionError, match='ours returned 2 tensors, the reference 1'):
        check_against(lambda x: (torch.tanh(x), x), torch.tanh, x)
    with pytest.raises(AssertionError, match=r"output 0: shape \(4, 5\), the reference's \(5, 4\)"):
        check_against(torch.tanh, lambda x: torch.tanh(x).T, x)


def test_check_against_catches_a_wrong_input_gradient():
    "The same values, but a gradient off by 1e-4 per element: only the backward check can see it."
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    wrong = lambda x: torch.tanh(x) + (x - x.detach()) * 1e-4
    with pytest.raises(AssertionError, match='gradient of input 0 differs'): check_against(wrong, torch.tanh, x)
    # of two inputs, the second one's gradient is wrong, and the message says which
    y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(AssertionError, match='gradient of input 1 differs'):
        check_against(lambda a, b: a * b + (b - b.detach()) * 1e-4, lambda a, b: a * b, x, y)


def test_check_against_catches_a_wrong_parameter_gradient():
    torch.manual_seed(0)
    ours, ref = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, dtype=torch.float64)
    params = (list(ours.parameters()), list(ref.parameters()))
    check_against(ours, ref, x, params=params)
    def bad(x):  # the same outputs, but the weight's gradient is 1.001 times what it should be
        return F.linear(x, ours.weight * 1.001 - ours.weight.detach() * 0.001, ours.bias)
    with pytest.raises(AssertionError, match='gradient of parameter 0 differs'): check_against(bad, ref, x, params=params)
    check_against(bad, ref, x)  # without `params` the weights' gradients are not compared: it passes
    with pytest.raises(AssertionError, match='2 parameters of ours to compare with 1 of the reference'):
        check_against(ours, ref, x, params=(params[0], params[1][:1]))
    with torch.no_grad(): ours.bias.zero_(); ref.bias.zero_()
    with pytest.raises(AssertionError, match='gradient of parameter 1: ours has none'):  # ours forgot the bias
        check_against(lambda x: F.linear(x, ours.weight), ref, x, params=params)
    ref.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r'parameters \[0\] of the reference do not require grad'):
        check_against(ours, ref, x, params=params)


def test_time_calls_and_stats():
    ts = time_calls(lambda: time.sleep(0.001), repeats=4, warmup=0)
    assert len(ts) == 4 and all(t >= 0.001 for t in ts)
    s = time_stats([4., 1., 3., 2.])
    assert (s['median'], s['min'], s['mean'], s['n']) == (2.5, 1., 2.5, 4)
    with pytest.raises(ValueError, match='repeats must be at least 1'): time_calls(lambda: 0, repeats=0)


def test_interleaved_rounds_order():
    "Each contender goes first and last equally often: the order rotates, and reverses after a full rotation."
    log = []
    runners = {n: (lambda n=n: log.append(n)) for n in 'abc'}
    times = interleaved_rounds(runners, rounds=6, repeats=1, warmup=0)
    rounds = [log[i:i + 3] for i in range(0, 18, 3)]
    assert rounds == [list('abc'), list('bca'), list('cab'), list('cba'), list('acb'), list('bac')]
    for pos in range(3): assert sorted(r[pos] for r in rounds) == list('aabbcc')
    assert {n: len(v) for n, v in times.items()} == {'a': 6, 'b': 6, 'c': 6}
    # repeats and warm-up calls happen within the turn: a turn is warmup + repeats calls in a row
    log.clear(); interleaved_rounds(runners, rounds=2, repeats=2, warmup=1)
    assert log == list('aaabbbccc') + list('bbbcccaaa')
    with pytest.raises(ValueError, match='no contenders'): interleaved_rounds({})


def test_interleaved_rounds_setups_are_not_timed():
    made = []
    def setup(): time.sleep(0.1); made.append(1); return len(made)
    got = []
    times = interleaved_rounds({'x': got.append}, rounds=2, repeats=2, warmup=0, setups={'x': setup})
    assert got == [1, 2, 3, 4]  # each call got its own set-up's result
    assert max(times['x']) < 0.05  # the 0.1 s set-ups are not in the times


def test_torch_threads_restores():
    before = torch.get_num_threads(); other = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with torch_threads(other):
            assert torch.get_num_threads() == other
            raise RuntimeError('boom')
    assert torch.get_num_threads() == before


def test_markdown_table():
    rows = [dict(model='LeNet', params=61706, acc=0.8978, note=None), dict(model='a | b', acc=0.5, note='x', params=7)]
    t = markdown_table(rows, headers={'acc': 'accuracy (%)'}, fmt={'acc': lambda v: f'{100 * v:.1f}'})
    assert t.splitlines() == ['| model | params | accuracy (%) | note |',
                              '|---|---:|---:|---|',
                              '| LeNet | 61,706 | 89.8 | – |',
                              '| a \\| b | 7 | 50.0 | x |']
    assert markdown_table(rows, columns=['acc', 'model']).splitlines()[2] == '| 0.8978 | LeNet |'
    assert markdown_table([dict(ok=True, t=1.23456e-5)], fmt={'t': '.2e'}).splitlines()[2] == '| True | 1.23e-05 |'


def test_atomic_write_sigkill_mid_write_keeps_the_old_file(tmp_path):
    "A process killed with SIGKILL while it writes (no cleanup runs at all) leaves the old file whole."
    target = tmp_path / 'model.bin'
    with atomic_write(target) as tmp: tmp.write_bytes(b'old' * 1000)
    code = textwrap.dedent(f'''
        import sys, time
        from bigmodel_nb.concepts import atomic_write
        with atomic_write({str(target)!r}) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'new' * 500); f.flush()
                print('half written', flush=True)
                time.sleep(60)  # killed here
                f.write(b'new' * 500)
    ''')
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == 'half written'
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None: p.kill()
    assert target.read_bytes() == b'old' * 1000
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != target)
    assert len(leftovers) == 1 and leftovers[0].startswith('.model.tmp-') and leftovers[0].endswith('.bin')
    assert (tmp_path / leftovers[0]).read_bytes() == b'new' * 500  # the half-written temporary file


def test_atomic_write_exception_and_nothing_written(tmp_path):
    target = tmp_path / 'a.txt'
    target.write_text('old')
    with pytest.raises(RuntimeError, match='boom'):
        with atomic_write(target) as tmp: tmp.write_text('half'); raise RuntimeError('boom')
    with pytest.raises(FileNotFoundError, match='nothing was written'):
        with atomic_write(target) as tmp: pass
    assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['a.txt']
    with atomic_write(tmp_path / 'new' / 'b.txt') as tmp: tmp.write_text('b')  # the folder is made
    assert (tmp_path / 'new' / 'b.txt').read_text() == 'b'


def test_atomic_write_replaces_a_folder_with_a_folder(tmp_path):
    pkg = tmp_path / 'pkg'
    with atomic_write(pkg) as tmp:
        tmp.mkdir(); (tmp / 'weights').write_text('1'); (tmp / 'sub').mkdir(); (tmp / 'sub' / 'x').write_text('x')
    assert sorted(p.name for p in pkg.iterdir()) == ['sub', 'weights']
    with atomic_write(pkg) as tmp: tmp.mkdir(); (tmp / 'model.onnx').write_text('2')
    assert [p.name for p in pkg.iterdir()] == ['model.onnx']  # nothing of the old folder remains inside
    assert [p.name for p in tmp_path.iterdir()] == ['pkg']  # nor beside it (no .old- or .tmp- folder)
    with pytest.raises(RuntimeError):
        with atomic_write(pkg) as tmp: tmp.mkdir(); (tmp / 'half').write_text('3'); raise RuntimeError
    assert [p.name for p in pkg.iterdir()] == ['model.onnx'] and [p.name for p in tmp_path.iterdir()] == ['pkg']


def test_machine_info_names_the_cpu_model(monkeypatch):
    info = Path('/proc/cpuinfo')
    if info.exists() and 'model name' in info.read_text():  # this machine: the real model name
        model = next(l.split(':', 1)[1].strip() for l in info.read_text().splitlines() if l.startswith('model name'))
        assert cpu_name() == model and machine_info().startswith(model + ', ')
    fake = 'processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000 @ 3.00GHz\nflags\t\t: fpu\n'
    monkeypatch.setattr(concepts, 'Path', lambda p: SimpleNamespace(read_text=lambda: fake))
    assert cpu_name() == 'Test CPU 9000 @ 3.00GHz'
    info = machine_info()
    assert info.startswith('Test CPU 9000 @ 3.00GHz, ') and f'torch {torch.__version__}' in info
    # no model name (some ARM kernels) or no /proc/cpuinfo at all: the processor or architecture, never empty
    monkeypatch.setattr(concepts.platform, 'system', lambda: 'Linux')
    monkeypatch.setattr(concepts.platform, 'processor', lambda: '')
    monkeypatch.setattr(concepts.platform, 'machine', lambda: 'aarch64')
    monkeypatch.setattr(concepts, 'Path', lambda p: SimpleNamespace(read_text=lambda: 'processor\t: 0\nBogoMIPS\t: 50\n'))
    assert cpu_name() == 'aarch64'
    def missing(): raise FileNotFoundError('/proc/cpuinfo')
    monkeypatch.setattr(concepts, 'Path', lambda p: SimpleNamespace(read_text=missing))
    assert cpu_name() == 'aarch64'


def test_registry_round_trip():
    cfg = TransformerConfig(40, 6, 8, 1, 2, tied=False)
    model = TransformerLM(cfg)
    arch = architecture_of(model)
    assert arch == {'name': 'TransformerLM', 'module': 'bigmodel_nb.concepts', 'config': json.loads(json.dumps(arch['config']))}
    twin = build_architecture(json.loads(json.dumps(arch)))  # through JSON, as a package stores it
    assert type(twin) is TransformerLM and twin.cfg == cfg and twin is not model
    twin.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 40, (2, 6))
    assert torch.equal(twin(tokens), model(tokens))


def test_registry_imports_the_defining_module(tmp_path, monkeypatch):
    "A name not registered yet is found by importing its library module; nothing outside the library is imported."
    (tmp_path / '_test_arch.py').write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from torch import nn
        from bigmodel_nb.concepts import register_architecture
        @dataclass
        class TinyConfig: width: int = 3
        class Tiny(nn.Linear):
            def __init__(self, cfg): super().__init__(cfg.width, 1); self.cfg = cfg
        register_architecture(Tiny, TinyConfig, name='TinyArch')
    '''))
    monkeypatch.setattr(bigmodel_nb, '__path__', [*bigmodel_nb.__path__, str(tmp_path)])
    try:
        assert 'TinyArch' not in ARCHITECTURES
        m = build_architecture({'name': 'TinyArch', 'module': 'bigmodel_nb._test_arch', 'config': {'width': 5}})
        assert type(m).__name__ == 'Tiny' and m.in_features == 5
    finally:
        ARCHITECTURES.pop('TinyArch', None); sys.modules.pop('bigmodel_nb._test_arch', None)
    assert 'this' not in sys.modules
    with pytest.raises(ValueError, match="unknown architecture 'Zen'"): build_architecture({'name': 'Zen', 'module': 'this'})
    assert 'this' not in sys.modules  # a module outside the library is never imported


def test_registry_errors():
    with pytest.raises(TypeError, match='is not a dataclass'): register_architecture(nn.Linear, dict)
    with pytest.raises(TypeError, match='Linear is not a registered architecture'): architecture_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown architecture 'Nope'"): build_architecture({'name': 'Nope'})
    with pytest.raises(ValueError, match='unknown architecture None'): build_architecture('TransformerLM')
    with pytest.raises(ValueError, match='does not fit TransformerConfig'):
        build_architecture({'name': 'TransformerLM', 'config': {'vocab_size': 10}})
    with pytest.raises(ValueError, match='cannot be imported'):
        build_architecture({'name': 'Gone', 'module': 'bigmodel_nb.no_such_chapter'})
