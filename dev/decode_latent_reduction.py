"""
Issue 22, item 3 (the distant read): does the compiled decode step get faster on the CPU when the latent
products are written as reductions inductor can fuse ((q U^T) * a summed over r, p * b summed over positions)
instead of batched matrix products with an inner dimension of r = 16? pythia-70m, DAR W=256 r=16, float32.

    python dev/decode_latent_reduction.py BATCH CONTEXT eager|compiled|reduce

eager: the model as is; compiled: its whole static step through torch.compile; reduce: the same with the
reduction form (only while compiling; eager keeps the products). Prints ms a step (median of 5 x 16 steps)
and the largest logit difference to the eager step.
"""
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from cpu_matvec import reuse_freed_memory, use_matvec  # noqa: E402

products = model.decode_attention


def reductions(q, view, up_k, up_v):
    if not torch.compiler.is_compiling():
        return products(q, view, up_k, up_v)
    q = q / math.sqrt(q.shape[-1])
    scores = (q @ view.k.transpose(-2, -1)).float()
    if view.a is not None:  # (q U^T) . a_j as a sum over r: (B, H, 1, r) * (B, H, T, r) -> (B, H, 1, T)
        scores = torch.cat([scores, ((q @ up_k.transpose(-2, -1)) * view.a).sum(-1)[..., None, :].float()], -1)
    if view.mask is not None:
        scores = scores + view.mask
    p, n_near = torch.softmax(scores, -1).to(view.v.dtype), view.k.shape[-2]
    out = p[..., :n_near] @ view.v
    if view.a is not None:  # sum_j p_j b_j as a sum over positions, then V
        out = out + (p[..., n_near:].transpose(-2, -1) * view.b).sum(-2, keepdim=True) @ up_v
    return out


if __name__ == '__main__':
    batch, context, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if variant == 'reduce':
        model.decode_attention = reductions
    torch.manual_seed(0)
    m = model.GPT(model.GPTConfig.from_preset('pythia-70m', dar_window=256, dar_rank=16)).eval()
    reuse_freed_memory()
    use_matvec(m)
    token = torch.randint(0, 1000, (batch, 1))
    with torch.no_grad():
        cache = m.new_cache(batch, context + 64, static=True)
        step = m if variant == 'eager' else torch.compile(m, fullgraph=True, dynamic=False)

        def run():
            cache.reset(context)
            for _ in range(16):
                step(token, cache=cache)

        run()  # compiles
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) / 16)
        cache.reset(context)
        got = step(token, cache=cache)[0]
        cache.reset(context)
        diff = (got - m(token, cache=cache)[0]).abs().max().item()
    print(f"{variant}: batch {batch}, context {context}: {statistics.median(times) * 1e3:.2f} ms a step "
          f"(runs {', '.join(f'{t * 1e3:.1f}' for t in times)}); largest logit difference to eager {diff:.1e}")
