"""Correctness of model.py against slow, obvious references: the naive path for attention,
full-context forwards for the KV cache. Run: python -m pytest -q"""

import contextlib
import itertools
import math
import os
import re
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import cpu_matvec
import model
import sampling
import split_decode
from gpu_check import OpCounter
from conftest import run
from model import GPT, GPTConfig, CacheView, KVCache

W = 16  # window of the small test models
REGIMES = model.REGIMES


def small_config(regime, **kw):
    window, rank = model.regime_settings(regime, W, 4)
    args = dict(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32,
                dar_window=window, dar_rank=rank, rotary_pct=0.5)
    return GPTConfig(**{**args, **kw})


def make_model(regime, seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(small_config(regime, **kw))
    if m.config.has_latents and m.config.dar_maps == 'free':  # move the up maps off U = A^T: the general case
        with torch.no_grad():
            for block in m.transformer.h:
                block.attn.up_k.add_(0.3 * torch.randn_like(block.attn.up_k))
                block.attn.up_v.add_(0.3 * torch.randn_like(block.attn.up_v))
    return m


@pytest.fixture(autouse=True)
def small_fused_block(monkeypatch):
    # Blocks of 8 queries: the test lengths span several blocks and cross the window inside one.
    monkeypatch.setitem(model.FUSED_BLOCK, 'cpu', 8)


@pytest.fixture
def aot_eager_compile(monkeypatch):
    # torch.compile traces as for inductor, without its code generation (the decode-step test reads inductor's code)
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: compile_(model, **kw, backend='aot_eager'))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def logits_and_grads(m, idx, impl, autocast=None):
    """Logits and gradients; with autocast, the forward runs under it and the backward outside,
    as in train.py."""
    m.config.attn_impl = impl
    m.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        logits, loss = m(idx, idx)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}
    return logits.detach(), grads


# ---------------------------------------------------------------------------------------------
# The three attention paths agree


@pytest.mark.parametrize('regime', list(REGIMES))
@pytest.mark.parametrize('T', [W - 1, W, W + 1, 43])  # 43: not a multiple of the fused block
def test_paths_agree_forward_and_backward(regime, T):
    m = make_model(regime)
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    ref_logits, ref_grads = logits_and_grads(m, idx, 'naive')
    for impl in ('sdpa', 'fused'):
        logits, grads = logits_and_grads(m, idx, impl)
        assert rel_err(logits, ref_logits) < 1e-5, impl
        for name, g in ref_grads.items():
            assert rel_err(grads[name], g) < 1e-5 or (g.abs().max() == 0 and grads[name].abs().max() == 0), (impl, name)
    if m.config.has_latents and T > W:  # the latent maps must really receive gradient
        assert ref_grads['transformer.h.0.attn.up_k'].abs().max() > 0


FLEX_CPU = pytest.mark.filterwarnings('ignore:.*flex_attention called without torch.compile')  # the unfused path


@FLEX_CPU
@pytest.mark.parametrize('regime', list(REGIMES))
def test_flex_path_forward_equals_naive(regime):
    # flex.py in latent space: FlexAttention runs forward only on the CPU (its backward: the test below and
    # gpu_check.sh); bf16 under autocast as on a GPU, against naive in float32.
    m = make_model(regime).eval()
    with torch.no_grad():
        for T in (W - 1, W, W + 1, 43):
            idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
            m.config.attn_impl = 'naive'
            ref = m(idx)[0]
            m.config.attn_impl = 'flex'
            assert rel_err(m(idx)[0], ref) < 1e-5, T
            with torch.autocast('cpu', dtype=torch.bfloat16):
                assert rel_err(m(idx)[0].float(), ref) < 3e-2, T


def dense_attend(q, k, v, mask, scale):
    """flex.attend written out, differentiable on the CPU: the scores masked by the block mask's own mask_mod."""
    i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
    allowed = mask.mask_mod(0, 0, i, j)
    reads = allowed.any(-1)  # a query that reads no key: out 0, lse -inf, and no NaN in the gradient
    s = (q.float() @ k.float().transpose(-2, -1) * scale).masked_fill(~allowed, float('-inf'))
    lse = torch.logsumexp(s.masked_fill(~reads[:, None], 0.0), -1)
    p = torch.exp(s - torch.where(reads, lse, 0.0)[..., None])
    return (p @ v.float()).to(q.dtype), torch.where(reads, lse, float('-inf'))


@pytest.mark.parametrize('regime', list(REGIMES))
@pytest.mark.parametrize('T', [W - 1, W, W + 1, 43])
def test_flex_path_merge_is_exact_forward_and_backward(regime, T, monkeypatch):
    # The two attentions and their log-sum-exp merge, with FlexAttention replaced by dense_attend: exact
    # against naive in the gradients of every weight, the latent maps included (flex's own backward: CUDA).
    import flex
    monkeypatch.setattr(flex, 'attend', dense_attend)
    m = make_model(regime)
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    ref_logits, ref_grads = logits_and_grads(m, idx, 'naive')
    logits, grads = logits_and_grads(m, idx, 'flex')
    assert rel_err(logits, ref_logits) < 1e-5
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 1e-5 or (g.abs().max() == 0 and grads[name].abs().max() == 0), name
    if m.config.has_latents and T > W:
        assert grads['transformer.h.0.attn.up_k'].abs().max() > 0


def test_tied_maps_paths_agree_and_train_the_down_map():
    m = make_model('dar', dar_maps='tied')
    assert not hasattr(m.transformer.h[0].attn, 'up_k')
    down_k, up_k, _, _ = m.transformer.h[0].attn.latent_maps()
    assert torch.equal(up_k, down_k.transpose(-2, -1))
    idx = torch.randint(0, 97, (2, 43), generator=torch.Generator().manual_seed(4))
    ref_logits, ref_grads = logits_and_grads(m, idx, 'naive')
    for impl in ('sdpa', 'fused'):
        logits, grads = logits_and_grads(m, idx, impl)
        assert rel_err(logits, ref_logits) < 1e-5
        for name, g in ref_grads.items():
            assert rel_err(grads[name], g) < 1e-5, (impl, name)
    assert ref_grads['transformer.h.0.attn.down_k'].abs().max() > 0


def reference_attention(q, k, v, allowed):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, float('-inf')), -1) @ v


@pytest.mark.parametrize('impl', ['naive', 'sdpa', 'fused'])
def test_full_is_causal_and_local_is_sliding_window(impl):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 29, 8, generator=g) for _ in range(3))
    i = torch.arange(29)
    dist = i[:, None] - i[None, :]
    attn = model.ATTENTION[impl]
    torch.testing.assert_close(attn(q, k, v, None, None), reference_attention(q, k, v, dist >= 0))
    torch.testing.assert_close(attn(q, k, v, 5, None), reference_attention(q, k, v, (dist >= 0) & (dist < 5)))


