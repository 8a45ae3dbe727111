"""
A compact GPT (Pythia / GPT-NeoX layout) with Distance-Adaptive Representation (DAR)
attention, after arXiv 2606.18587. This file is *our reading* of the paper, not its code.

Per head (head dim d, latent rank r, window W), with q, k, v after the rotary embedding:

    local   j in L(i) = { 0 <= i - j < W }:  score q_i . k_j,           value v_j
    distant j in D(i) = { i - j >= W }:      score (q_i U^T) . a_j,     value (sum_j p_ij b_j) V
    where a_j = k_j A and b_j = v_j C are r-dim latents (A, C: d x r down, U, V: r x d up),
    and one softmax runs over L(i) u D(i).

A distant token is only ever read as its latent (a_j, b_j): 2r numbers per head instead of 2d.
The up maps are applied to the query and to the weighted latent sum, once per query, never
per cached token; that is what makes the KV-cache saving real.

Regimes are settings of the same block:
    full        dar_window None (or >= block_size)     standard causal attention
    dar         0 < dar_window < block_size, dar_rank r  the method
    uniform     dar_window 0, dar_rank r                 every position reduced (negative control)
    local       dar_rank 0                               sliding window, distant tokens dropped

Attention paths (attn_impl), all exact and interchangeable on one state_dict:
    sdpa    one scaled_dot_product_attention call (distant keys materialised in d dims)
    fused   pure PyTorch, blockwise, no T x T matrix, flash-style recomputing backward
    naive   the masked score matrix, written out; the ground truth for the tests
"""

import functools
import inspect
import math
import warnings
from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ('auto', 'sdpa', 'fused', 'naive')
DAR_MAPS = ('free', 'tied')

# Model shapes. The Pythia ones follow EleutherAI's configs (50,304 = GPT-NeoX's padded vocab).
PRESETS = {
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, block_size=512, vocab_size=8192),
    'pythia-70m': dict(n_layer=6, n_head=8, n_embd=512, block_size=2048, vocab_size=50304),
    'pythia-160m': dict(n_layer=12, n_head=12, n_embd=768, block_size=2048, vocab_size=50304),
    'pythia-410m': dict(n_layer=24, n_head=16, n_embd=1024, block_size=2048, vocab_size=50304),
}


@dataclass
class GPTConfig:
    block_size: int = 512
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dar_window: Optional[int] = None  # W; None or >= block_size: full attention
    dar_rank: Optional[int] = None  # r per head; None: head_dim // 4; 0: local-only
    dar_maps: str = 'free'  # 'free': learned down and up maps; 'tied': up = down^T (see DARAttention)
    attn_impl: str = 'auto'
    rotary_pct: float = 0.25  # fraction of each head's dims that get the rotary embedding
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    tie_embeddings: bool = False
    bias: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.dar_maps not in DAR_MAPS:
            raise ValueError(f"dar_maps must be one of {DAR_MAPS}, got {self.dar_maps!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dar_window is not None and self.dar_window < 0:
            raise ValueError(f"dar_window must be None (full attention) or >= 0, got {self.dar_window}")
        if self.dar_rank is None:
            self.dar_rank = self.head_dim // 4
        if not 0 <= self.dar_rank <= self.head_dim:
            raise ValueError(f"dar_rank must be in [0, head_dim={self.head_dim}], got {self.dar_rank}")
        if self.dar_window == 0 and self.dar_rank == 0:
            raise ValueError("dar_window=0 with dar_rank=0 leaves no key to attend to; "
                             "set dar_rank > 0 (uniform reduction) or dar_window > 0 (local-only)")

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def regime(self):
        if self.dar_window is None or self.dar_window >= self.block_size:
            return 'full'
        if self.dar_rank == 0:
            return 'local'
        return 'uniform' if self.dar_window == 0 else 'dar'

    @property
    def window(self):
        """The attention window, None when unbounded (full attention)."""
        return None if self.regime == 'full' else self.dar_window

    @property
    def has_latents(self):
        return self.regime in ('dar', 'uniform')


def regime_settings(regime, window=None, rank=None):
    """(dar_window, dar_rank) of a regime: the one table of the four regimes, used by compare.py,
    bench.py and the tests. window: W of dar and local; rank: r of dar and uniform (None: d/4)."""
    table = {'full': (None, None), 'dar': (window, rank), 'uniform': (0, rank), 'local': (window, 0)}
    if regime not in table:
        raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(table)}")
    return table[regime]


REGIMES = ('full', 'dar', 'uniform', 'local')
# one run's model settings: regime, dar_window, dar_rank as GPTConfig takes them; name e.g. 'dar-W16-r8'
Setting = namedtuple('Setting', 'regime dar_window dar_rank name')


def regime_grid(regimes, windows, ranks):
    """Every regime at every setting it depends on: dar at each (W, r), uniform at each r, local
    at each W, full once. An empty ranks list means the default rank (d/4)."""
    options = {'full': [(None, None)],
               'dar': [(w, r) for w in windows for r in ranks or [None]],
               'uniform': [(None, r) for r in ranks or [None]],
               'local': [(w, None) for w in windows]}
    return [Setting(regime, *regime_settings(regime, w, r),
                    regime + (f'-W{w}' if w is not None else '') + (f'-r{r}' if r is not None else ''))
            for regime in regimes for w, r in options[regime]]


