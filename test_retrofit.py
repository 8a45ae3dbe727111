"""Starting from a trained model: the GPT-NeoX import against transformers' own model, and the
data-calibrated latent maps. Run: python -m pytest -q"""
import pytest
import torch

import retrofit
from model import GPT, GPTConfig

transformers = pytest.importorskip('transformers')

# tiny shapes: 4 heads of 16 dims, a window of 8 inside 40-token sequences
SHAPE = dict(vocab_size=101, n_layer=2, n_head=4, n_embd=64, block_size=64)


def random_neox(tmp_path, **kw):
    """A randomly initialised transformers GPTNeoXForCausalLM, saved to tmp_path (no network)."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64, **kw)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so a mix-up shows
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize('kw', [
    dict(use_parallel_residual=True, rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5),
    dict(use_parallel_residual=False, rotary_pct=0.5, rotary_emb_base=500, layer_norm_eps=1e-3),
])
def test_neox_logits_equal_transformers(tmp_path, kw):
    hf = random_neox(tmp_path, **kw)
    ours = retrofit.from_pretrained(str(tmp_path)).eval()
    assert ours.config.parallel_residual == kw['use_parallel_residual']
    idx = torch.randint(0, 101, (3, 37))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_neox_import_to_dar_keeps_every_weight(tmp_path):
    random_neox(tmp_path)
    full = retrofit.from_pretrained(str(tmp_path))
    dar = retrofit.from_pretrained(str(tmp_path), dar_window=8, dar_rank=4, block_size=40)
    assert dar.config.regime == 'dar' and dar.config.block_size == 40
    for name, t in full.state_dict().items():
        assert torch.equal(t, dar.state_dict()[name]), name


def test_neox_import_rejects_another_layout(tmp_path):
    random_neox(tmp_path, hidden_act='relu')
    with pytest.raises(ValueError, match='hidden_act'):
        retrofit.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match='cannot load a GPT-NeoX model'):
        retrofit.from_pretrained(str(tmp_path / 'nothing-here'))


def trained_like(regime_kw, seed=0):
    """A full model with weights away from init, and a DAR copy of it: (full, dar, calibration batches)."""
    torch.manual_seed(seed)
    full = GPT(GPTConfig(**SHAPE, rotary_pct=0.5))
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith('c_attn.weight'):  # anisotropic keys, as trained ones are
                p.mul_(torch.linspace(0.1, 3.0, p.shape[1]))
    dar = GPT(GPTConfig(**SHAPE, rotary_pct=0.5, **regime_kw))
    retrofit.load_base_weights(dar, full.state_dict(), 'the full model')
    batches = [torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    return full, dar, batches


@pytest.mark.parametrize('maps', ['free', 'tied'])
@pytest.mark.parametrize('window', [8, 0])  # dar and uniform
def test_calibrated_maps_at_full_rank_reproduce_full_attention(maps, window):
    full, dar, batches = trained_like(dict(dar_window=window, dar_rank=16, dar_maps=maps))
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        for block in dar.transformer.h:  # not orthonormal: at r = d the random init is exact too
            block.attn.down_k.normal_()
            block.attn.down_v.normal_()
        before = (dar(idx)[0] - full(idx)[0]).abs().max().item()
        retrofit.calibrate_latents(dar, batches)
        after = (dar(idx)[0] - full(idx)[0]).abs().max().item()
    assert after < 1e-4 < before


def keys_and_values(model, batches):
    """Per layer, (k, v) of every calibration token, (H, N, d), as the full-attention model computes them."""
    store = {i: [] for i in range(len(model.transformer.h))}
    hooks = [b.attn.register_forward_pre_hook(lambda a, args, i=i: store[i].append(a.qkv(*args[:3])[1:]))
             for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        for idx in batches:
            model.hidden_states(idx)
    for h in hooks:
        h.remove()
    H, d = model.config.n_head, model.config.head_dim
    return [[torch.cat([t[j].transpose(0, 1).reshape(H, -1, d) for t in store[i]], 1) for j in (0, 1)]
            for i in store]


def reconstruction_error(dar, kv):
    total = 0.0
    with torch.no_grad():
        for block, (k, v) in zip(dar.transformer.h, kv):
            down_k, up_k, down_v, up_v = block.attn.latent_maps()
            total += ((k @ down_k @ up_k - k).square().sum() + (v @ down_v @ up_v - v).square().sum()).item()
    return total


def test_calibrated_maps_reconstruct_better_than_random():
    full, dar, batches = trained_like(dict(dar_window=8, dar_rank=4))
    kv = keys_and_values(full, batches)
    random_error = reconstruction_error(dar, kv)
    retrofit.calibrate_latents(dar, batches)
    calibrated_error = reconstruction_error(dar, kv)
    assert calibrated_error < random_error
    # the best rank-4 subspace: no other (here: a perturbed one) does better on these keys
    with torch.no_grad():
        for block in dar.transformer.h:
            q = torch.linalg.qr(block.attn.down_k + 0.05 * torch.randn_like(block.attn.down_k))[0]
            block.attn.down_k.copy_(q)
            block.attn.up_k.copy_(q.transpose(-2, -1))
    assert reconstruction_error(dar, kv) > calibrated_error


def test_calibration_needs_latents():
    full, _, batches = trained_like(dict(dar_window=8, dar_rank=4))
    with pytest.raises(ValueError, match='no latent maps'):
        retrofit.calibrate_latents(full, batches)


def test_base_weights_must_fit():
    full, dar, _ = trained_like(dict(dar_window=8, dar_rank=4))
    wider = GPT(GPTConfig(**{**SHAPE, 'n_embd': 128}, dar_window=8))
    with pytest.raises(ValueError, match='do not fit this model.*n_embd'):
        retrofit.load_base_weights(wider, full.state_dict(), 'the full model')
    # latent maps of another rank are re-initialised, not an error
    assert len(retrofit.load_base_weights(dar, GPT(GPTConfig(**SHAPE, dar_window=8, dar_rank=2)).state_dict(), 'r2')) == 4 * 2