@pytest.mark.parametrize('maps', model.DAR_MAPS)
@pytest.mark.parametrize('regime', ['dar', 'uniform'])
def test_full_rank_latents_reproduce_full_attention(regime, maps):
    # With r = d, the initial A is orthogonal and U = A^T, so a distant key/value is rebuilt
    # exactly: DAR and uniform must then equal full attention on the same weights.
    full = make_model('full')
    reduced = GPT(small_config(regime, dar_rank=full.config.head_dim, dar_maps=maps))
    missing, unexpected = reduced.load_state_dict(full.state_dict(), strict=False)
    assert not unexpected and all(('down_' in n or 'up_' in n) for n in missing)
    idx = torch.randint(0, 97, (2, 40))
    for impl in ('naive', 'sdpa', 'fused'):
        reduced.config.attn_impl = full.config.attn_impl = impl
        torch.testing.assert_close(reduced(idx)[0], full(idx)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('impl', ['naive', 'sdpa', 'fused'])
def test_distant_tokens_matter_only_with_latents(impl):
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    for rank, should_change in ((0, False), (4, True)):
        m = make_model('dar', n_layer=1, dar_rank=rank, attn_impl=impl)
        a, b = m(idx)[0], m(changed)[0]
        # Positions 10 + W and later are W or more past the change: only latents reach them.
        far = (a[0, 10 + W:] - b[0, 10 + W:]).abs().max().item()
        near = (a[0, 10:10 + W] - b[0, 10:10 + W]).abs().max().item()
        assert near > 1e-4
        assert (far > 1e-4) == should_change, (rank, far)


@pytest.mark.parametrize('regime', list(REGIMES))
def test_bf16_sdpa_and_fused_agree(regime):
    m = make_model(regime).to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 43), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_grads = logits_and_grads(m, idx, 'sdpa')
    logits, grads = logits_and_grads(m, idx, 'fused')
    for t in [ref_logits, logits, *ref_grads.values(), *grads.values()]:
        assert torch.isfinite(t.float()).all()
    assert rel_err(logits.float(), ref_logits.float()) < 3e-2
    for name, g in ref_grads.items():
        assert rel_err(grads[name].float(), g.float()) < 6e-2, name


def autocast_bf16():
    return torch.autocast('cpu', dtype=torch.bfloat16)


@pytest.mark.parametrize('regime', list(REGIMES))
@pytest.mark.parametrize('T', [W - 1, W, W + 1, 43])
def test_paths_agree_under_autocast(regime, T):
    # float32 weights, bf16 autocast (train.py's CUDA setting): the fused backward used to meet
    # bf16 keys and float32 maps outside autocast and raise.
    m = make_model(regime)
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    ref_logits, ref_grads = logits_and_grads(m, idx, 'naive', autocast_bf16())
    for impl in ('sdpa', 'fused'):
        logits, grads = logits_and_grads(m, idx, impl, autocast_bf16())
        assert torch.isfinite(logits.float()).all()
        assert rel_err(logits.float(), ref_logits.float()) < 3e-2, impl
        for name, g in ref_grads.items():
            assert grads[name].dtype == torch.float32 and torch.isfinite(grads[name]).all()
            assert rel_err(grads[name], g) < 6e-2 or (g.abs().max() == 0 and grads[name].abs().max() == 0), \
                (impl, name)
    fp32_logits, _ = logits_and_grads(m, idx, 'naive')  # autocast changes rounding, not the model
    assert rel_err(ref_logits.float(), fp32_logits) < 3e-2


def test_fused_scores_are_float32_under_bf16():
    # Sharp attention (scores of tens): bf16 scores (8 bits of mantissa) moved the output by 4%
    # here; with float32 scores what is left is bf16 rounding of p and of the output.
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g) for _ in range(3))
    q, k, v = (30 * q).to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    exact = model.naive_attention(q.float(), k.float(), v.float(), None, None)
    for impl in ('naive', 'fused'):
        got = model.ATTENTION[impl](q, k, v, None, None).float()
        assert rel_err(got, exact) < 1e-2, impl


def test_fused_empty_sets_give_no_nan():
    # Uniform: no local key at all; local-only: no distant key; a lone query at position 0.
    for regime in ('uniform', 'local', 'dar'):
        m = make_model(regime, attn_impl='fused')
        for T in (1, 2, W + 3):
            logits, loss = m(torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long))
            loss.backward()
            assert torch.isfinite(logits).all()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize('kw, field', [
    (dict(dar_window=-1), 'dar_window'),
    (dict(dar_rank=17), 'dar_rank'),
    (dict(n_embd=33), 'n_embd'),
    (dict(attn_impl='flash'), 'attn_impl'),
    (dict(rotary_pct=1.5), 'rotary_pct'),
    (dict(rotary_pct=-0.1), 'rotary_pct'),
    (dict(dar_window=0, dar_rank=0), 'dar_rank'),
    (dict(n_layer=0), 'n_layer'),
    (dict(dar_window=16.5), 'dar_window'),
    (dict(block_size=True), 'block_size'),
])
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        small_config('full', **kw)


def test_regimes_and_parameters():
    for regime in REGIMES:
        assert small_config(regime).regime == regime
    assert small_config('dar', dar_window=64).regime == 'full'  # W >= block_size
    assert small_config('dar', dar_rank=None).dar_rank == 16 // 4
    with pytest.raises(ValueError, match='preset'):
        GPTConfig.from_preset('pythia-1b')
    n_full = make_model('full').get_num_params()
    assert make_model('local').get_num_params() == n_full
    assert make_model('dar').get_num_params() == n_full + 2 * 4 * (2 * 16 * 4)  # layers * maps * (H * d * r)
    with pytest.raises(ValueError, match='block_size'):
        make_model('full')(torch.zeros(1, 65, dtype=torch.long))


def test_masked_loss_is_the_mean_over_counted_targets_only():
    m = make_model('dar')
    idx = torch.randint(0, 97, (2, 20))
    targets = torch.randint(0, 97, (2, 20))
    counted = torch.rand(2, 20) < 0.3
    counted[0, 0] = True
    logits, loss = m(idx, targets.masked_fill(~counted, -1))
    logits.retain_grad()
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    assert loss.item() == pytest.approx(-(logp[counted]).mean().item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~counted] == 0).all() and (logits.grad[counted].abs().sum(-1) > 0).all()


def test_pythia_70m_parameter_count():
    with torch.device('meta'):  # shapes only: no memory, no init time
        m = GPT(GPTConfig.from_preset('pythia-70m'))
    assert abs(m.get_num_params(non_embedding=True) - 18_915_328) / 18_915_328 < 0.01
    assert m.get_num_params(non_embedding=False) == 70_426_624