# ----------------------------------------------------------------------------------------------
# Attention: three exact paths over the same math.
# q, k, v: (B, H, T, d) after rotary. maps: (down_k, up_k, down_v, up_v) with shapes
# (H, d, r), (H, r, d), (H, d, r), (H, r, d), or None when there are no latents.
# window: W, or None for unbounded.


def _distance(n_q, n_k, q_start, device):
    """i - j for queries at q_start + arange(n_q) and keys at arange(n_k)."""
    i = torch.arange(q_start, q_start + n_q, device=device)
    return i[:, None] - torch.arange(n_k, device=device)[None, :]


def naive_attention(q, k, v, window, maps):
    T, d = q.shape[-2:]
    dist = _distance(T, T, 0, q.device)
    local = dist >= 0 if window is None else (dist >= 0) & (dist < window)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(d)
    if maps is None or window is None:
        return torch.softmax(scores.masked_fill(~local, float('-inf')), -1).to(q.dtype) @ v
    down_k, up_k, down_v, up_v = maps
    far = dist >= window
    k_far, v_far = k @ down_k @ up_k, v @ down_v @ up_v  # distant keys/values rebuilt in d dims
    scores = torch.where(far, (q.float() @ k_far.float().transpose(-2, -1)) / math.sqrt(d), scores)
    p = torch.softmax(scores.masked_fill(~(local | far), float('-inf')), -1).to(q.dtype)
    return (p * local) @ v + (p * far) @ v_far


def sdpa_attention(q, k, v, window, maps):
    T = q.shape[-2]
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if maps is None:  # local-only: a banded mask
        dist = _distance(T, T, 0, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(dist >= 0) & (dist < window))
    down_k, up_k, down_v, up_v = maps
    k_far, v_far = k @ down_k @ up_k, v @ down_v @ up_v
    if window == 0:  # uniform: every key is distant
        return F.scaled_dot_product_attention(q, k_far, v_far, is_causal=True)
    # One softmax over 2T keys: the full-dim copy is visible inside the window, the
    # reconstructed copy outside it.
    dist = _distance(T, T, 0, q.device)
    mask = torch.cat([(dist >= 0) & (dist < window), dist >= window], dim=-1)
    return F.scaled_dot_product_attention(
        q, torch.cat([k, k_far], dim=-2), torch.cat([v, v_far], dim=-2), attn_mask=mask)


def _masked_scores(q, keys, blocked, blocked_from=0):
    """Float scores q . keys, -inf where blocked (a mask of the key columns blocked_from
    onwards; the columns before it are all allowed). The product itself runs in float32: a
    bf16 matmul would round every score to bf16 before the softmax sees it."""
    s = q.float() @ keys.float().transpose(-2, -1)
    if blocked is not None:
        s[..., blocked_from:].masked_fill_(blocked, float('-inf'))
    return s


@functools.lru_cache(maxsize=64)
def _blocked(n_q, n_k, offset, lo, hi, device):
    """(n_q, n_k) mask of the pairs outside lo <= i - j < hi (hi None: unbounded), with
    i - j = offset + row - col. Cached: every full query block has the same masks."""
    dist = _distance(n_q, n_k, offset, device)
    return (dist < lo) | (dist >= hi) if hi is not None else dist < lo


# What a query block reads: the band, keys [ls, le) in full dims; the latents of positions
# [0, de), all but the edge [lm, de) seen by every query of the block; the masks of the band and
# the edge, None where nothing is blocked.
BlockKeys = namedtuple('BlockKeys', 'ls le de lm band_blocked edge_blocked')


def _block_keys(s, e, q_start, n_before, window, device):
    """The BlockKeys of the block [s, e) of the new tokens. New token t sits at position
    q_start + t; the keys in full dims are the n_before tokens before the new ones and the new
    ones (key index j is position q_start - n_before + j). Only the edge of the latents needs a
    mask, as in flash attention only diagonal tiles do; a single query needs none."""
    n, qs = e - s, s + n_before  # qs: key index of the block's first query
    ls = 0 if window is None else max(0, qs - window + 1)
    de = 0 if window is None else max(0, q_start + e - window)
    lm = 0 if window is None else min(de, max(0, q_start + s + 1 - window))
    band_blocked = edge_blocked = None
    if n > 1:
        band_blocked = _blocked(n, e + n_before - ls, qs - ls, 0, window, device)
        if de > lm:
            edge_blocked = _blocked(n, de - lm, q_start + s - lm, window, None, device)
    return BlockKeys(ls, e + n_before, de, lm, band_blocked, edge_blocked)


