"""
DAR attention for GPUs (attn_impl='flex'), in latent space: the one softmax over the local band and the
distant latents written as two attentions over disjoint key sets, merged by their log-sum-exps:

    near, l1 = attention(q, k, v)               over j in L(i), d dims (a sliding window)
    far,  l2 = attention(q U^T, k A, v C)       over j in D(i), r dims, scale 1/sqrt(d)
    o = (e^l1 near + e^l2 far V) / (e^l1 + e^l2)

so a distant score and a distant value cost r multiply-adds, not d, and no key is rebuilt in d dims (naive and
sdpa in model.py show that form). Both parts are FlexAttention calls with block masks: the tiles no query reads
are skipped, not computed and masked. Full attention goes to SDPA's causal (flash) kernel, and uniform, whose
distant part is causal, to SDPA over the latents. On CUDA FlexAttention runs compiled (one fused kernel forward
and backward, the log-sum-exp differentiable); on the CPU PyTorch runs only its unfused forward, which the tests
check against naive, with the merge's backward checked through a differentiable stand-in for `attend`.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from model import first_local

# Static for the first length (training's), dynamic from a second (prompts of every length): no recompile per prompt
compiled_flex = torch.compile(flex_attention)


@functools.lru_cache(maxsize=16)  # (T, window, part, device): a few entries of (T / 128)^2 block indices each
def block_mask(T, window, part, device):
    """The keys of part 'near' (read in full dims) or 'far' (read as latents), from the one local/distant rule."""
    def read(b, h, q_idx, kv_idx):
        start = first_local(q_idx, window)
        return (kv_idx >= start) & (kv_idx <= q_idx) if part == 'near' else kv_idx < start
    return create_block_mask(read, None, None, T, T, device=device)


def attend(q, k, v, mask, scale):
    """(out, float32 log-sum-exp) over the keys mask allows; a query that reads none gets out 0 and lse -inf."""
    attention = compiled_flex if q.is_cuda else flex_attention
    out, aux = attention(q, k, v, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def dar_attention(q, k, v, window, maps):
    T, d = q.shape[-2:]
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scale, mask = 1.0 / math.sqrt(d), functools.partial(block_mask, T, window, device=q.device)
    if maps is None:  # local-only
        return attend(q, k, v, mask('near'), scale)[0]
    down_k, up_k, down_v, up_v = maps
    q_far, a, b = q @ up_k.transpose(-2, -1), k @ down_k, v @ down_v  # (B, H, T, r): q U^T, k A, v C
    if window == 0:  # uniform: every key distant, a causal attention in r dims
        return F.scaled_dot_product_attention(q_far, a, b, is_causal=True, scale=scale) @ up_v
    near, lse_near = attend(q, k, v, mask('near'), scale)
    far, lse_far = attend(q_far, a, b, mask('far'), scale)  # the first W queries read no latent: lse -inf
    return merge(near, lse_near[..., None], far @ up_v, lse_far[..., None])


def merge(o1, l1, o2, l2):
    """The one softmax over two disjoint key sets, from each set's output o (..., e) and log-sum-exp l (..., 1):
    (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2), in float32; a set that holds no key has l = -inf."""
    l = torch.logaddexp(l1, l2)
    return ((l1 - l).exp() * o1.float() + (l2 - l).exp() * o2.float()).to(o1.dtype)
