"Chapter 06a (bigmodel_nb.finetune) checked from outside the notebook: masking statistics, the play split, LoRA against peft, errors."
import copy, math, time

import pytest
import torch
import torch.nn as nn
from fastcore.test import test_close as close
from peft import LoraConfig, inject_adapter_in_model

from bigmodel_nb.attention import Encoder, GPT
from bigmodel_nb.concepts import TransformerConfig, count_parameters
from bigmodel_nb.data import SHAKESPEARE_SPLIT_CHARS, load_shakespeare, shakespeare_split
from bigmodel_nb.finetune import (PLAYS, LoRALinear, MaskedLMLoader, PassageClassifier, add_lora, bert_mask, few_shot,
                                  fine_tune, get_pretrained, merge_lora, mlm_encoder, play_passages, play_spans,
                                  pretrained_path, summarize)


@pytest.fixture(scope='module')
def split(): return shakespeare_split(verbose=False)


@pytest.fixture(scope='module')
def text(): return load_shakespeare(verbose=False)


@pytest.fixture(scope='module')
def data(split, text): return play_passages(split.tokenizer, text)


def test_bert_mask_statistics_on_a_million_characters(split, text):
    V = split.tokenizer.vocab_size
    ids = split.tokenizer.encode(text[:1_000_000]).reshape(1000, 1000)
    x, y = bert_mask(ids, V, V, 0.15, torch.Generator().manual_seed(123))
    chosen = y != -100
    n_all, n = ids.numel(), int(chosen.sum())
    for share, count, q in [(chosen.float().mean().item(), n_all, 0.15), ((x[chosen] == V).float().mean().item(), n, 0.8),
                            (((x != ids) & (x != V))[chosen].float().mean().item(), n, 0.1 * (1 - 1 / V)),
                            ((x == ids)[chosen].float().mean().item(), n, 0.1 + 0.1 / V)]:
        assert abs(share - q) <= 5 * math.sqrt(q * (1 - q) / count), (share, q)
    assert torch.equal(y[chosen], ids[chosen]) and torch.equal(x[~chosen], ids[~chosen])
    x2, y2 = bert_mask(ids, V, V, 0.15, torch.Generator().manual_seed(123))
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize('kw,msg', [(dict(ids=torch.tensor([[1, 77]])), 'token id 77 is outside the vocabulary 0..76'),
                                    (dict(ids=torch.tensor([-3])), 'token id -3 is outside'),
                                    (dict(p=0.), 'must be in (0, 1)'), (dict(p=1.), 'must be in (0, 1)'), (dict(p=-0.2), 'must be in (0, 1)'),
                                    (dict(mask_id=5), 'give MASK a new id'), (dict(ids=torch.rand(3)), 'expected an integer tensor')])
def test_bert_mask_bad_input(kw, msg):
    args = dict(ids=torch.tensor([[1, 2, 3]]), vocab_size=77, mask_id=77, p=0.15, **{})
    args.update(kw)
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('.', r'\.')):
        bert_mask(args['ids'], args['vocab_size'], args['mask_id'], args['p'])


def test_masked_loader_fixed_and_fresh(split):
    from bigmodel_nb.data import char_lm_dataloaders
    dls = char_lm_dataloaders(split, seq_len=16, batch_size=2)
    V = split.tokenizer.vocab_size
    fixed = MaskedLMLoader(dls.valid, V, fixed=True)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(fixed)), next(iter(fixed))))
    assert len(fixed) == len(dls.valid)


def test_plays_are_beyond_the_pretraining_text_and_the_split_has_no_overlap(split, text, data):
    spans = play_spans(text)
    assert len(spans) == 37
    assert all(spans[p][0] >= SHAKESPEARE_SPLIT_CHARS for p in PLAYS)
    assert not any(text[s:e].strip() in split.train + split.valid for s, e in list(data.test_spans[:50].tolist()))
    sp = torch.cat([data.train_spans, data.test_spans])
    sp = sp[sp[:, 0].argsort()]
    assert (sp[1:, 0] >= sp[:-1, 1]).all()  # no character in two passages, train or test
    tok = split.tokenizer
    train_text = {tok.decode(x) for x in data.train_x}
    assert not any(tok.decode(x) in train_text for x in data.test_x)
    for (a, b), x in zip(data.test_spans[::50].tolist(), data.test_x[::50]): assert tok.decode(x) == text[a:b]
    assert sorted(torch.unique(data.test_y).tolist()) == list(range(len(PLAYS)))
    # about a fifth of each play is test
    for c in range(len(PLAYS)):
        share = (data.test_y == c).sum() / ((data.test_y == c).sum() + (data.train_y == c).sum())
        assert 0.18 < share < 0.22


def test_play_passages_bad_input(split, text):
    with pytest.raises(ValueError, match='no play titled'): play_passages(split.tokenizer, text, plays=('HAMLET',))
    with pytest.raises(ValueError, match='non-empty proper subset'): play_passages(split.tokenizer, text, test_blocks=tuple(range(10)))
    with pytest.raises(ValueError, match='found no'): play_spans('plain text')
    with pytest.raises(ValueError, match='fewer than k'): few_shot(torch.tensor([0, 0, 1]), 2)


def _peft_linear(ours):
    ref = inject_adapter_in_model(LoraConfig(r=ours.rank, lora_alpha=ours.alpha, target_modules=['0'], lora_dropout=0.),
                                  nn.Sequential(copy.deepcopy(ours.base)))
    with torch.no_grad(): ref[0].lora_A['default'].weight.copy_(ours.A); ref[0].lora_B['default'].weight.copy_(ours.B)
    return ref, [ref[0].lora_A['default'].weight, ref[0].lora_B['default'].weight]