def dar_forward(q, k, v, a, b, up_k, up_v, window, block, q_start=0):
    """Blockwise exact DAR attention with one online softmax; never builds a T x T matrix.

    q:       the new tokens (B, H, n, d) at positions q_start + arange(n).
    k, v:    (B, H, n_before + n, d), in full dims: the new tokens and the n_before tokens before
             them (in the KV cache, the window's older tokens; in training, none).
    a, b:    latents (B, H, >= de, r) of the positions [0, de) that are distant to some query,
             or None (no latents: full or local-only).
    block:   queries per block; scores are (B, H, block, keys read) at a time.
    Returns (out, lse) with lse the log-sum-exp per query, in float32.
    """
    n, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
    n_before = k.shape[-2] - n
    q = q * scale
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    for s in range(0, n, block):
        e = min(s + block, n)
        ls, le, de, lm, band_blocked, edge_blocked = _block_keys(s, e, q_start, n_before, window, q.device)
        qb = q[..., s:e, :]
        pieces = []  # (scores, values) of keys read in full dims, then of the latents
        if window != 0:
            pieces.append((_masked_scores(qb, k[..., ls:le, :], band_blocked), v[..., ls:le, :]))
        latent = a is not None and de > 0
        if latent:
            pieces.append((_masked_scores(qb @ up_k.transpose(-2, -1), a[..., :de, :], edge_blocked, lm),
                           b[..., :de, :]))
        # The max over all pieces is finite: every query sees itself, in the band or as a latent.
        m = torch.stack([sc.amax(-1) for sc, _ in pieces]).amax(0)[..., None]
        total = sum(sc.sub_(m).exp_().sum(-1, keepdim=True) for sc, _ in pieces)  # scores -> p
        acc = sum((p.to(val.dtype) @ val).float() for p, val in pieces[:len(pieces) - latent])
        if latent:
            p, val = pieces[-1]
            acc = acc + ((p.to(val.dtype) @ val) @ up_v).float()
        out[..., s:e, :] = (acc / total).to(q.dtype)
        lse[..., s:e] = (m + total.log()).squeeze(-1)
    return out, lse


class FusedDARAttention(torch.autograd.Function):
    """dar_forward with a flash-style backward. Only q, k, v, out and the log-sum-exp are saved:
    each block's probabilities, and the latents themselves, are recomputed in backward, so
    memory grows linearly in T and holds nothing full attention does not."""

    @staticmethod
    def _latents(k, v, down_k, down_v, window):
        """Latents of the positions [0, T - W) that some query sees as distant, or None."""
        n_far = 0 if down_k is None or window is None else max(0, k.shape[-2] - window)
        if not n_far:
            return None, None, 0
        return k[..., :n_far, :] @ down_k, v[..., :n_far, :] @ down_v, n_far

    @staticmethod
    def forward(ctx, q, k, v, down_k, up_k, down_v, up_v, window, block):
        a, b, _ = FusedDARAttention._latents(k, v, down_k, down_v, window)
        out, lse = dar_forward(q, k, v, a, b, up_k, up_v, window, block)
        ctx.save_for_backward(q, k, v, down_k, up_k, down_v, up_v, out, lse)
        ctx.window, ctx.block = window, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, down_k, up_k, down_v, up_v, out, lse = ctx.saved_tensors
        window, block = ctx.window, ctx.block
        a, b, n_far = FusedDARAttention._latents(k, v, down_k, down_v, window)
        n, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
        qs = q * scale
        f32_zeros = lambda t: None if t is None else torch.zeros_like(t, dtype=torch.float32)
        dq, dk, dv, da, db, dup_k, dup_v = map(f32_zeros, (q, k, v, a, b, up_k, up_v))
        delta = (dout.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O)
        for s in range(0, n, block):
            e = min(s + block, n)
            ls, _, de, lm, band_blocked, edge_blocked = _block_keys(s, e, 0, 0, window, q.device)
            qb, dob = qs[..., s:e, :], dout[..., s:e, :]
            lse_b, delta_b = lse[..., s:e, None], delta[..., s:e, :]
            dqb = 0  # gradient of the scaled query block
            if window != 0:
                kb, vb = k[..., ls:e, :], v[..., ls:e, :]
                p = _masked_scores(qb, kb, band_blocked).sub_(lse_b).exp_()
                dv[..., ls:e, :] += p.to(dob.dtype).transpose(-2, -1) @ dob
                ds = p.mul_((dob @ vb.transpose(-2, -1)).float().sub_(delta_b)).to(q.dtype)
                dqb = dqb + (ds @ kb).float()
                dk[..., ls:e, :] += ds.transpose(-2, -1) @ qb
            if a is not None and de:
                ab, bb = a[..., :de, :], b[..., :de, :]
                qa = qb @ up_k.transpose(-2, -1)
                p = _masked_scores(qa, ab, edge_blocked, lm).sub_(lse_b).exp_()
                pl = p.to(bb.dtype)
                dup_v += ((pl @ bb).transpose(-2, -1) @ dob).float().sum(0)
                dlat = dob @ up_v.transpose(-2, -1)  # gradient of the weighted latent sum
                db[..., :de, :] += pl.transpose(-2, -1) @ dlat
                ds = p.mul_((dlat @ bb.transpose(-2, -1)).float().sub_(delta_b)).to(q.dtype)
                dqa = ds @ ab
                da[..., :de, :] += ds.transpose(-2, -1) @ qa
                dqb = dqb + (dqa @ up_k).float()
                dup_k += (dqa.transpose(-2, -1) @ qb).float().sum(0)
            dq[..., s:e, :] = dqb * scale
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


