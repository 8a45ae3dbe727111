"""
A compact GPT (Pythia / GPT-NeoX layout) with Distance-Adaptive Representation (DAR) attention,
after arXiv 2606.18587. This file is *our reading* of the paper, not its code.

Per head (head dim d, latent rank r, window W), with q, k, v after the rotary embedding:

    local   j in L(i) = { 0 <= i - j < W }:  score q_i . k_j,           value v_j
    distant j in D(i) = { i - j >= W }:      score (q_i U^T) . a_j,     value (sum_j p_ij b_j) V
    where a_j = k_j A and b_j = v_j C are r-dim latents (A, C: d x r down, U, V: r x d up),
    and one softmax runs over L(i) u D(i).

A distant token is only ever read as its latent (a_j, b_j): 2r numbers per head instead of 2d; the up
maps meet the query and the weighted latent sum, never a cached token. Full attention, uniform reduction
and local-only are settings of the same block (regime_settings). Exact, interchangeable attention paths:
naive (the reference), sdpa, fused (blockwise, flash-style backward), flex (flex.py), the absorbed decode step.
Reading order: config, the local/distant rule, attention, DARAttention, Block, GPT, KVCache, the fused path.
"""

import math
import warnings
from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import cache_matmul, check_sampling, sample_next

# ---- Configuration

ATTN_IMPLS = ('auto', 'sdpa', 'fused', 'naive', 'flex')
DAR_MAPS = ('free', 'tied')
REGIMES = ('full', 'dar', 'uniform', 'local')

# Model shapes. The Pythia ones follow EleutherAI's configs (50,304 = GPT-NeoX's padded vocab).
PRESETS = {
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, block_size=512, vocab_size=8192),
    'pythia-70m': dict(n_layer=6, n_head=8, n_embd=512, block_size=2048, vocab_size=50304),
    'pythia-160m': dict(n_layer=12, n_head=12, n_embd=768, block_size=2048, vocab_size=50304),
    'pythia-410m': dict(n_layer=24, n_head=16, n_embd=1024, block_size=2048, vocab_size=50304),
}


def regime_settings(regime, window=None, rank=None):
    """(dar_window, dar_rank) of a regime, the one table of the four (GPTConfig.regime reads it back)."""
    table = {'full': (None, None), 'dar': (window, rank), 'uniform': (0, rank), 'local': (window, 0)}
    if regime not in table:
        raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(table)}")
    return table[regime]


