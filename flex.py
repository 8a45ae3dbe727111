"""
DAR attention through FlexAttention (attn_impl='flex'), a training path for GPUs. The same single
softmax as model.sdpa_attention, over the keys in full dims and the distant keys rebuilt from their
latents, but with a block mask: the tiles no query reads (beyond the window among the full keys,
inside it among the rebuilt ones) are skipped, not computed and masked, so DAR costs about causal
attention's work instead of sdpa's 4x. On CUDA it runs compiled (one fused kernel forward and backward);
on the CPU PyTorch runs only its unfused forward, which the tests check against naive. gpu_check.sh
measures it; attn_impl='auto' does not pick it before a GPU measurement says so.
"""
import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from model import first_local

compiled_flex = torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)  # (T, window, keys, device): a few entries of (T / 128)^2 block indices each
def dar_block_mask(T, window, n_keys, device):
    """Key j < T: read in full dims (local to the query); key T + j: token j rebuilt from its latent (distant)."""
    def read(b, h, q_idx, kv_idx):
        j, start = kv_idx % T, first_local(q_idx, window)
        return torch.where(kv_idx < T, (j >= start) & (j <= q_idx), j < start)
    return create_block_mask(read, None, None, T, n_keys, device=device)


def dar_attention(q, k, v, window, maps):
    T = q.shape[-2]
    if window is not None and window >= T:
        window = None  # full attention at this length
    if maps is not None and window is not None:  # distant keys rebuilt through the r-dim latents
        down_k, up_k, down_v, up_v = maps
        k_far, v_far = k @ down_k @ up_k, v @ down_v @ up_v
        k, v = (k_far, v_far) if window == 0 else (torch.cat([k, k_far], -2), torch.cat([v, v_far], -2))
        window = None if window == 0 else window  # uniform: causal attention over the rebuilt keys
    mask = dar_block_mask(T, window, k.shape[-2], q.device)
    return (compiled_flex if q.is_cuda else flex_attention)(q, k, v, block_mask=mask)