def decode_attention(q, view, up_k, up_v):
    """One new token per sequence, q (B, H, 1, d), against a CacheView that already holds it:
    every key in view.k is in its window, every latent distant. One softmax over the scores of
    both sets, each score computed in float32."""
    B, H, _, d = q.shape
    n_near, n_far = view.k.shape[-2], 0 if view.a is None else view.a.shape[-2]
    # The cache's float32 scratch, viewed contiguous at this step's lengths: fresh buffers this
    # size would be page-faulted in again on every step, and a matmul into a strided slice of
    # one buffer takes a slow copying path.
    far, scores = (buf[:B * H * n].view(B, H, 1, n) for buf, n in zip(view.scratch, (n_far, n_near + n_far)))
    q = q.float() * (1.0 / math.sqrt(d))
    near = q @ view.k.float().transpose(-2, -1)
    if n_far:
        torch.matmul(q @ up_k.float().transpose(-2, -1), view.a.float().transpose(-2, -1), out=far)
    torch.cat([near, far], -1, out=scores)
    if view.mask is not None:
        scores += view.mask
    torch.softmax(scores, -1, out=scores)  # one kernel, row by row: each row's passes stay in cache
    out = scores[..., :n_near].to(view.v.dtype) @ view.v
    if n_far:
        out = out + (scores[..., n_near:].to(view.b.dtype) @ view.b) @ up_v
    return out.to(view.k.dtype)


# Query block of the fused path: scores are (B, H, 128, keys) at a time. One pythia-70m training
# step at T=4096 on the 2-core CPU took 7.4 / 7.2 / 8.2 s with blocks of 64 / 128 / 256.
FUSED_BLOCK = 128


def fused_attention(q, k, v, window, maps, block=None):
    return FusedDARAttention.apply(q, k, v, *(maps or (None,) * 4), window, block or FUSED_BLOCK)


ATTENTION = {'naive': naive_attention, 'sdpa': sdpa_attention, 'fused': fused_attention}


def resolve_attn_impl(config, T, device):
    """The path 'auto' stands for, on this device at sequence length T."""
    if config.attn_impl != 'auto':
        return config.attn_impl
    if config.regime == 'full' or device.type != 'cpu':
        # Full: PyTorch's fused causal kernel, nothing to gain. CUDA: not measured yet; sdpa runs
        # PyTorch's fused kernels there, the fused path many small ones.
        return 'sdpa'
    # CPU, one training step (bench.py and by hand, 2 cores): pythia-70m W=256 DAR fused took
    # 1.07x / 0.98x / 0.80x full attention's time at T = 1024 / 4096 / 8192, DAR sdpa 1.18x / 1.99x /
    # 2.29x; uniform fused 6.5 s vs sdpa 7.5 s at T=4096. At T=512 (tiny preset, W=64, batch 8)
    # sdpa was the faster by 3-6% in every regime (DAR 0.55 vs 0.57 s).
    return 'fused' if T >= 1024 else 'sdpa'


# ----------------------------------------------------------------------------------------------
# The model