@dataclass
class GPTConfig:
    block_size: int = 512
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dar_window: Optional[int] = None  # W; None or >= block_size: full attention
    dar_rank: Optional[int] = None  # r per head; None: head_dim // 4; 0: local-only
    dar_maps: str = 'free'  # 'free': learned down and up maps; 'tied': up = down^T
    attn_impl: str = 'auto'
    rotary_pct: float = 0.25  # fraction of each head's dims that get the rotary embedding
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    tie_embeddings: bool = False
    bias: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'dar_window', 'dar_rank'):
            value, optional = getattr(self, name), name.startswith('dar_')  # the dar ones: None or >= 0
            if not (optional and value is None or type(value) is int and value >= 1 - optional):
                raise ValueError(f"{name} must be {'None or ' * optional}an integer >= {1 - optional}, got {value!r}")
        self.dar_rank = self.head_dim // 4 if self.dar_rank is None else self.dar_rank
        for ok, message in (
                (self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
                (self.dar_rank <= self.head_dim, f"dar_rank must be <= head_dim {self.head_dim}, got {self.dar_rank}"),
                (self.dar_window != 0 or self.dar_rank > 0, "dar_window=0 with dar_rank=0 leaves no key to attend to; "
                 "set dar_rank > 0 (uniform reduction) or dar_window > 0 (local-only)"),
                (self.dar_maps in DAR_MAPS, f"dar_maps must be one of {DAR_MAPS}, got {self.dar_maps!r}"),
                (self.attn_impl in ATTN_IMPLS, f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}"),
                (0.0 <= self.rotary_pct <= 1.0, f"rotary_pct must be in [0, 1], got {self.rotary_pct}"),
                (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")):
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    head_dim = property(lambda self: self.n_embd // self.n_head)

    @property
    def regime(self):
        if self.dar_window is None or self.dar_window >= self.block_size:
            return 'full'
        if self.dar_rank == 0:
            return 'local'
        return 'uniform' if self.dar_window == 0 else 'dar'

    window = property(lambda self: None if self.regime == 'full' else self.dar_window)  # None: unbounded
    has_latents = property(lambda self: self.regime in ('dar', 'uniform'))


# ---- The local/distant rule, written once: every mask and every index bound below comes from it


def first_local(i, window):
    """Query i reads key j <= i in full dims if j >= first_local(i), else as a latent (i: int or tensor)."""
    return i - window + 1 if window is not None else i * 0


def visible(q_pos, k_pos, window):
    """(local, distant) masks (len(q_pos), len(k_pos)): keys read in full dims, keys read as latents."""
    i, j = q_pos[:, None], k_pos[None, :]
    start = first_local(i, window)
    return (j >= start) & (j <= i), j < start


# ---- Attention: q, k, v (B, H, T, d) after rotary. maps: (down_k, up_k, down_v, up_v) of shapes
# (H, d, r), (H, r, d), (H, d, r), (H, r, d), or None without latents. window: W, or None.


def naive_attention(q, k, v, window, maps):
    """The reference: the masked score matrix written out, distant keys rebuilt in d dims."""
    T, d = q.shape[-2:]
    pos = torch.arange(T, device=q.device)
    local, far = visible(pos, pos, window)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(d)  # (B, H, T, T)
    if maps is None or window is None:
        return torch.softmax(scores.masked_fill(~local, float('-inf')), -1).to(q.dtype) @ v
    down_k, up_k, down_v, up_v = maps
    k_far, v_far = k @ down_k @ up_k, v @ down_v @ up_v  # (B, H, T, d): through the r-dim latents
    scores = torch.where(far, (q.float() @ k_far.float().transpose(-2, -1)) / math.sqrt(d), scores)
    p = torch.softmax(scores.masked_fill(~(local | far), float('-inf')), -1).to(q.dtype)
    return (p * local) @ v + (p * far) @ v_far


def sdpa_attention(q, k, v, window, maps):
    """One scaled_dot_product_attention call: the fused kernels PyTorch has."""
    T = q.shape[-2]
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pos = torch.arange(T, device=q.device)
    local, far = visible(pos, pos, window)
    if maps is None:  # local-only: a banded mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=local)
    down_k, up_k, down_v, up_v = maps
    k_far, v_far = k @ down_k @ up_k, v @ down_v @ up_v
    if window == 0:  # uniform: every key is distant
        return F.scaled_dot_product_attention(q, k_far, v_far, is_causal=True)
    # One softmax over 2T keys: the full-dim copy is visible inside the window, the rebuilt one beyond.
    return F.scaled_dot_product_attention(
        q, torch.cat([k, k_far], dim=-2), torch.cat([v, v_far], dim=-2), attn_mask=torch.cat([local, far], -1))


def decode_attention(q, view, up_k, up_v):
    """One new token q (B, H, 1, d) against its CacheView: view.k in its window, every latent distant. Absorbed: the up
    maps meet q and the latent sum, never a token. Products in the cache's dtype, the keys' as k q^T (MKL's faster
    form); one float32 softmax over both score sets apart, in place (no fresh pages), divided after the sums, base 2."""
    q = q * (math.log2(math.e) / math.sqrt(q.shape[-1]))
    scores = [cache_matmul(view.k, q.transpose(-2, -1)).transpose(-2, -1).float()]  # (B, H, 1, n_near): k_j . q
    if view.a is not None:  # (B, H, 1, n_far): (q U^T) . a_j, where q U^T is (B, H, 1, r)
        scores.append(cache_matmul(q @ up_k.transpose(-2, -1), view.a.transpose(-2, -1)).float())
    for s, mask in zip(scores, view.mask.split([s.shape[-1] for s in scores]) if view.mask is not None else ()):
        s.add_(mask)
    top = torch.stack([s.amax(-1, keepdim=True) for s in scores if s.shape[-1]]).amax(0)  # (B, H, 1, 1)
    total = sum(s.sub_(top).exp2_().sum(-1, keepdim=True) for s in scores)  # e_j = 2^(s_j - top); p_j = e_j / total
    out = cache_matmul(scores[0].to(view.v.dtype), view.v)  # sum_j e_j v_j
    out = out + cache_matmul(scores[1].to(out.dtype), view.b) @ up_v if view.a is not None else out  # + (sum e_j b_j) V
    return (out / total).to(view.v.dtype)


def fused_attention(q, k, v, window, maps):
    return FusedDARAttention.apply(q, k, v, *(maps or (None,) * 4), window, FUSED_BLOCK['cuda' if q.is_cuda else 'cpu'])


ATTENTION = {'naive': naive_attention, 'sdpa': sdpa_attention, 'fused': fused_attention,
             'flex': lambda *args: __import__('flex').dar_attention(*args)}  # latent space, for GPUs: flex.py


def resolve_attn_impl(config, T, device):
    """The path 'auto' stands for at length T, after bench.py's tables (docs/benchmarks.md): SDPA's causal kernel
    for full attention; for the other regimes the fused path on a CPU from 1k tokens, FlexAttention on CUDA."""
    if config.attn_impl != 'auto':
        return config.attn_impl
    return 'sdpa' if config.regime == 'full' else {'cpu': 'fused' if T >= 1024 else 'sdpa', 'cuda': 'flex'}.get(
        device.type, 'sdpa')


# ---- The model


def rotary_cos_sin(positions, rot_dim, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device).float() / rot_dim))
    emb = (positions.float()[:, None] * inv_freq[None, :]).repeat(1, 2)  # (T, rot): the frequencies twice
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """GPT-NeoX rotary on the first cos.shape[-1] dims of each head; the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat([(x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype), x_pass], dim=-1)


class DARAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        if config.has_latents:
            H, d, r = config.n_head, config.head_dim, config.dar_rank
            self.down_k, self.down_v = nn.Parameter(torch.empty(H, d, r)), nn.Parameter(torch.empty(H, d, r))
            if config.dar_maps == 'free':
                self.up_k, self.up_v = nn.Parameter(torch.empty(H, r, d)), nn.Parameter(torch.empty(H, r, d))

    def latent_maps(self):
        """(down_k, up_k, down_v, up_v), or None. 'tied': a distant key is read back as its projection
        onto the span of down_k (which training moves), not through a second, free matrix."""
        if not self.config.has_latents:
            return None
        if self.config.dar_maps == 'tied':
            return self.down_k, self.down_k.transpose(-2, -1), self.down_v, self.down_v.transpose(-2, -1)
        return self.down_k, self.up_k, self.down_v, self.up_v

    def qkv(self, x, cos, sin):
        """q, k, v (B, H, T, d) of x (B, T, C), q and k after the rotary embedding."""
        B, T, C = x.shape  # (B, T, 3C) -> (B, T, 3, H, d) -> (3, B, H, T, d):
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return *apply_rotary(qkv[:2], cos, sin), qkv[2]  # q and k rotated in one call: half the rotary ops

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x, cos, sin)
        maps = self.latent_maps()  # under autocast q, k, v are bf16 and the maps' parameters float32:
        maps = None if maps is None else tuple(m.to(q.dtype) for m in maps)
        # Outside autocast, in its dtype of q, k, v: scores stay float32, the fused backward sees its forward's dtypes
        with torch.autocast('cpu' if x.device.type == 'meta' else x.device.type, enabled=False):
            view = None if cache is None else cache.update(self.layer_idx, k, v, maps)
            up_k, up_v = (None, None) if maps is None else maps[1::2]
            if view is not None and T == 1:
                y = getattr(self, 'decode', decode_attention)(q, view, up_k, up_v)  # other forms: split_decode.py
            elif view is None or cache.step.start == 0:  # training, or a prompt: the fused kernels (flash on CUDA)
                y = ATTENTION[resolve_attn_impl(self.config, T, x.device)](q, k, v, self.config.window, maps)
            else:  # a later chunk: the blockwise forward, over the older keys it reads too
                y, _ = dar_forward(q, view.k, view.v, view.a, view.b, up_k, up_v, self.config.window,
                                   cache.prefill_block, q_start=cache.step.start)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, H, T, d) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = DARAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None):
        attn = self.dropout(self.attn(self.ln_1(x), cos, sin, cache))
        h = x + attn  # the MLP reads x beside the attention (parallel, GPT-NeoX), or after it
        return h + self.dropout(self.mlp(self.ln_2(x if self.parallel_residual else h)))


def init_latent_maps(down, up, directions=None):
    """down (H, d, r) := orthonormal columns (directions, or random), up := down^T (None: tied), in place."""
    with torch.no_grad():
        down.copy_(torch.linalg.qr(torch.randn(down.shape))[0] if directions is None else directions)
        if up is not None:
            up.copy_(down.transpose(-2, -1))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rot_dim = int(config.head_dim * config.rotary_pct) // 2 * 2
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for attn in (block.attn for block in self.transformer.h if config.has_latents):
            init_latent_maps(attn.down_k, getattr(attn, 'up_k', None))
            init_latent_maps(attn.down_v, getattr(attn, 'up_v', None))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """non_embedding leaves out the token embedding and the output layer, as Pythia's counts do."""
        embeddings = {id(p): p.numel() for p in (self.transformer.wte.weight, self.lm_head.weight)}  # tied: once
        return sum(p.numel() for p in self.parameters()) - non_embedding * sum(embeddings.values())

    def hidden_states(self, idx, cache=None):
        """The final-layer-normed states (B, T, C) of idx (B, T), with a cache continuing its sequence."""
        T = idx.shape[1]
        if cache is None and T > self.config.block_size:
            raise ValueError(f"length {T} exceeds block_size {self.config.block_size}: crop it, or use a KV cache")
        pos = torch.arange(T, device=idx.device) if cache is None else cache.begin(idx, self.compute_dtype(idx.device))
        cos, sin = rotary_cos_sin(pos, self.rot_dim, self.config.rotary_base)
        x, ran = self.transformer.drop(self.transformer.wte(idx)), False
        try:
            for block in self.transformer.h:
                x = block(x, cos, sin, cache)
            ran = True
        finally:
            if cache is not None:
                cache.end_step(ran)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        logits = self.lm_head(self.hidden_states(idx, cache))
        if targets is None:
            return logits, None  # targets -1: not counted
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def param_groups(self):
        """Names of the optimizer's groups: matrices and latent maps decay, biases and norms do not."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = dict(self.named_parameters())
        groups = [{'params': [params[n] for n in names], 'weight_decay': decay}
                  for names, decay in zip(self.param_groups(), (weight_decay, 0.0))]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda' or None)

    def flops_per_token(self, T):
        """Training FLOPs per token at context T (PaLM appendix B style, causal average)."""
        cfg, mean_keys = self.config, (T + 1) / 2
        full = mean_keys if cfg.window is None else min(mean_keys, cfg.window)
        latent = mean_keys - full if cfg.has_latents else 0.0
        attended_dims = full * cfg.head_dim + latent * cfg.dar_rank  # per head, per query, in q . k and p . v
        return 6 * self.get_num_params(non_embedding=False) + 12 * cfg.n_layer * cfg.n_head * attended_dims

    def compute_dtype(self, device):
        """The dtype the attention computes in, and the KV cache holds: autocast's, else the weights'."""
        device_type = torch.device(device).type
        autocast = device_type != 'meta' and torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if autocast else self.transformer.wte.weight.dtype

    def new_cache(self, batch_size, max_seq_len, device=None, dtype=None, static=False):
        """A KVCache, by default on the model's device in its compute dtype (call it under the autocast
        you decode with). static: decode steps of one shape, to compile them."""
        device = self.transformer.wte.weight.device if device is None else device
        return KVCache(self.config, batch_size, max_seq_len, device, dtype or self.compute_dtype(device), static)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None, n_tokens=None,
                 step=None):
        """Prefill idx (B, T), then sample a token a step from the KV cache (temperature 0: greedy), below n_tokens
        (the rest is vocabulary padding). Rows that emitted eos_token repeat it; generation stops once all have.
        step: this model compiled (sampling.compile_step) decodes on a static cache, one graph a step (gpt-fast)."""
        V = min(n_tokens or self.config.vocab_size, self.config.vocab_size)
        if idx.dim() != 2 or not idx.shape[1] or idx.is_floating_point() or not 0 <= idx.min() <= idx.max() < V:
            raise ValueError(f"idx must be token ids in [0, {V}), shape (B, T > 0), got {idx.dtype} {tuple(idx.shape)}")
        (B, T), x, done = idx.shape, idx, torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        check_sampling(temperature, top_k, top_p, max_new_tokens)  # now, not after the prefill
        if T + max_new_tokens > self.config.block_size:
            warnings.warn(f"{T} prompt + {max_new_tokens} new tokens go past the trained context (block_size "
                          f"{self.config.block_size}): expect worse text there", stacklevel=2)
        cache, out = self.new_cache(B, T + max_new_tokens, device=idx.device, static=step is not None), [idx]
        for i in range(max_new_tokens):  # the prompt eagerly, then one compiled graph a step
            compiled = i and step is not None
            last = step(x, cache=cache)[0][:, -1] if compiled else self.lm_head(self.hidden_states(x, cache)[:, -1])
            x = sample_next(last, temperature, top_k, top_p, V)[:, None]
            if eos_token is not None:  # (done.all() waits for the device: only where it can be true)
                x = x.masked_fill(done[:, None], eos_token)
                done |= x[:, 0] == eos_token
            out.append(x)
            if eos_token is not None and done.all():
                break
        return torch.cat(out, dim=1)


# ---- KV cache

# A step, planned once for all layers: new tokens at [start, start + n) go to ring_slots (the last ones) and
# latent_slots (the first); a chunk also reads older_slots (or None) in full dims. A decode step reads ring
# slots [0, held) and latents [0, n_far), and (static) adds mask to its scores.
CacheStep = namedtuple('CacheStep', 'start n ring_slots older_slots latent_slots held n_far mask')
CacheView = namedtuple('CacheView', 'k v a b mask')  # what a layer reads: a chunk's k ends with the chunk


class KVCache:
    """Preallocated DAR KV cache. It only stores: `update` writes a layer's new keys and values and hands back what
    that layer reads; the attention attends. Per layer, tensors of its own (a compiled step writes them in place): a
    ring of the last W keys and values in full dims (B, H, W, d), latents (a, b) held (B, H, r, max_seq_len - W) (a
    one-row product reads them faster so) and handed out as (B, H, n, r), each computed when its token is written, so
    a ring slot can be overwritten at any time. Full attention: a ring of max_seq_len; local-only: no latents. A step:
    begin() (checks, plans), update() per layer, end_step(). A decode step that raised can be run again; a chunk that
    raised may have overwritten ring slots it reads, so the cache then refuses input until reset(). static: a decode
    step reads every slot, masking unwritten ones, and takes its position as a tensor: one graph (CUDA graph) a step."""

    prefill_block = 256  # query block of a chunk: scores are (B, H, block, context) at a time

    def __init__(self, config, batch_size, max_seq_len, device, dtype, static=False):
        if max_seq_len <= 0 or batch_size <= 0 or not dtype.is_floating_point:
            raise ValueError(f"batch_size and max_seq_len must be positive and dtype floating, got {batch_size}, "
                             f"{max_seq_len}, {dtype}")
        self.window, self.static, self.step, self.broken = config.window, static, None, False
        self.batch_size, self.max_seq_len, self.dtype = batch_size, max_seq_len, dtype
        layers, B, H, d, r = config.n_layer, batch_size, config.n_head, config.head_dim, config.dar_rank
        self.ring_size = max_seq_len if self.window is None else min(self.window, max_seq_len)
        zeros = lambda *shape: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.k, self.v = (zeros(B, H, self.ring_size, d) for _ in 'kv')
        self.device = self.k[0].device  # 'cuda' means the current device: under DDP, this rank's
        self.a = self.b = []  # per layer, with latents
        if config.has_latents and max_seq_len > self.window:  # static: a column per position, written by index
            self.a, self.b = (zeros(B, H, r, max_seq_len - (not static) * self.window) for _ in 'ab')
        self.n_cached, self.pos = 0, torch.zeros(1, dtype=torch.long, device=device)  # static: counted in pos
        self.n_latents = self.a[0].shape[-1] if self.a else 0
        # static: ring slot s is read from position s on, latent row j once first_local passes it. A compiled step's
        # softmax compares these (floats, exact to 2^24) with the position, cheaper than the rule for every score
        self.read_after = torch.cat([torch.arange(self.ring_size) - 1, torch.arange(self.n_latents) - first_local(
            0, self.window)]).to(device, torch.float32)
        for t in [t for t in (*self.k, *self.v, *self.a, *self.b, self.pos, self.read_after) if static]:
            torch._dynamo.mark_static_address(t)  # written in place by a replayed CUDA graph: never copied

    nbytes = lambda self: sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.a, *self.b))
    length = property(lambda self: int(self.pos) if self.static else self.n_cached)  # tokens cached

    def reset(self, length=0):  # stale entries are never read; length > 0: as if that many were (benchmarks)
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"reset(length={length}): a cache holds 0 to max_seq_len = {self.max_seq_len} tokens")
        self.n_cached, self.step, self.broken = length, None, False
        self.pos.fill_(length)

    def begin(self, idx, dtype):
        """Checks the next chunk idx (B, n) (activations in dtype) and plans its step; returns its positions."""
        (B, n), S, n_latents = idx.shape, self.ring_size, self.n_latents
        on_device = self.static and n == 1  # a static decode step reads no host number: one graph for all steps
        start = None if on_device else self.length
        for bad, message in (
                (self.broken, "a chunk raised partway and left this cache half written: call cache.reset()"),
                (torch.is_grad_enabled(), "the KV cache is written in place, so autograd cannot run through it: "
                                          "decode under torch.no_grad()"),
                (dtype != self.dtype, f"the model computes in {dtype}, the cache holds {self.dtype}: make it with "
                                      "model.new_cache(..., dtype=...) or under the autocast you decode with"),
                (B != self.batch_size, f"batch size {B}, the cache's {self.batch_size}: new_cache(batch_size=...)"),
                (idx.device != self.device, f"input is on {idx.device}, the cache on {self.device}: move one"),
                (not on_device and start + n > self.max_seq_len, f"{start} cached + {n} new tokens exceed the "
                 f"cache's max_seq_len {self.max_seq_len}: make a larger cache, or cache.reset()")):
            if bad:
                raise ValueError(message)
        if on_device:  # read every slot, mask what is not written yet; the position is a tensor
            pos, past = self.pos, f"a static cache step past its max_seq_len {self.max_seq_len}: make a larger cache"
            torch._assert_async(pos[0] < self.max_seq_len, past)  # checked on the device, raised at a sync
            wrap = lambda n: pos % n if n else pos[:0]  # slots in bounds even past the end: the assert reports it
            mask = torch.where(self.read_after >= pos, -math.inf, 0.0)  # (slots,): -inf where not read yet
            self.step = CacheStep(pos, 1, wrap(S), None, wrap(n_latents), S, n_latents, mask)
            return pos
        slots = lambda lo, hi: torch.arange(lo, hi, device=self.device) % max(S, 1)
        n_older = 0 if n == 1 else min(start, S if self.window is None else max(0, self.window - 1))
        n_far = min(n_latents, max(0, first_local(start + n - 1, self.window)))  # those the newest token reads
        self.step = CacheStep(start, n, slots(start + n - min(n, S), start + n),
                              slots(start - n_older, start) if n_older else None,
                              torch.arange(start, max(start, min(start + n, n_latents)), device=self.device),
                              min(start + n, S), n_far, None)
        return torch.arange(start, start + n, device=self.device)

    def update(self, layer, k, v, maps):
        """Writes a layer's new keys and values (B, H, n, d) and their latents; returns its CacheView."""
        st, ring_k, ring_v, new_k, new_v = self.step, self.k[layer], self.v[layer], k, v
        if st.older_slots is not None:  # gathered before the writes below can overwrite them
            k = torch.cat([ring_k.index_select(2, st.older_slots), k], 2)
            v = torch.cat([ring_v.index_select(2, st.older_slots), v], 2)
        if self.a:  # the first len(latent_slots) new tokens; later ones are never distant
            m = len(st.latent_slots)
            self.a[layer].index_copy_(3, st.latent_slots, (new_k[:, :, :m] @ maps[0]).transpose(-2, -1))
            self.b[layer].index_copy_(3, st.latent_slots, (new_v[:, :, :m] @ maps[2]).transpose(-2, -1))
        m = len(st.ring_slots)
        ring_k.index_copy_(2, st.ring_slots, new_k[:, :, st.n - m:])
        ring_v.index_copy_(2, st.ring_slots, new_v[:, :, st.n - m:])
        a, b = (t[layer][..., :st.n_far].transpose(-2, -1) if t else None for t in (self.a, self.b))
        if st.n > 1:  # a chunk: its keys in position order; a decode step: the ring's written slots
            return CacheView(k, v, a, b, None)
        return CacheView(ring_k[:, :, :st.held], ring_v[:, :, :st.held], a, b, st.mask)

    def end_step(self, ran):  # keeps a step that ran; of one that raised nothing (a chunk may break the ring)
        st, self.step = self.step, None
        if self.static:  # counted on the device: a compiled step reads no host number
            self.pos += st.n * ran
        else:
            self.n_cached += st.n * ran
        self.broken |= not ran and st.older_slots is not None and st.start + st.n > self.ring_size


# ---- The fused path: blockwise, one online softmax, a flash-style backward. No T x T matrix.

FUSED_BLOCK = {'cpu': 128, 'cuda': 1024}  # queries per block; scores are (B, H, block, keys) at a time

# A query block reads k[band] in full dims and latents [0, n_far), those before far_mask_from distant
# to all its queries; band_mask and far_mask (True: not read; None: nothing) cover the rest.
QueryBlock = namedtuple('QueryBlock', 'queries band n_far far_mask_from band_mask far_mask')


def query_blocks(n, n_before, q_start, window, block, device):
    """QueryBlocks of n queries at q_start + arange(n), their keys in full dims the n_before tokens
    before them, then themselves. As in flash attention only the diagonal tiles need a mask."""
    k_start = q_start - n_before  # the position of key 0
    for s in range(0, n, block):
        e = min(s + block, n)
        first, last = q_start + s, q_start + e - 1  # the block's first and last query positions
        band = slice(max(0, first_local(first, window) - k_start), e + n_before)
        n_far = max(0, first_local(last, window))
        far_mask_from = min(n_far, max(0, first_local(first, window)))
        band_mask = far_mask = None
        if e > s + 1:
            q_pos = torch.arange(first, last + 1, device=device)
            band_mask = ~visible(q_pos, torch.arange(band.start, band.stop, device=device) + k_start, window)[0]
            if n_far > far_mask_from:
                far_mask = ~visible(q_pos, torch.arange(far_mask_from, n_far, device=device), window)[1]
        yield QueryBlock(slice(s, e), band, n_far, far_mask_from, band_mask, far_mask)


def masked_scores(q, keys, mask, mask_from=0):
    """q . keys in float32 (bf16 would round them), -inf where mask (of columns mask_from on) is True."""
    s = q.float() @ keys.float().transpose(-2, -1)
    if mask is not None:
        s[..., mask_from:].masked_fill_(mask, float('-inf'))
    return s


def dar_forward(q, k, v, a, b, up_k, up_v, window, block, q_start=0):
    """Exact DAR attention of q (B, H, n, d) at positions q_start + arange(n), blockwise, with one
    online softmax. k, v (B, H, n_before + n, d): the tokens before q that it reads in full dims (in
    training none), then its own; a, b (B, H, >= n_far, r): latents, or None. Returns (out, float32 lse)."""
    n, q = q.shape[-2], q * (1.0 / math.sqrt(q.shape[-1]))
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
    for blk in query_blocks(n, k.shape[-2] - n, q_start, window, block, q.device):
        qb, far = q[..., blk.queries, :], slice(0, blk.n_far)
        pieces = []  # (scores, values) of the keys read in full dims, then of the latents
        if window != 0:
            pieces.append((masked_scores(qb, k[..., blk.band, :], blk.band_mask), v[..., blk.band, :]))
        latent = a is not None and blk.n_far > 0
        if latent:  # (q U^T) . a_j
            pieces.append((masked_scores(qb @ up_k.transpose(-2, -1), a[..., far, :], blk.far_mask, blk.far_mask_from),
                           b[..., far, :]))
        # The max over all pieces is finite: every query sees itself, in the band or as a latent.
        m = torch.stack([sc.amax(-1) for sc, _ in pieces]).amax(0)[..., None]
        total = sum(sc.sub_(m).exp_().sum(-1, keepdim=True) for sc, _ in pieces)  # scores -> p
        acc = sum((p.to(val.dtype) @ val).float() for p, val in pieces[:len(pieces) - latent])
        if latent:
            p, val = pieces[-1]
            acc = acc + ((p.to(val.dtype) @ val) @ up_v).float()  # (sum_j p_j b_j) V
        out[..., blk.queries, :] = (acc / total).to(q.dtype)
        lse[..., blk.queries] = (m + total.log()).squeeze(-1)
    return out, lse


def latents(k, v, down_k, down_v, window):
    """(a, b) of the positions [0, n_far) the last query of k sees as distant, and n_far."""
    n_far = 0 if down_k is None else max(0, first_local(k.shape[-2] - 1, window))
    return (k[..., :n_far, :] @ down_k, v[..., :n_far, :] @ down_v, n_far) if n_far else (None, None, 0)


def piece_backward(q, keys, values, dout, mask, mask_from, lse, delta):
    """(p, dvalues, dq, dkeys) of one piece of the softmax (the band, or the latents), p recomputed."""
    p = masked_scores(q, keys, mask, mask_from).sub_(lse).exp_()
    dvalues = p.to(values.dtype).transpose(-2, -1) @ dout
    ds = p.mul((dout @ values.transpose(-2, -1)).float().sub_(delta)).to(q.dtype)
    return p.to(values.dtype), dvalues, ds @ keys, ds.transpose(-2, -1) @ q


class FusedDARAttention(torch.autograd.Function):
    """dar_forward with a flash-style backward: it saves q, k, v, out and the log-sum-exp and recomputes
    probabilities and latents per block, so memory grows linearly in T, as full attention's does."""

    @staticmethod
    def forward(ctx, q, k, v, down_k, up_k, down_v, up_v, window, block):
        a, b, _ = latents(k, v, down_k, down_v, window)
        out, lse = dar_forward(q, k, v, a, b, up_k, up_v, window, block)
        ctx.save_for_backward(q, k, v, down_k, up_k, down_v, up_v, out, lse)
        ctx.window, ctx.block = window, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, down_k, up_k, down_v, up_v, out, lse = ctx.saved_tensors
        window, scale = ctx.window, 1.0 / math.sqrt(q.shape[-1])
        a, b, n_far = latents(k, v, down_k, down_v, window)
        qs = q * scale
        f32_zeros = lambda t: None if t is None else torch.zeros_like(t, dtype=torch.float32)
        dq, dk, dv, da, db, dup_k, dup_v = map(f32_zeros, (q, k, v, a, b, up_k, up_v))
        delta = (dout.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O)
        for blk in query_blocks(q.shape[-2], 0, 0, window, ctx.block, q.device):
            rows, band, far = blk.queries, blk.band, slice(0, blk.n_far)
            qb, dob, lse_b, delta_b = qs[..., rows, :], dout[..., rows, :], lse[..., rows, None], delta[..., rows, :]
            dqb = 0  # gradient of the scaled query block
            if window != 0:
                _, dvb, dq_band, dkb = piece_backward(qb, k[..., band, :], v[..., band, :], dob, blk.band_mask, 0,
                                                      lse_b, delta_b)
                dv[..., band, :] += dvb
                dk[..., band, :] += dkb
                dqb = dqb + dq_band.float()
            if a is not None and blk.n_far:
                qa, dlat = qb @ up_k.transpose(-2, -1), dob @ up_v.transpose(-2, -1)  # q U^T; d(latent sum)
                p, dbb, dqa, dab = piece_backward(qa, a[..., far, :], b[..., far, :], dlat, blk.far_mask,
                                                  blk.far_mask_from, lse_b, delta_b)
                db[..., far, :] += dbb
                da[..., far, :] += dab
                dup_v += ((p @ b[..., far, :]).transpose(-2, -1) @ dob).float().sum(0)
                dup_k += (dqa.transpose(-2, -1) @ qb).float().sum(0)
                dqb = dqb + (dqa @ up_k).float()
            dq[..., rows, :] = dqb * scale
        ddown_k = ddown_v = None
        if a is not None:  # through a = k A and b = v C
            k_far, v_far = k[..., :n_far, :].float(), v[..., :n_far, :].float()
            ddown_k = (k_far.transpose(-2, -1) @ da).sum(0).to(down_k.dtype)
            ddown_v = (v_far.transpose(-2, -1) @ db).sum(0).to(down_v.dtype)
            dk[..., :n_far, :] += da @ down_k.float().transpose(-2, -1)
            dv[..., :n_far, :] += db @ down_v.float().transpose(-2, -1)
        cast = lambda g, t: None if g is None else g.to(t.dtype)
        return (cast(dq, q), cast(dk, k), cast(dv, v), ddown_k, cast(dup_k, up_k), ddown_v, cast(dup_v, up_v),
                None, None)