@pytest.mark.parametrize('form', ['blocked', 'packed'])
@pytest.mark.parametrize('out_features', [96, 97])  # 97: no equal row blocks, F.linear when blocked
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape', [(1, 1), (3, 1), (2, 4), (9, 1)])  # rows 1, 3, 8 (matrix-vector), 9 (not)
def test_linear_matvec_forms_equal_f_linear(shape, bias, out_features, form, monkeypatch):
    torch.manual_seed(0)
    layer = cpu_matvec.MatvecLinear(24, out_features, bias=bias)
    layer.form = form
    x = torch.randn(*shape, 24, requires_grad=True)
    calls = []
    monkeypatch.setitem(cpu_matvec.FORMS, form, lambda *a, f=cpu_matvec.FORMS[form]: calls.append(1) or f(*a))
    matvec = shape[0] * shape[1] <= cpu_matvec.MATVEC_ROWS and (form == 'packed' or out_features % 2 == 0)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():  # packed has no autograd: a decode step's form
        y = layer(x)
        assert len(calls) == matvec
        torch.testing.assert_close(y, ref.detach())
        if form == 'packed' and matvec:  # its copy of the weight follows an in-place change
            layer.weight.mul_(-2)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    y, calls[:] = layer(x), []  # with autograd: blocked computes and differentiates, packed leaves it to F.linear
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, *layer.parameters()], g)
    want = torch.autograd.grad(ref, [x, *layer.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_decode_steps_with_every_weight_packed_equal_f_linears(monkeypatch):
    m = make_model('dar').eval()
    prompt = torch.randint(0, 97, (2, W + 2), generator=torch.Generator().manual_seed(5))

    def decode_logits():  # the prompt (many rows: F.linear), then steps of 2 rows (the matvec forms)
        cache, logits = m.new_cache(2, W + 8), []
        m(prompt, cache=cache)
        for token in prompt[:, :4].T:
            logits.append(m(token[:, None], cache=cache)[0])
        return torch.cat(logits)

    with torch.no_grad():
        want = decode_logits()
        monkeypatch.setattr(cpu_matvec, 'fastest_form', lambda *shape: 'packed')
        cpu_matvec.use_matvec(m)
        assert {type(l).__name__ for l in m.modules() if isinstance(l, torch.nn.Linear)} == {'MatvecLinear'}
        torch.testing.assert_close(decode_logits(), want)
        assert all(l.weight in cpu_matvec.PACKED for l in m.modules() if isinstance(l, torch.nn.Linear))  # it ran


def test_packed_form_is_an_op_where_compiled_and_a_plain_call_eagerly(monkeypatch):
    layer = cpu_matvec.MatvecLinear(24, 40)
    layer.form, x = 'packed', torch.randn(2, 1, 24)
    want, graphs = torch.nn.functional.linear(x, layer.weight, layer.bias), []
    monkeypatch.setattr(cpu_matvec, 'packed_op', lambda *args: 1 / 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)  # eagerly: oneDNN's product without the op's Python dispatch
        monkeypatch.undo()
        compiled = torch.compile(layer, fullgraph=True, backend=lambda gm, _: graphs.append(str(gm.graph)) or gm)
        torch.testing.assert_close(compiled(x), want)
    assert 'dar.packed_linear' in graphs[0]  # compiling: the op, which inductor does not see into


def test_use_matvec_converts_the_shapes_measured_faster(monkeypatch):
    timed = []
    fastest = {(32, 16): 'blocked', (48, 16): 'packed'}
    monkeypatch.setattr(cpu_matvec, 'fastest_form', lambda *shape: timed.append(shape) or fastest.get(shape))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 32),
                                torch.nn.Linear(16, 48), torch.nn.Linear(16, 32).double())
    cpu_matvec.use_matvec(model)
    assert [type(m).__name__ for m in model] == ['MatvecLinear', 'Linear', 'MatvecLinear', 'MatvecLinear', 'Linear']
    assert [getattr(m, 'form', None) for m in model] == ['blocked', None, 'blocked', 'packed', None]
    assert timed == [(32, 16), (16, 32), (48, 16)]  # once per float32 shape
    assert cpu_matvec.fastest_form(97, 24) in (None, 'packed')  # no equal row blocks: never blocked


def test_use_matvec_takes_forms_decided_before_and_times_only_the_rest(monkeypatch):
    timed = []
    monkeypatch.setattr(cpu_matvec, 'fastest_form', lambda *shape: timed.append(shape) or 'blocked')
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 48))
    forms = cpu_matvec.matvec_forms(model, {(32, 16): None, (16, 32): 'packed'})  # as bench.py hands them down
    assert forms == {(32, 16): None, (16, 32): 'packed', (48, 16): 'blocked'} and timed == [(48, 16)]
    cpu_matvec.use_matvec(model, forms)
    assert [getattr(m, 'form', None) for m in model] == [None, 'packed', 'blocked'] and timed == [(48, 16)]
    with pytest.raises(ValueError, match="None .F.linear. or one of blocked, packed, got"):
        cpu_matvec.use_matvec(model, {(32, 16): 'F.linear'})


def test_a_form_that_cannot_run_here_is_never_picked(monkeypatch):
    def unsupported(*args):
        raise RuntimeError("oneDNN: no packed layout on this CPU")
    monkeypatch.setitem(cpu_matvec.FORMS, 'packed', unsupported)
    assert cpu_matvec.fastest_form(97, 24) is None  # F.linear: blocked needs equal row blocks, packed raised


# ---------------------------------------------------------------------------------------------
# KV cache


def cached_logits(m, idx, prompt_len, cache):
    """Prompt in two chunks (the first through the training path, the second blockwise over the
    first), then a mix of single tokens and short chunks."""
    out = [m(idx[:, :2], cache=cache)[0], m(idx[:, 2:prompt_len], cache=cache)[0]]
    t, step = prompt_len, 0
    while t < idx.shape[1]:
        n = 3 if step % 4 == 3 else 1
        out.append(m(idx[:, t:t + n], cache=cache)[0])
        t, step = t + n, step + 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize('static', [False, True])
@pytest.mark.parametrize('regime', list(REGIMES))
@pytest.mark.parametrize('prompt_len', [W - 5, W - 1, W, W + 1, W + 7])
def test_cached_decoding_equals_full_forward(regime, prompt_len, static):
    m = make_model(regime, attn_impl='naive').eval()
    idx = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(prompt_len))
    ref = m(idx)[0]
    cache = m.new_cache(2, 50, static=static)
    cache.prefill_block = 4  # long prompts are prefilled in several query blocks
    with torch.no_grad():
        torch.testing.assert_close(cached_logits(m, idx, prompt_len, cache), ref, rtol=1e-5, atol=1e-5)
        cache.reset()  # a reset cache serves a new sequence as if new
        torch.testing.assert_close(cached_logits(m, idx, prompt_len, cache), ref, rtol=1e-5, atol=1e-5)