def rotary_cos_sin(positions, rot_dim, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device).float() / rot_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """GPT-NeoX rotary on the first cos.shape[-1] dims of each head; the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([(x_rot * cos + rotated * sin).to(x.dtype), x_pass], dim=-1)


# Inputs of up to this many rows (tokens of a decode step) take Linear's matrix-vector path.
MATVEC_ROWS = 8


class Linear(nn.Linear):
    """nn.Linear with a faster matrix-vector path for decoding on CPU in float32. There F.linear
    reads a weight at about 16 GB/s for 1 to 8 input rows, whether MKL runs it on one thread or
    two; one batched product over row blocks of the weight reads it at 47-60 GB/s at batch 1,
    2x-4x the rate of F.linear (pythia-70m's weights, 2-core dev machine: 11.1 -> 3.0-3.8 ms a
    decode step at batch 1, 19.5 -> 9.4 ms at batch 8; a batch of one block is as slow as
    F.linear). bf16 and autocast gain nothing there, and GPUs have their own kernels."""

    def forward(self, x):
        rows, blocks = x.numel() // self.in_features, math.gcd(self.out_features, 8)
        if (x.device.type != 'cpu' or rows > MATVEC_ROWS or blocks == 1 or torch.is_autocast_enabled('cpu')
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32):
            return super().forward(x)
        weight = self.weight.view(blocks, self.out_features // blocks, self.in_features)
        y = torch.bmm(weight, x.reshape(rows, self.in_features).T.expand(blocks, -1, -1))
        y = y.view(self.out_features, rows).T  # (rows, out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class DARAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        if config.has_latents:
            H, d, r = config.n_head, config.head_dim, config.dar_rank
            self.down_k = nn.Parameter(torch.empty(H, d, r))
            self.down_v = nn.Parameter(torch.empty(H, d, r))
            if config.dar_maps == 'free':
                self.up_k = nn.Parameter(torch.empty(H, r, d))
                self.up_v = nn.Parameter(torch.empty(H, r, d))

    def latent_maps(self):
        """(down_k, up_k, down_v, up_v), or None without latents. 'tied' maps read a distant key
        back as its projection onto the span of down_k (a subspace the training moves) rather than
        through a second, free matrix."""
        if not self.config.has_latents:
            return None
        if self.config.dar_maps == 'tied':
            return self.down_k, self.down_k.transpose(-2, -1), self.down_v, self.down_v.transpose(-2, -1)
        return self.down_k, self.up_k, self.down_v, self.up_v

    def qkv(self, x, cos, sin):
        """q, k, v (B, H, T, d) of x (B, T, C), q and k after the rotary embedding."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x, cos, sin)
        maps = self.latent_maps()
        if maps is not None:  # under autocast q, k, v are bf16 and the maps' parameters float32
            maps = tuple(m.to(q.dtype) for m in maps)
        # The attention runs outside autocast, in the dtype autocast chose for q, k, v: its float32
        # scores then stay float32 (autocast would run a float32 matmul in bf16), and the fused
        # backward, which autograd runs outside any autocast, sees the dtypes its forward saw.
        with torch.autocast(x.device.type, enabled=False):
            if cache is not None:
                view = cache.update(self.layer_idx, k, v, maps)
                up_k, up_v = (None, None) if maps is None else maps[1::2]
                if T == 1:
                    y = decode_attention(q, view, up_k, up_v)
                else:
                    y, _ = dar_forward(q, view.k, view.v, view.a, view.b, up_k, up_v, self.config.window,
                                       cache.prefill_block, q_start=cache.step.start)
            else:
                impl = resolve_attn_impl(self.config, T, x.device)
                y = ATTENTION[impl](q, k, v, self.config.window, maps)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

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
        if self.parallel_residual:
            return x + attn + self.dropout(self.mlp(self.ln_2(x)))
        x = x + attn
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rot_dim = int(config.head_dim * config.rotary_pct) // 2 * 2
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for block in self.transformer.h:
            maps = block.attn.latent_maps()
            if maps is not None:
                down_k, up_k, down_v, up_v = maps
                # Orthonormal down map and its transpose as the up map: at step 0 a distant key
                # is the orthogonal projection of the full key onto an r-dim subspace.
                for down, up in ((down_k, up_k), (down_v, up_v)):
                    with torch.no_grad():
                        down.copy_(torch.linalg.qr(torch.randn(down.shape))[0])
                        if config.dar_maps == 'free':
                            up.copy_(down.transpose(-2, -1))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters; non_embedding leaves out the token embedding and the output layer, as
        Pythia's published counts do."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------
    # Starting from a trained model

    def load_base_weights(self, state_dict, source):
        """Loads a trained model's weights (state_dict, from `source`, named in errors) into this
        one. Every tensor of this model must come from it, with its shape, except the latent maps:
        those the base lacks, or has at another rank, keep their initialisation. Returns the names
        of the parameters that did not come from the base (to train from fresh optimizer state)."""
        own = self.state_dict()
        new, problems = [], []
        for name, tensor in own.items():
            theirs = state_dict.get(name)
            if is_latent_map(name) and (theirs is None or theirs.shape != tensor.shape):
                new.append(name)
            elif theirs is None:
                problems.append(f"{name} is missing")
            elif theirs.shape != tensor.shape:
                problems.append(f"{name} has shape {tuple(theirs.shape)}, this model's {tuple(tensor.shape)}")
        unused = [n for n in state_dict if n not in own and not is_latent_map(n)]
        problems += [f"{n} has no place in this model" for n in unused]
        if problems:
            raise ValueError(f"the weights of {source} do not fit this model: {'; '.join(problems[:4])}"
                             f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}; "
                             "the shape settings (n_layer, n_head, n_embd, vocab_size, bias, tie_embeddings) "
                             "must be the base model's")
        self.load_state_dict({n: t for n, t in state_dict.items() if n in own and n not in new}, strict=False)
        return new

    @torch.no_grad()
    def calibrate_latents(self, batches):
        """Data-calibrated latent maps (the PCA conversion of TransMLA-style retrofits): each head's
        down maps become the top-r principal directions of its own keys (after rotary) and values
        on `batches` of token ids, as the full-attention model computes them, and the up maps their
        transposes. A distant key then starts as its best rank-r reconstruction in the mean-square
        sense (uncentred: the latent map has no offset); at r = head_dim, exactly itself."""
        if not self.config.has_latents:
            raise ValueError(f"a {self.config.regime} model has no latent maps to calibrate")
        H, d, r = self.config.n_head, self.config.head_dim, self.config.dar_rank
        moments = [torch.zeros(2, H, d, d, dtype=torch.float64) for _ in self.transformer.h]

        def accumulate(layer):
            def hook(attn, args):
                x, cos, sin = args[:3]
                _, k, v = attn.qkv(x, cos, sin)
                for i, t in enumerate((k, v)):  # (B, H, T, d) -> sum over B, T of t t^T per head
                    t = t.double().transpose(0, 1).reshape(H, -1, d)
                    moments[layer][i] += (t.transpose(-2, -1) @ t).cpu()
            return hook

        hooks = [block.attn.register_forward_pre_hook(accumulate(i)) for i, block in enumerate(self.transformer.h)]
        window, self.config.dar_window = self.config.dar_window, None  # the keys of the full-attention model
        try:
            for idx in batches:
                self.hidden_states(idx)
        finally:
            self.config.dar_window = window
            for h in hooks:
                h.remove()
        for block, (mk, mv) in zip(self.transformer.h, moments):
            down_k, up_k, down_v, up_v = block.attn.latent_maps()
            for moment, down, up in ((mk, down_k, up_k), (mv, down_v, up_v)):
                directions = torch.linalg.eigh(moment).eigenvectors.flip(-1)[..., :r]  # (H, d, r), largest first
                down.copy_(directions)
                if self.config.dar_maps == 'free':
                    up.copy_(directions.transpose(-2, -1))

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """A transformers GPTNeoXForCausalLM (Pythia and its kin: a local directory, or a Hub name
        where the network allows) as our GPT. overrides change settings that need no new weights
        shape-wise: dar_window, dar_rank, dar_maps, attn_impl, block_size (the default: the model's
        max_position_embeddings). The latent maps of a DAR model start random: see calibrate_latents."""
        config, state_dict = load_neox(name_or_dir)
        config.update(overrides)
        model = cls(GPTConfig(**config))
        model.load_base_weights(state_dict, name_or_dir)
        return model

    def hidden_states(self, idx, cache=None):
        """The final-layer-normed states of idx; with a cache, idx continues its sequence."""
        B, T = idx.shape
        start = 0
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                                 "crop the input or use a KV cache (model.new_cache) for generation")
        else:
            start = cache.begin(idx, self.compute_dtype(idx.device))
        cos, sin = rotary_cos_sin(torch.arange(start, start + T, device=idx.device),
                                  self.rot_dim, self.config.rotary_base)
        x = self.transformer.drop(self.transformer.wte(idx))
        try:
            for block in self.transformer.h:
                x = block(x, cos, sin, cache)
        except BaseException:
            if cache is not None:
                cache.abort()
            raise
        if cache is not None:
            cache.commit()
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        logits = self.lm_head(self.hidden_states(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def param_groups(self):
        """Parameter names of the optimizer's two groups, in its order: matrices (and the per-head
        latent maps) decay; biases and norms do not."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = dict(self.named_parameters())
        groups = [{'params': [params[n] for n in names], 'weight_decay': decay}
                  for names, decay in zip(self.param_groups(), (weight_decay, 0.0))]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    def flops_per_token(self, T):
        """Training FLOPs per token at context T (PaLM appendix B style, causal average)."""
        cfg = self.config
        d, r, W = cfg.head_dim, cfg.dar_rank, cfg.window
        mean_keys = (T + 1) / 2
        if W is None:
            full, latent = mean_keys, 0.0
        else:
            full = min(mean_keys, W)
            latent = (mean_keys - full) if cfg.has_latents else 0.0
        attended_dims = full * d + latent * r
        return 6 * self.get_num_params(non_embedding=False) + 12 * cfg.n_layer * cfg.n_head * attended_dims

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation against peak_flops (default: A100 bf16, as nanoGPT)."""
        T = self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak_flops

    # ------------------------------------------------------------------------------------------
    # Inference

    def compute_dtype(self, device):
        """The dtype the attention computes in, and so the one the KV cache holds: autocast's
        where autocast is on for device, else the weights'."""
        device_type = torch.device(device).type
        if device_type != 'meta' and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.transformer.wte.weight.dtype

    def new_cache(self, batch_size, max_seq_len, device=None, dtype=None, static=False):
        """A KV cache for batch_size sequences of up to max_seq_len tokens, by default on the
        model's device and in its compute dtype (so call it under the autocast you decode with).
        static: decode steps of one shape, for compiling them (KVCache)."""
        device = self.transformer.wte.weight.device if device is None else device
        return KVCache(self.config, batch_size, max_seq_len, device=device,
                       dtype=self.compute_dtype(device) if dtype is None else dtype, static=static)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None):
        """Prefill idx once, then sample one token per step from the KV cache. temperature 0 is
        greedy. Rows that produced eos_token keep emitting it; stops early once all have."""
        B, T = idx.shape
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)  # now, not after the prefill
        if T + max_new_tokens > self.config.block_size:
            warnings.warn(f"{T} prompt + {max_new_tokens} new tokens go past the trained context (block_size "
                          f"{self.config.block_size}): positions beyond it were never trained, expect worse text",
                          stacklevel=2)
        cache = self.new_cache(B, T + max_new_tokens, device=idx.device)
        logits = self.lm_head(self.hidden_states(idx, cache)[:, -1])
        out, done = [idx], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p)
            if eos_token is not None:
                nxt = nxt.masked_fill(done, eos_token)
                done |= nxt == eos_token
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_token is not None and done.all()):
                break
            logits = self.lm_head(self.hidden_states(nxt[:, None], cache)[:, -1])
        return torch.cat(out, dim=1)