@pytest.mark.parametrize('n_in,n_out,rank,alpha,bias', [(5, 3, 1, 1., True), (16, 12, 4, 8., False), (64, 192, 16, 8., True),
                                                        (24, 40, 24, 48., True)])
def test_lora_linear_matches_peft(n_in, n_out, rank, alpha, bias):
    torch.manual_seed(rank)
    ours = LoRALinear(nn.Linear(n_in, n_out, bias=bias).double(), rank, alpha)
    with torch.no_grad(): ours.B.normal_()
    ref, ab = _peft_linear(ours)
    x = torch.randn(3, 7, n_in, dtype=torch.float64, requires_grad=True)
    y1, y2 = ours(x), ref(x)
    close(y1, y2, eps=1e-10)
    g = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, [x, ours.A, ours.B], g), torch.autograd.grad(y2, [x] + ab, g)): close(a, b, eps=1e-10)
    m = ours.merged()
    close(m(x), y1, eps=1e-10)


@pytest.mark.parametrize('cls,rank', [(Encoder, 2), (GPT, 6)])
def test_add_lora_model_matches_peft_and_merges(cls, rank):
    torch.manual_seed(0)
    plain = cls(TransformerConfig(vocab_size=30, n_ctx=12, d_model=24, n_layers=2, n_heads=2, positions='rotary')).double()
    ours = add_lora(copy.deepcopy(plain), rank, 4.)
    ref = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=4., target_modules=['qkv', 'out'], lora_dropout=0.), copy.deepcopy(plain))
    a1, a2 = [], []
    for m, m2 in zip([m for m in ours.modules() if isinstance(m, LoRALinear)], [m for m in ref.modules() if hasattr(m, 'lora_A')]):
        nn.init.normal_(m.B)
        with torch.no_grad(): m2.lora_A['default'].weight.copy_(m.A); m2.lora_B['default'].weight.copy_(m.B)
        a1 += [m.A, m.B]; a2 += [m2.lora_A['default'].weight, m2.lora_B['default'].weight]
    assert len(a1) == 8 and count_parameters(ours, trainable_only=True) == 2 * rank * (24 + 72 + 24 + 24)
    ids = torch.randint(0, 30, (2, 12))
    y1, y2 = ours(ids), ref(ids)
    close(y1, y2, eps=1e-10)
    g = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, a1, g), torch.autograd.grad(y2, a2, g)): close(a, b, eps=1e-10)
    merged = merge_lora(ours)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    close(merged(ids), y1, eps=1e-10)


def test_lora_bad_input():
    lin = nn.Linear(8, 6)
    for r in (0, -1, 7, 2.0, True):
        with pytest.raises(ValueError, match='rank must be an integer in 1..6'): LoRALinear(lin, r)
    with pytest.raises(ValueError, match='wraps an nn.Linear'): LoRALinear(nn.Embedding(3, 3), 1)
    enc = mlm_encoder(10, seed=0)
    with pytest.raises(ValueError, match='no nn.Linear named'): add_lora(enc, 2, targets=('nope',))
    with pytest.raises(ValueError, match='rank must be an integer in 1..128'): add_lora(enc, 129)
    assert all(p.requires_grad for p in enc.parameters())  # refused: nothing frozen
    with pytest.raises(ValueError, match='no LoRALinear'): merge_lora(enc)


def test_fine_tune_counts_and_leaves_the_backbone_alone(split, data):
    V = split.tokenizer.vocab_size
    torch.manual_seed(0)
    bb = Encoder(TransformerConfig(vocab_size=V + 1, n_ctx=64, d_model=32, n_layers=1, n_heads=2, positions='rotary', bias=False))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    small = copy.copy(data); small.test_x, small.test_y = data.test_x[::40], data.test_y[::40]
    rows = []
    for method, rank, trainable in [('full', None, count_parameters(bb) + 32 * 5 + 5), ('lora', 2, 2 * (32 + 96 + 32 + 32) + 165),
                                    ('linear', None, 165)]:
        model, row = fine_tune(bb, small, 2, method, rank, steps=2, batch_size=4)
        assert row['trainable'] == trainable and row['test_passages'] == len(small.test_y) and 0 <= row['accuracy'] <= 1
        assert isinstance(model, PassageClassifier)
        rows.append(row)
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in before.items())
    assert [r['model'] for r in summarize(rows)] == ['full', 'lora r=2', 'linear']
    with pytest.raises(ValueError, match="method must be one of"): fine_tune(bb, small, 2, 'prefix')
    with pytest.raises(ValueError, match="pass rank with method 'lora'"): fine_tune(bb, small, 2, 'lora')


def test_get_pretrained_caches(split, tmp_path, monkeypatch):
    monkeypatch.setenv('BIGMODEL_NB_CACHE', str(tmp_path))
    tiny = type(split)(train=split.train[:20_000], valid=split.valid[:3_000], tokenizer=split.tokenizer, source='test')
    m = get_pretrained('mlm', tiny, 1., quick=True)
    assert pretrained_path('mlm', quick=True).is_file() and not pretrained_path('mlm').exists()
    assert m.cfg.vocab_size == split.tokenizer.vocab_size + 1
    assert m.info['model'] == 'encoder (masked LM)' and m.info['split_chars'] == 23_000 and m.info['valid_masked_nats'] > 0
    t = time.perf_counter(); again = get_pretrained('mlm', tiny, 60., quick=True); assert time.perf_counter() - t < 30  # loaded, not trained for 60 s
    ids = torch.randint(0, 78, (1, 20))
    with torch.no_grad(): assert torch.equal(again(ids), m(ids))
    with pytest.raises(ValueError, match='must be one of'): pretrained_path('bert')