def decode_views(m, cache, idx, monkeypatch):
    """The shapes of every tensor each decode step's attention reads, decoding idx token by token."""
    shapes = []
    attend = model.decode_attention
    monkeypatch.setattr(model, 'decode_attention', lambda q, view, *maps: shapes.append(
        tuple(None if t is None else tuple(t.shape) for t in (q, *view))) or attend(q, view, *maps))
    with torch.no_grad():
        for t in range(idx.shape[1]):
            m(idx[:, t:t + 1], cache=cache)
    return shapes


@pytest.mark.parametrize('regime', list(REGIMES))
def test_static_cache_decodes_with_one_shape(regime, monkeypatch):
    m = make_model(regime).eval()
    idx = torch.randint(0, 97, (2, 3 * W), generator=torch.Generator().manual_seed(5))
    assert len(set(decode_views(m, m.new_cache(2, 3 * W, static=True), idx, monkeypatch))) == 1
    # The default cache hands each step only what is written: shapes grow until the ring is
    # full, and the latents grow with every step after that.
    assert len(set(decode_views(m, m.new_cache(2, 3 * W), idx, monkeypatch))) > 1


def buffer_sizes(code):
    """Elements of every buffer that inductor's generated code allocates."""
    shapes = re.findall(r'empty_strided_\w+\(\(([\d, ]*)\)', code)
    return [math.prod(int(n) for n in shape.split(',') if n.strip()) for shape in shapes]


@pytest.mark.parametrize('regime, backend, attn', [(r, 'aot_eager', a) for r in REGIMES
                                                   for a in split_decode.DECODE_ATTNS]
                         + [('dar', 'inductor', 'reference'), ('full', 'inductor', 'reference'),
                            ('dar', 'inductor', 'reduce')])
def test_the_whole_decode_step_compiles_once_and_equals_eager(regime, backend, attn):
    # As in gpt-fast, a static cache takes the position as a tensor, so every decode step is one graph:
    # fullgraph (nothing runs on the host between kernels) and one compilation for 50 steps, which is
    # what replaying it as a CUDA graph needs. aot_eager traces as inductor does, in a tenth of the time
    # (inductor's CPU FlexAttention returns no log-sum-exp: flex is compiled by inductor on CUDA only).
    m = split_decode.use_decode_attn(make_model(regime).eval(), attn)
    idx = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(6))
    ref = m(idx)[0]
    torch._dynamo.reset()
    step = torch.compile(m, fullgraph=True, dynamic=False, backend=backend)
    cache = m.new_cache(2, 60, static=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):  # the steps cross the window
        got = [m(idx[:, :5], cache=cache)[0]]
        first, codes = run_and_get_code(step, idx[:, 5:6], cache=cache)
        got += [first[0]] + [step(idx[:, t:t + 1], cache=cache)[0] for t in range(6, 55)]
    torch.testing.assert_close(torch.cat(got, 1), ref[:, :55], rtol=1e-5, atol=1e-5)
    assert cache.length == 55
    # The step writes the cache in place. A write the compiler cannot do in place (through a view of a
    # tensor holding every layer, say) becomes a copy of the whole tensor each step: a cache-sized buffer.
    # So would a reduction inductor does not fuse (the float32 cast of the latents, or p_j b_j, written out).
    smallest_cache_tensor = min(t.numel() for t in (*cache.k, *cache.v, *cache.a) if t.numel())
    assert backend != 'inductor' or max(buffer_sizes('\n'.join(codes))) < smallest_cache_tensor
    # The products with the cache (ring, and latents where there are) stay MKL's, not inductor's own loop
    products = '\n'.join(codes).count('torch.ops.dar.matmul.default(')
    assert backend != 'inductor' or attn != 'reference' or products == (2 + 2 * m.config.has_latents) * m.config.n_layer