LATENT_MAPS = ('down_k', 'up_k', 'down_v', 'up_v')


def is_latent_map(name):
    return name.rsplit('.', 1)[-1] in LATENT_MAPS


def load_neox(name_or_dir):
    """(GPTConfig settings, our state_dict) of a transformers GPTNeoXForCausalLM."""
    try:
        from transformers import GPTNeoXForCausalLM  # needed only here
    except ImportError:
        raise ValueError("importing a Hugging Face model needs transformers: pip install -r requirements.txt") from None
    try:
        hf = GPTNeoXForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a GPT-NeoX model from {name_or_dir!r}: {e}") from None
    c = hf.config
    unsupported = [f"{name} {value!r}" for name, value, ours in (
        ('hidden_act', c.hidden_act, 'gelu'), ('intermediate_size', c.intermediate_size, 4 * c.hidden_size),
        ('attention_bias', getattr(c, 'attention_bias', True), True)) if value != ours]
    if unsupported:
        raise ValueError(f"{name_or_dir}: {', '.join(unsupported)} is not the GPT-NeoX layout this model implements "
                         "(gelu, intermediate_size 4 x hidden_size, biases)")
    rope = getattr(c, 'rope_parameters', None) or {}  # transformers >= 5; earlier ones: rotary_pct, rotary_emb_base
    config = dict(
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size, vocab_size=c.vocab_size,
        block_size=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps, parallel_residual=c.use_parallel_residual,
        rotary_pct=rope.get('partial_rotary_factor', getattr(c, 'rotary_pct', 0.25)),
        rotary_base=float(rope.get('rope_theta', getattr(c, 'rotary_emb_base', 10000.0))),
        tie_embeddings=bool(c.tie_word_embeddings), bias=True)
    H, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    names = {'input_layernorm': 'ln_1', 'post_attention_layernorm': 'ln_2', 'attention.dense': 'attn.c_proj',
             'attention.query_key_value': 'attn.c_attn', 'mlp.dense_h_to_4h': 'mlp.c_fc', 'mlp.dense_4h_to_h': 'mlp.c_proj'}
    state = {}
    for name, t in hf.state_dict().items():
        if name == 'gpt_neox.embed_in.weight':
            state['transformer.wte.weight'] = t
        elif name.startswith('gpt_neox.final_layer_norm.'):
            state['transformer.ln_f.' + name.rsplit('.', 1)[1]] = t
        elif name in ('embed_out.weight', 'lm_head.weight'):  # the name before and since transformers 5
            state['lm_head.weight'] = t
        elif name.startswith('gpt_neox.layers.'):
            _, _, i, rest = name.split('.', 3)
            module, param = rest.rsplit('.', 1)
            if module not in names:
                continue  # buffers of older versions (rotary inv_freq, causal mask)
            if module == 'attention.query_key_value':
                # transformers splits per head: rows (H, 3, d), [q | k | v] within a head; ours (3, H, d)
                t = t.view(H, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
            state[f'transformer.h.{i}.{names[module]}.{param}'] = t
    return config, state


def check_sampling(temperature, top_k, top_p):
    """A ValueError naming the first sampling setting out of range."""
    if not temperature >= 0:  # a negative one would turn the distribution upside down
        raise ValueError(f"temperature must be at least 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from (B, V) logits."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the ones before it already cover top_p; the first always stays.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float('-inf')))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


