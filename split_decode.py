"""
The decode step's attention as two attentions over disjoint key sets, merged by their log-sum-exps
(DESIGN.md): the ring in d dims, and the latents in r dims (query q U^T, keys a, values b, scale 1/sqrt(d),
the output then times V). model.decode_attention, one softmax over both sets through batched products, is
the readable reference; this is the same math written so that a GPU can read the latents at its memory
bandwidth. A batched product with an inner dimension of r and one query row is a poor fit for cuBLAS; an
attention over the latents is the shape a decoding kernel is made for (flash-decoding: the positions split
across the device, each part read once, partial results merged by log-sum-exp, as FlashMLA does for MLA).

Each part goes through one kernel, `attend`, of two kinds (the setting, one name per form):
- 'flex': FlexAttention with its log-sum-exp. Compiled on CUDA, a query of one row runs its split-K decoding
  kernel (head dims of at least 16 there: r = d / 4 >= 16 at the Pythia shapes). On the CPU it runs eagerly
  and traced by aot_eager, not through inductor, whose CPU FlexAttention returns no log-sum-exp.
- 'reduce': elementwise products summed over r and over the positions, reductions inductor fuses into kernels
  that read each cache tensor once, split over the positions, with no batched product at all.

    use_decode_attn(model, 'flex')    # every layer's decode step; 'reference' restores model.decode_attention

bench.py --decode_attns=reference,flex,reduce measures them side by side; the tests hold them equal.
"""
import functools
import math

import torch
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from flex import merge


def flex_part(q, k, v, mask, scale):
    """(out (B, H, 1, e), float32 log-sum-exp (B, H, 1, 1)) of q (B, H, 1, e) against k, v (B, H, n, e);
    mask: (n,) added to the scores (-inf: not read), or None. No key read: out 0, log-sum-exp -inf."""
    score_mod = None if mask is None else lambda score, b, h, i, j: score + mask[j]
    out, aux = flex_attention(q, k, v, score_mod=score_mod, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse[..., None]


def reduce_part(q, k, v, mask, scale):
    """flex_part's result through reductions, in float32: the casts fuse into the loads when compiled."""
    scores = (q.float() * k.float()).sum(-1) * scale  # (B, H, n): q . k_j
    if mask is not None:
        scores = scores + mask
    # a part with no key read has max -inf: a finite floor keeps exp() at 0 instead of NaN
    m = scores.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    p = (scores - m).exp()
    total = p.sum(-1, keepdim=True)  # (B, H, 1)
    out = (p[..., None] * v.float()).sum(-2) / total.clamp(min=torch.finfo(torch.float32).tiny)  # (B, H, e)
    return out[..., None, :].to(q.dtype), (m + total.log())[..., None]


def split_decode_attention(q, view, up_k, up_v, attend):
    """model.decode_attention(q, view, up_k, up_v) as two attentions through attend, merged by their
    log-sum-exps (flex.merge, as in training)."""
    n_near, scale = view.k.shape[-2], 1 / math.sqrt(q.shape[-1])
    mask = (None, None) if view.mask is None else (view.mask[:n_near], view.mask[n_near:])
    parts = []  # (out, log-sum-exp) of each key set this step reads: uniform has no ring, full no latents
    if n_near:
        parts.append(attend(q, view.k, view.v, mask[0], scale))
    if view.a is not None and view.a.shape[-2]:
        out, lse = attend(q @ up_k.transpose(-2, -1), view.a, view.b, mask[1], scale)  # (B, H, 1, r): q U^T
        parts.append((out @ up_v, lse))  # (sum_j p_j b_j) V, with the p of the latents' own softmax
    return parts[0][0] if len(parts) == 1 else merge(*parts[0], *parts[1])


# made once: a compiled step guards on the form it traced, and finds it again after a switch back
FORMS = {name: functools.partial(split_decode_attention, attend=attend)
         for name, attend in (('flex', flex_part), ('reduce', reduce_part))}
DECODE_ATTNS = ('reference', *FORMS)


def use_decode_attn(model, name):
    """model (a GPT) with every layer's decode step in form name, one of DECODE_ATTNS; the model's math,
    parameters and state_dict are unchanged. model.py's DARAttention reads the form as its `decode`."""
    if name not in DECODE_ATTNS:
        raise ValueError(f"decode_attn must be one of {', '.join(DECODE_ATTNS)}, got {name!r}")
    for block in model.transformer.h:
        if name == 'reference':  # the default: model.decode_attention, looked up when called
            vars(block.attn).pop('decode', None)
        else:
            block.attn.decode = FORMS[name]
    return model