@pytest.mark.parametrize('regime', list(REGIMES))
def test_a_layer_that_raises_leaves_no_half_updated_cache(regime, monkeypatch):
    m = make_model(regime, attn_impl='naive').eval()
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(8))
    ref = m(idx)[0]
    cache = m.new_cache(2, 40)
    p = W + 5
    with torch.no_grad():
        m(idx[:, :p], cache=cache)

    def fail_in_layer_1(chunk):  # layer 0 has written its keys, layer 1 raises
        with monkeypatch.context() as patch:
            patch.setattr(m.transformer.h[1].attn, 'forward', lambda *a, **k: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                m(chunk, cache=cache)

    with torch.no_grad():
        fail_in_layer_1(idx[:, p:p + 1])
        assert cache.length == p
        # A decode step writes only what no later read needs in full dims: run it again.
        torch.testing.assert_close(m(idx[:, p:p + 1], cache=cache)[0], ref[:, p:p + 1], rtol=1e-5, atol=1e-5)
        fail_in_layer_1(idx[:, p + 1:p + 4])
        if cache.ring_size and cache.ring_size < cache.max_seq_len:  # the chunk overwrote ring slots it reads
            with pytest.raises(ValueError, match='reset'):
                m(idx[:, p + 1:p + 4], cache=cache)
            cache.reset()
            m(idx[:, :p + 1], cache=cache)
        torch.testing.assert_close(m(idx[:, p + 1:p + 4], cache=cache)[0], ref[:, p + 1:p + 4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('regime', list(REGIMES))
def test_cached_decoding_bf16(regime):
    m = make_model(regime, attn_impl='sdpa').eval().to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(idx)[0].float()
        got = cached_logits(m, idx, W + 3, m.new_cache(2, 45)).float()
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 3e-2


@pytest.mark.parametrize('regime', list(REGIMES))
def test_cached_decoding_under_autocast(regime):
    # float32 weights under bf16 autocast: the cache holds bf16, what the attention computes in.
    m = make_model(regime, attn_impl='naive').eval()
    idx = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), autocast_bf16():
        ref = m(idx)[0].float()
        cache = m.new_cache(2, 45)
        assert cache.dtype == torch.bfloat16
        got = cached_logits(m, idx, W + 3, cache).float()
        assert m.generate(idx[:, :W + 1], 6, temperature=0).shape == (2, W + 7)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 3e-2
    assert m.new_cache(2, 45).dtype == torch.float32  # outside autocast: the weights' dtype


# The decode attention as two attentions merged by log-sum-exp (split_decode.py): model.decode_attention's math

SPLIT_ATTNS = [a for a in split_decode.DECODE_ATTNS if a != 'reference']
flex_unfused = pytest.mark.filterwarnings('ignore:.*flex_attention called without torch.compile')  # the CPU's


def spied(attn, monkeypatch):
    """The calls of form attn from now on: a test of the form sees that it ran."""
    calls, form = [], split_decode.FORMS[attn]
    monkeypatch.setitem(split_decode.FORMS, attn, lambda *args: calls.append(1) or form(*args))
    return calls


@flex_unfused
@pytest.mark.parametrize('attn', SPLIT_ATTNS)
def test_split_decode_equals_the_reference_on_every_view(attn):
    torch.manual_seed(0)
    B, H, d, r, S, n = 2, 3, 16, 4, 5, 9
    q, k, v = torch.randn(B, H, 1, d), torch.randn(B, H, S, d), torch.randn(B, H, S, d)
    a, b, up_k, up_v = torch.randn(B, H, n, r), torch.randn(B, H, n, r), torch.randn(H, r, d), torch.randn(H, r, d)
    unwritten = lambda length, *slots: torch.zeros(length).index_fill(0, torch.tensor(slots, dtype=torch.long),
                                                                      -math.inf)
    no_ring, no_latents = (k[:, :, :0], v[:, :, :0]), (a[:, :, :0], b[:, :, :0])
    for view in (CacheView(k, v, a, b, None),
                 CacheView(k, v, a, b, unwritten(S + n, 3, 4, *range(S + 6, S + n))),  # a static step: slots to come
                 CacheView(k, v, a, b, unwritten(S + n, *range(S, S + n))),  # static, before the window is crossed
                 CacheView(*no_ring, a, b, unwritten(n, 7, 8)),  # uniform
                 CacheView(k, v, None, None, unwritten(S, 4)),  # full, local-only
                 CacheView(k, v, *no_latents, None)):  # a default cache before the window is crossed
        got = split_decode.FORMS[attn](q, view, up_k, up_v)
        torch.testing.assert_close(got, model.decode_attention(q, view, up_k, up_v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='decode_attn must be one of reference, flex, reduce'):
        split_decode.use_decode_attn(make_model('dar'), 'splitk')


@flex_unfused
@pytest.mark.parametrize('static', [False, True])
@pytest.mark.parametrize('regime', list(REGIMES))
@pytest.mark.parametrize('attn', SPLIT_ATTNS)
def test_split_decode_cached_equals_full_forward(attn, regime, static, monkeypatch):
    calls = spied(attn, monkeypatch)
    m = split_decode.use_decode_attn(make_model(regime, attn_impl='naive').eval(), attn)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # single steps at positions W - 1, W, W + 1 (the window's edge), then on with chunks
        got = cached_logits(m, idx, W - 1, m.new_cache(2, 40, static=static))
        torch.testing.assert_close(got, m(idx)[0], rtol=1e-5, atol=1e-5)
    assert calls
    split_decode.use_decode_attn(m, 'reference')  # the default again
    assert not any('decode' in vars(block.attn) for block in m.transformer.h)


@flex_unfused
@pytest.mark.parametrize('regime', list(REGIMES))
@pytest.mark.parametrize('attn', SPLIT_ATTNS)
def test_split_decode_under_autocast(attn, regime, monkeypatch):
    # bf16 cache and products, float32 softmax and merge: as close to the full forward as the reference step is
    calls = spied(attn, monkeypatch)
    m = make_model(regime, attn_impl='naive').eval()
    idx = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), autocast_bf16():
        ref = m(idx)[0].float()
        reference = cached_logits(m, idx, W - 1, m.new_cache(2, 45, static=True)).float()
        got = cached_logits(split_decode.use_decode_attn(m, attn), idx, W - 1, m.new_cache(2, 45, static=True)).float()
    assert calls and torch.isfinite(got).all()
    assert rel_err(got, ref) < 1e-2 and rel_err(got, reference) < 1e-2


@pytest.mark.parametrize('regime', list(REGIMES))
def test_cache_nbytes_matches_design_formula(regime):
    m = make_model(regime)
    B, T, cfg = 3, 50, m.config
    H, d, r, L = cfg.n_head, cfg.head_dim, cfg.dar_rank, cfg.n_layer
    window = {'full': T, 'dar': W, 'uniform': 0, 'local': W}[regime]
    rank = r if cfg.has_latents else 0
    for dtype, elt in ((torch.float32, 4), (torch.bfloat16, 2)):
        expected = L * B * H * (2 * window * d + 2 * (T - window) * rank) * elt
        assert m.new_cache(B, T, dtype=dtype).nbytes() == expected


@pytest.mark.parametrize('regime', list(REGIMES))
def test_greedy_generate_equals_argmax_of_full_forwards(regime, aot_eager_compile):
    m = make_model(regime).eval()
    prompt = torch.randint(0, 97, (2, W + 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = prompt
        for _ in range(20):
            x = torch.cat([x, m(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(m.generate(prompt, 20, temperature=0), x)
        assert torch.equal(m.generate(prompt, 20, top_k=1), x)
    # gpt-fast style, as sample.py --compile runs it: the prompt eagerly, then the compiled step on a
    # static cache (aot_eager traces as inductor does; inductor's code is the decode-step test's)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(m.generate(prompt, 20, temperature=0, step=sampling.compile_step(m)), x)


def test_generate_sampling_options():
    m = make_model('dar').eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    torch.manual_seed(0)
    out = m.generate(prompt, 12, temperature=0.8, top_k=5, top_p=0.9)
    assert out.shape == (2, 15) and torch.equal(out[:, :3], prompt)
    # Rows that emitted eos keep emitting it; generation stops once every row has.
    eos = int(m(prompt)[0][0, -1].argmax())
    out = m.generate(prompt, 12, temperature=0, eos_token=eos)
    assert out.shape == (2, 4) and (out[:, -1] == eos).all()
    # top_p keeps the smallest set covering p: with a dominant token, p=0.5 keeps only it.
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).repeat(50, 1)
    assert (sampling.sample_next(logits, top_p=0.5) == 0).all()


@pytest.mark.parametrize('kw, match', [
    ({'temperature': -1.0}, 'temperature must be at least 0'),  # would sample the least likely tokens
    ({'temperature': float('nan')}, 'temperature must be at least 0'),
    ({'top_k': 0}, 'top_k must be at least 1'),
    ({'top_k': -3}, 'top_k must be at least 1'),
    ({'top_p': 0.0}, r'top_p must be in \(0, 1\]'),
    ({'top_p': 1.5}, r'top_p must be in \(0, 1\]'),
])
def test_sampling_settings_out_of_range_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample_next(torch.zeros(2, 5), **kw)
    with pytest.raises(ValueError, match=match):
        make_model('dar').eval().generate(torch.zeros(1, 3, dtype=torch.long), 4, **kw)


def test_generate_never_samples_the_vocabulary_padding():
    m = make_model('dar').eval()  # 97 ids; say the first 10 are the real vocabulary, the rest padding
    torch.manual_seed(0)
    out = m.generate(torch.zeros(2, 3, dtype=torch.long), 40, temperature=2.0, n_tokens=10)
    assert out.shape == (2, 43) and out.max() < 10
    assert (m.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0, n_tokens=10) < 10).all()
    assert sampling.sample_next(torch.arange(20.0)[None], temperature=0, n_tokens=10).item() == 9
    with pytest.raises(ValueError, match=r'idx must be token ids in \[0, 10\)'):
        m.generate(torch.full((1, 3), 12), 2, n_tokens=10)


def test_generate_length_checks():
    m = make_model('dar').eval()
    prompt = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match='max_new_tokens must be at least 0'):
        m.generate(prompt, -1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # within the trained context: no warning
        assert m.generate(prompt, 4, temperature=0).shape == (1, 64)
    # past it, generation goes on with one warning
    with pytest.warns(UserWarning, match='past the trained context') as caught:
        assert m.generate(prompt, 10, temperature=0).shape == (1, 70)
    assert len(caught) == 1


def test_cache_errors_are_clear():
    m = make_model('dar').eval()
    with torch.no_grad():
        cache = m.new_cache(2, 20)
        with pytest.raises(ValueError, match='max_seq_len'):
            m(torch.zeros(2, 21, dtype=torch.long), cache=cache)
        m(torch.zeros(2, 15, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match='max_seq_len'):
            m(torch.zeros(2, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match='batch size'):
            m(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match='dtype'):
            m(torch.zeros(2, 1, dtype=torch.long), cache=m.new_cache(2, 20, dtype=torch.bfloat16))
        for length in (-5, 21):  # refused at the call, not steps later
            with pytest.raises(ValueError, match=rf'reset\(length={length}\): a cache holds 0 to max_seq_len = 20'):
                cache.reset(length)
        with pytest.raises(ValueError, match='dtype floating, got 2, 20, torch.int64'):
            m.new_cache(2, 20, dtype=torch.int64)
        assert cache.length == 15  # failed calls left the cache untouched
        static = m.new_cache(2, 20, static=True)
        static.reset(length=20)  # a static decode step checks on the device (no host sync): it raises there
        with pytest.raises(RuntimeError, match='past its max_seq_len 20'):
            m(torch.zeros(2, 1, dtype=torch.long), cache=static)
        meta_cache = KVCache(m.config, 2, 20, device='meta', dtype=torch.float32)
        with pytest.raises(ValueError, match='the cache on meta'):
            m(torch.zeros(2, 1, dtype=torch.long), cache=meta_cache)


# ---------------------------------------------------------------------------------------------
# Scripts run end to end (tiny settings; the real figures come from running them by hand)


def test_bench_runs_and_writes_results(tmp_path):
    import json
    proc = run('bench.py', '--device=cpu', '--preset=tiny', '--dar_window=16', '--dar_rank=8', '--train_seq_lens=[40]',
               '--train_tokens=80', '--train_regimes=dar,full', '--train_paths=fused,auto', '--train_repeats=1',
               '--decode_contexts=[24,48]', '--decode_steps=2', '--decode_repeats=1', '--prefill_repeats=1',
               '--decode_batches=[1,2]', '--decode_cases=full,DAR', '--kv_budget_gib=0.001', cwd=tmp_path)
    out = tmp_path / 'out-bench'  # not the committed results/: those only when asked
    train = json.loads((out / 'train_cpu.json').read_text())
    # 'auto' is measured as the path it picks, once, its row marked
    auto = train['auto']['40']
    assert auto['dar'] == model.resolve_attn_impl(GPTConfig.from_preset('tiny', dar_window=16, dar_rank=8), 40,
                                                  torch.device('cpu'))
    assert sorted((r['regime'], r['path']) for r in train['rows']) == sorted(
        (regime, path) for regime in ('full', 'dar') for path in {'fused', auto[regime]})
    assert all(r['auto'] == (r['path'] == auto[r['regime']]) and r['batch'] == 2 for r in train['rows'])
    # peak memory None: the machine's RSS marks showed nothing (seen in the H200 machine's container)
    assert all(r['seconds'] > 0 and (r['peak_bytes'] is None or r['peak_bytes'] > 0) for r in train['rows'])
    assert min(r['time_vs_full'] for r in train['rows'] if r['regime'] == 'full') == 1
    assert '| T | batch | regime | path | step ms | x full | peak MiB | x full |' in proc.stdout
    assert f"| 40 | 2 | dar | {auto['dar']} (auto) |" in proc.stdout
    decode = json.loads((out / 'decode_cpu.json').read_text())
    assert {(r['batch'], r['context']) for r in decode['rows']} == {(1, 24), (1, 48), (2, 24), (2, 48)}
    dar = next(r for r in decode['rows'] if r['case'] == 'DAR' and r['context'] == 48 and r['batch'] == 2)
    assert dar['kv_vs_full'] < 1 and dar['decode_tok_s'] > 0 and dar['bytes_ceiling'] > 1
    assert decode['budget_context'] == 48  # the run's longest context, not 32k
    full, dar = decode['budget_rows']
    assert full['kv_bytes'] <= 2**30 * 0.001 and dar['batch'] > full['batch'] >= 1
    assert (out / 'decode_cpu.png').stat().st_size > 0


def test_bench_times_eager_and_compiled_decode_side_by_side(tmp_path, aot_eager_compile):
    import json
    run('bench.py', '--section=decode', '--device=cpu', '--preset=tiny', '--dar_window=16', '--dar_rank=8',
        '--decode_contexts=[24]', '--decode_steps=2', '--decode_repeats=1', '--prefill_repeats=1',
        '--decode_batches=[2]', '--kv_budget_gib=0', '--decode_modes=eager,compiled', '--decode_cases=full,DAR',
        '--decode_attns=reference,reduce', '--decode_processes=False', '--decode_rounds=3', cwd=tmp_path)
    decode = json.loads((tmp_path / 'out-bench' / 'decode_cpu.json').read_text())
    every = {(c, m, a) for c in ('full', 'DAR') for m in ('eager', 'compiled') for a in ('reference', 'reduce')}
    assert sorted((r['case'], r['mode'], r['attn']) for r in decode['rows']) == sorted(every)  # one row each
    for r in decode['rows']:
        eager = r['mode'] == 'eager'
        assert len(r['ms_per_step_rounds']) == 3 and r['ms_per_step'] == sorted(r['ms_per_step_rounds'])[1]
        assert r['ms_per_step'] > 0 and (r['ops_per_step'] is not None) == eager and r['vs_eager'] > 0
        assert r['vs_reference'] > 0 and r['logit_error'] < 1e-5  # each form and mode against the eager reference
    # x full is against full attention's fastest mode and form, so full's others are below 1
    full = [r['decode_vs_full'] for r in decode['rows'] if r['case'] == 'full']
    assert max(full) == 1 and min(full) <= 1
    assert decode['budget_rows'] == []  # --kv_budget_gib=0: none


def test_bench_measures_the_flex_decode_eagerly_and_notes_a_failing_form(tmp_path, monkeypatch):
    import json
    monkeypatch.setitem(split_decode.FORMS, 'reduce', lambda *args: 1 / 0)  # as a form the compiler fails on
    run('bench.py', '--section=decode', '--device=cpu', '--preset=tiny', '--dar_window=16', '--dar_rank=8',
        '--decode_contexts=[24]', '--decode_steps=2', '--decode_repeats=1', '--prefill_repeats=1',
        '--decode_batches=[1]', '--kv_budget_gib=0.001', '--decode_cases=full,DAR',
        '--decode_attns=reference,flex,reduce', '--decode_processes=False', cwd=tmp_path)
    decode = json.loads((tmp_path / 'out-bench' / 'decode_cpu.json').read_text())
    every = [(c, a) for c in ('full', 'DAR') for a in ('reference', 'flex')]
    assert [(r['case'], r['attn']) for r in decode['rows']] == every
    assert [(r['case'], r['attn']) for r in decode['budget_rows']] == every
    assert all(r['logit_error'] < 1e-5 for r in decode['rows'] + decode['budget_rows'])
    assert len(decode['failed']) == 4 and all('eager reduce: ZeroDivisionError' in f for f in decode['failed'])


def test_bench_reads_issue_22s_targets_from_its_rows(tmp_path):
    import json
    proc = run('bench.py', '--section=decode', '--device=cpu', '--preset=tiny', '--dar_window=16', '--dar_rank=8',
               '--decode_contexts=[32768]', '--decode_steps=1', '--decode_repeats=1', '--decode_batches=[1]',
               '--kv_budget_gib=0', '--decode_cases=full,DAR', '--decode_processes=False', cwd=tmp_path)
    decode = json.loads((tmp_path / 'out-bench' / 'decode_cpu.json').read_text())
    targets = {t['target']: t for t in decode['targets']}
    dar = next(r for r in decode['rows'] if r['case'] == 'DAR')
    measured = targets['DAR eager, of the bytes ceiling, batch 1']
    assert measured['measured'] == dar['of_ceiling'] and measured['met'] == (dar['of_ceiling'] >= 0.95)
    unmeasured = [t for t in decode['targets'] if t is not measured]  # batch 8 and compiled steps: not in this run
    assert len(unmeasured) == 5 and all(t['measured'] is None and t['met'] is None for t in unmeasured)
    assert f"| DAR eager, of the bytes ceiling, batch 1 | 0.95 | {dar['of_ceiling']:,.2f} |" in proc.stdout


def test_bench_records_a_failed_training_case_and_goes_on(tmp_path):
    import json
    proc = run('bench.py', '--section=train', '--device=cpu', '--preset=tiny', '--dar_window=16', '--dar_rank=8',
               '--train_seq_lens=[40]', '--train_tokens=80', '--train_regimes=full,local', '--train_paths=auto',
               '--train_case_timeout=0.01', cwd=tmp_path)
    rows = json.loads((tmp_path / 'out-bench' / 'train_cpu.json').read_text())['rows']
    assert [r['regime'] for r in rows] == ['full', 'local']
    assert all(r['error'] == 'timed out after 0.01 s (time; --train_case_timeout)' for r in rows)
    assert all(r['time_vs_full'] is None and r['memory_vs_full'] is None for r in rows)
    assert '| 40 | 2 | local | ' in proc.stdout and ' (auto) | failed: timed out after 0.01 s' in proc.stdout


@pytest.mark.parametrize('args, message', [
    (['--section=decod'], "section must be 'train', 'decode' or 'all'"),
    (['--decode_steps=0'], 'decode_steps must be at least 1'),
    (['--decode_modes=eager,graphs'], "decode_modes must be a comma-separated list of eager, compiled and"),
    (['--decode_contexts=[0]'], 'decode_contexts must be a list of integers >= 1'),
    (['--decode_cases=DAR,uniform'], 'decode_cases must list full and DAR'),
    (['--decode_attns=reference,split'], 'decode_attns must be a comma-separated list of reference, flex, reduce'),
    (['--decode_attns=flex', '--decode_modes=compiled'], 'decode_attns=flex with decode_modes=compiled needs CUDA'),
    (['--dar_rank=100'], 'dar_rank must be <= head_dim'),
    (['--device=cuda:x'], 'device must be cpu, cuda or cuda:N'),
    (['--train_seq_lens=[40,80]', '--train_tokens=100'], 'train_tokens must be 0 (the device\'s default) or a '
     'positive multiple of every train_seq_lens entry below it, so that every step holds as many tokens; got 100'),
    (['--train_regimes=dar,local'], 'train_regimes must be a comma-separated list of full, dar, uniform, local with '
     "full among them (the ratios are against it), got 'dar,local'"),
    (['--train_regimes=full,sliding'], 'train_regimes must be a comma-separated list of full, dar, uniform, local'),
    (['--train_paths=sdpa,flash'], "train_paths must be a comma-separated list of auto, sdpa, fused, naive, flex, "
     "got 'sdpa,flash'"),
    (['--device=cpu', '--train_paths=fused,flex'], 'train_paths: flex trains on CUDA only (FlexAttention has no '
     'backward on the CPU); leave it out of --train_paths on the CPU'),
    (['--train_case_timeout=0'], 'train_case_timeout must be a positive number of seconds, got 0'),
    (['--decode_rounds=0'], 'decode_rounds must be at least 1, got 0'),
])
def test_bench_bad_settings_are_named(args, message, tmp_path):
    proc = run('bench.py', *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('compiled, decode_attn', [(False, 'reference'), (True, 'reference'), (True, 'reduce')])
def test_sample_from_random_preset(compiled, decode_attn, aot_eager_compile):
    # on the CPU, as the fixture's aot_eager assumes (a CUDA machine's default device is its GPU)
    out = run('sample.py', '--init_from=tiny', '--dar_window=8', '--max_new_tokens=5', '--num_samples=1',
              f'--compile={compiled}', f'--decode_attn={decode_attn}', '--device=cpu').stdout
    assert 'tokens/s' in out and ('decode step compiled in' in out) == compiled


@pytest.mark.parametrize('args, message', [
    (['--temperature=-1'], '--temperature must be at least 0'),
    (['--top_k=-5'], '--top_k must be at least 1'),
    (['--max_new_tokens=-1'], 'max_new_tokens must be at least 0'),
    (['--start=FILE:/nonexistent/prompt.txt'], 'FILE:/nonexistent/prompt.txt: cannot read the prompt'),
    (['--dtype=fp32'], "dtype must be one of float32, bfloat16, got 'fp32'"),
    (['--device=tpu'], "device must be cpu, cuda or cuda:N, got 'tpu'"),
    (['--decode_attn=split'], "--decode_attn must be one of reference, flex, reduce, got 'split'"),
])
def test_sample_bad_settings_are_named(args, message):
    proc = run('sample.py', '--init_from=tiny', '--max_new_tokens=2', *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('static', [False, True])
def test_a_cache_step_with_autograd_on_is_refused_clearly(static):
    # A cache written in place cannot carry autograd's graph from one step to the next: a clear
    # refusal, and the cache untouched, where there used to be an error from deep inside torch.
    m = make_model('dar').eval()
    cache = m.new_cache(2, 20, static=static)
    with pytest.raises(ValueError, match=r'torch\.no_grad\(\)'):
        m(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    assert cache.length == 0
    with torch.no_grad():
        m(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    assert cache.length == 5


@pytest.mark.parametrize('prompt', [torch.zeros(2, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                    torch.zeros(1, 3), torch.full((1, 3), 97), torch.full((1, 3), -1)])
def test_generate_names_a_bad_prompt(prompt):
    with pytest.raises(ValueError, match=r'idx must be token ids in \[0, 97\)'):
        make_model('dar').eval().generate(prompt, 2)


def test_the_readme_api_snippet_runs_as_written(aot_eager_compile):
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'README.md'), encoding='utf-8').read()
    snippet = readme.split('## Model and cache API', 1)[1].split('```python\n', 1)[1].split('```', 1)[0]
    torch._dynamo.reset()
    namespace = {}
    exec(compile(snippet, 'README.md', 'exec'), namespace)
    assert namespace['out'].shape == (2, 340) and namespace['cache'].length == 0
    assert namespace['static'].length == 321


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('regime', list(REGIMES))
def test_pythia_70m_shape_at_2048_on_the_meta_device(regime, dtype, monkeypatch):
    # Shapes, dtypes and device placement of a GPU-sized step without the memory or the time: the
    # pythia-70m shape at T=2048 (one of its six identical layers), every path forward and backward,
    # and a cache prefill + decode step.
    monkeypatch.setitem(model.FUSED_BLOCK, 'cpu', 128)  # the real block: 16 of them, not 256
    window, rank = model.regime_settings(regime, 256, 16)
    with torch.device('meta'):
        m = GPT(GPTConfig.from_preset('pythia-70m', n_layer=1, dar_window=window, dar_rank=rank)).to(dtype)
        idx = torch.zeros(1, 2048, dtype=torch.long)
    for impl in ('sdpa', 'fused', 'naive'):
        m.config.attn_impl = impl
        logits, loss = m(idx, idx)
        assert logits.shape == (1, 2048, 50304) and logits.dtype == dtype and logits.device.type == 'meta'
        loss.backward()
        assert all(p.grad.shape == p.shape and p.grad.dtype == dtype for p in m.parameters())
        m.zero_grad(set_to_none=True)
    with torch.no_grad():
        cache = m.new_cache(1, 2049)
        assert m(idx, cache=cache)[0].shape == (1, 2048, 50304)
        assert m(idx[:, :1], cache=cache)[0].shape == (1, 1, 50304) and cache.length == 2049
        # A static cache counts on the device, which the meta device cannot: its decode step alone.
        assert m(idx[:, :1], cache=m.new_cache(1, 2049, static=True))[0].shape == (1, 1, 50304)


@pytest.mark.parametrize('regime', list(REGIMES))
def test_a_training_step_and_a_decode_step_make_no_host_sync(regime):
    with OpCounter() as control:
        torch.ones(2).nonzero(), torch.ones(2).sum().item()  # the check sees them
    assert control.syncs == ['nonzero', '_local_scalar_dense']
    m = make_model(regime)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(9))
    for impl in ('sdpa', 'fused'):
        m.config.attn_impl = impl
        with OpCounter() as counter:  # what train.py runs on the device each step (its AdamW is fused on CUDA)
            m(idx, idx)[1].backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        assert counter.syncs == [], impl
    with torch.no_grad():  # (FlexAttention is a higher-order op the counter cannot enter; on CUDA a kernel)
        for static, attn in itertools.product((False, True), ('reference', 'reduce')):
            cache = split_decode.use_decode_attn(m, attn).new_cache(2, 40, static=static)
            m(idx[:, :W + 3], cache=cache)
            with OpCounter() as counter:
                m(idx[:, W + 3:W + 4], cache=cache)
            assert counter.syncs == [], f'static={static}, {attn}'


@pytest.mark.parametrize('impl', ['sdpa', 'fused'])
@pytest.mark.parametrize('regime', list(REGIMES))
def test_a_training_step_compiles_as_one_graph_once(regime, impl, monkeypatch):
    # What torch.compile on a GPU meets first: a graph break or a guard on a value that changes each
    # step. aot_eager traces forward and backward as inductor would, without generating code.
    monkeypatch.setitem(model.FUSED_BLOCK, 'cpu', 16)  # two query blocks: the loop traced, briefly
    eager, m = make_model(regime, attn_impl=impl, n_layer=1), make_model(regime, attn_impl=impl, n_layer=1)
    torch._dynamo.reset()
    step = torch.compile(m, fullgraph=True, backend='aot_eager')
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):  # a second batch: no recompile
            idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(seed))
            step(idx, idx)[1].backward()
            eager(idx, idx)[1].backward()
    for p, q in zip(m.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('regime', list(REGIMES))
def test_auto_follows_the_measured_table(regime):
    # docs/benchmarks.md: on CUDA SDPA's flash kernel for full attention and FlexAttention for the regimes with a
    # window (sdpa's T x 2T mask costs them more than full's step), never the launch-bound fused loop; on a CPU the
    # fused path from 1k tokens.
    config = small_config(regime, block_size=8192)
    auto = lambda device, T: model.resolve_attn_impl(config, T, torch.device(device))
    assert {auto('cuda', T) for T in (64, 2048, 8192)} == {'sdpa' if regime == 'full' else 'flex'}
    assert (auto('cpu', 512), auto('cpu', 4096)) == ('sdpa', 'sdpa' if regime == 'full' else 'fused')