# One step of the KV cache, worked out once per step and shared by the layers: the new tokens
# sit at positions [start, start + n); writes are (first slot, end slot, first new token) runs
# of the ring; old_slots (a tensor, or None) are the ring slots of the older tokens a chunk reads
# in full dims, in position order; n_far: latents read, positions [0, n_far).
CacheStep = namedtuple('CacheStep', 'start n writes old_slots n_far')
# What one layer attends over in a step: keys and values in full dims (k, v) and the latents
# (a, b) of positions [0, n_far) (None without latents). For a decode step every key in k is in
# the new token's window, in any order; for a chunk, k and v are in position order and end with
# the chunk itself, and the attention masks by distance.
# scratch: two flat float32 buffers for a decode step's scores. mask: None, or for a static
# decode step (all slots read, whatever their fill) 0 / -inf per key of [k, a] that it may / may not
# read.
CacheView = namedtuple('CacheView', 'k v a b scratch mask')


class KVCache:
    """Static DAR KV cache, preallocated and written by position. It only stores: `update` writes
    a layer's new keys and values and hands back what that layer reads; the attention module
    attends.

    Per layer: a ring of the last W keys/values in full dims (B, H, W, d), and latents (a, b)
    (B, H, max_seq_len - W, r), stored transposed, of the tokens that will leave the window. A
    token's latent is computed once, when it is written: so a ring slot can be overwritten at any
    time, and writing the same step again (after a layer raised) writes the same values. Full
    attention is the ring with W = max_seq_len (an ordinary static cache); local-only keeps only
    the ring; uniform only latents.

    A step is begin() (checks the input, plans the step), update() per layer, commit() (advances
    length). A decode step that raised partway can simply be run again; a chunk that raised may
    have overwritten ring slots it still reads, so the cache then refuses input until reset().

    static=True: a decode step reads every ring slot and every latent slot, masking those not
    written yet, so its shapes are the same at every step and it can be compiled (CUDA graphs need
    this); it then reads max_seq_len tokens' worth however few are cached. Otherwise it reads only
    what is written (the faster choice in eager mode).
    """

    # Prefill runs in query blocks of this size: scores are (B, H, block, context) at a time.
    prefill_block = 256

    def __init__(self, config, batch_size, max_seq_len, device, dtype, static=False):
        if max_seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
        self.window = config.window
        self.batch_size, self.max_seq_len, self.length = batch_size, max_seq_len, 0
        self.device, self.dtype = torch.device(device), dtype
        self.step, self.broken = None, False
        L, B, H, d, r = config.n_layer, batch_size, config.n_head, config.head_dim, config.dar_rank
        self.ring_size = max_seq_len if self.window is None else min(self.window, max_seq_len)
        self.k = torch.zeros(L, B, H, self.ring_size, d, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.a = self.b = None
        if config.has_latents and max_seq_len > self.window:
            # Stored (r, positions) and viewed as (positions, r): a decode step's score and value
            # products are then r long contiguous reads per head (rows of r = 16 floats are
            # short reads that matrix-vector kernels handle worse).
            shape = (L, B, H, r, max_seq_len - self.window)
            self.a, self.b = (torch.zeros(shape, device=device, dtype=dtype).transpose(-2, -1) for _ in 'ab')
        # Decode-step scores, allocated once (B*H floats per cached token; not counted in nbytes).
        n_keys = self.ring_size + (0 if self.a is None else self.a.shape[-2])
        self.scratch = torch.empty(2, B * H * n_keys, device=device, dtype=torch.float32)
        # Static decode: per key slot, in the order of the scores [ring | latents], 0 once the
        # newest token may read it (a ring slot: written; a latent: its token left the window),
        # else -inf; reset() masks all.
        self.mask = torch.full((n_keys,), -math.inf, device=device) if static else None

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.a, self.b) if t is not None)

    def reset(self):
        self.length, self.step, self.broken = 0, None, False  # stale entries are never read
        if self.mask is not None:
            self.mask.fill_(-math.inf)

    def n_far(self, length):
        """How many latents a cache holding length tokens has written that a query can read."""
        return 0 if self.a is None else min(self.a.shape[-2], max(0, length - self.window))

    def begin(self, idx, dtype):
        """Validates the next chunk idx (of activations in dtype) against the cache and plans its
        step; returns its start position. Nothing is written before every check has passed."""
        B, n = idx.shape
        if self.broken:
            raise ValueError("an earlier chunk raised partway through and left this cache partly written; "
                             "call cache.reset() and prefill again")
        if dtype != self.dtype:
            raise ValueError(f"the model computes in {dtype} but the cache holds {self.dtype}; "
                             "create it with model.new_cache(..., dtype=...) (under the same autocast)")
        if B != self.batch_size:
            raise ValueError(f"batch size {B} does not match the cache's {self.batch_size}; "
                             "create the cache with model.new_cache(batch_size=...)")
        if idx.device.type != self.device.type or (idx.device.index or 0) != (self.device.index or 0):
            raise ValueError(f"input is on {idx.device} but the cache is on {self.device}; "
                             "move one of them (model.new_cache(..., device=...))")
        if self.length + n > self.max_seq_len:
            raise ValueError(f"{self.length} cached + {n} new tokens exceed the cache's max_seq_len "
                             f"{self.max_seq_len}; create a larger cache or call cache.reset()")
        L, S, W = self.length, self.ring_size, self.window
        m = min(n, S)  # only the last S new tokens stay in the ring
        writes, p = [], L + n - m
        while p < L + n:
            run = min(L + n - p, S - p % S)
            writes.append((p % S, p % S + run, p - L))
            p += run
        old_slots = None
        if n > 1 and L + n > S:
            # The ring wraps during this chunk: the older tokens its queries read in full dims
            # (up to W - 1 before it) are gathered before their slots are overwritten.
            n_old = max(0, min(L, W - 1))  # uniform (W = 0): none
            old_slots = torch.arange(L - n_old, L, device=self.device) % max(S, 1)
        n_far = self.n_far(L + n)
        if self.mask is not None:  # unmask the slots this step writes
            self.mask[min(L, S):min(L + n, S)] = 0
            self.mask[S + self.n_far(L):S + n_far] = 0
        self.step = CacheStep(L, n, writes, old_slots, n_far)
        return L

    def update(self, layer, k, v, maps):
        """Writes this step's keys and values (B, H, n, d) of one layer, and their latents through
        the down maps; returns the layer's CacheView."""
        st = self.step
        L, n, S = st.start, st.n, self.ring_size
        ring_k, ring_v = self.k[layer], self.v[layer]
        if st.old_slots is not None:
            old_k, old_v = ring_k.index_select(2, st.old_slots), ring_v.index_select(2, st.old_slots)
        a = b = None
        if self.a is not None:
            down_k, _, down_v, _ = maps
            a, b = self.a[layer], self.b[layer]
            hi = min(L + n, a.shape[-2])  # tokens past it never become distant
            if hi > L:
                a[:, :, L:hi] = k[:, :, :hi - L] @ down_k
                b[:, :, L:hi] = v[:, :, :hi - L] @ down_v
        for lo, hi, src in st.writes:
            ring_k[:, :, lo:hi] = k[:, :, src:src + hi - lo]
            ring_v[:, :, lo:hi] = v[:, :, src:src + hi - lo]
        if self.mask is not None and n == 1:
            return CacheView(ring_k, ring_v, a, b, self.scratch, self.mask)
        if a is not None:
            a, b = a[:, :, :st.n_far], b[:, :, :st.n_far]
        if st.old_slots is not None:  # the ring wrapped during the chunk: its keys, after the older ones
            if len(st.old_slots):
                k, v = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
            return CacheView(k, v, a, b, self.scratch, None)
        # Before the ring first wraps, slot = position: the prefix [0, L + n) in order. A decode
        # step after it reads the whole ring: the W tokens in it are exactly its window.
        held = min(L + n, S)
        return CacheView(ring_k[:, :, :held], ring_v[:, :, :held], a, b, self.scratch, None)

    def commit(self):
        self.length += self.step.n
        self.step = None

    def abort(self):
        """A layer raised during the step: a chunk may have overwritten ring slots it reads."""
        if self.step is not None and self.step.old_slots is not None and len(self.step.old_slots):
            self.broken = True
        self.step = None
