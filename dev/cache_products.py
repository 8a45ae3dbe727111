"""The read rate of a CPU decode step's products with a long cache, each in the forms MKL can run it in: one query row
against the keys as q @ k^T (a product whose right side is transposed) or as k @ q^T (a matrix-vector product over
the keys' rows), and the same for the values and the latents (held (r, positions)). What decided
model.decode_attention's forms; `sum` of the keys for the machine's read rate. pythia-70m's heads, float32.

    python dev/cache_products.py [--batches=1,8] [--context=32768] [--rounds=9]
"""
import argparse
import statistics
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument('--batches', default='1,8')
parser.add_argument('--context', type=int, default=32768)
parser.add_argument('--rounds', type=int, default=9)
args = parser.parse_args()


def ms(fn):
    fn()
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


T = lambda x: x.transpose(-2, -1)  # noqa: E731
H, d, r, n = 8, 64, 16, args.context
print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; {n} positions of {H} heads, d={d}, r={r}; "
      f"median ms of {args.rounds}, and the cache's bytes over it")
for batch in map(int, args.batches.split(',')):
    room = n + 32  # a cache's rows are longer than what a step reads of them
    k, v = torch.randn(batch, H, room, d)[:, :, :n], torch.randn(batch, H, room, d)[:, :, :n]  # (B, H, n, d)
    a = torch.randn(batch, H, r, room)[..., :n]  # (B, H, r, n)
    q, qa, p = torch.randn(batch, H, 1, d), torch.randn(batch, H, 1, r), torch.randn(batch, H, 1, n)
    forms = {'scores  q @ k^T': (k, lambda: q @ T(k)), 'scores  (k @ q^T)^T': (k, lambda: T(k @ T(q))),
             'values  p @ v': (v, lambda: p @ v), 'values  (v^T @ p^T)^T': (v, lambda: T(T(v) @ T(p))),
             'latent scores  qa @ a': (a, lambda: qa @ a),
             'latent scores  (a^T @ qa^T)^T': (a, lambda: T(T(a) @ T(qa))),
             'latent sums  p @ a^T': (a, lambda: p @ T(a)), 'latent sums  (a @ p^T)^T': (a, lambda: T(a @ T(p))),
             'sum of k': (k, lambda: k.sum())}
    for name, (x, fn) in forms.items():
        t = ms(fn)
        print(f"batch {batch}  {name:32s} {t:8.2f} ms  {x.numel() * x.element_size() / t / 1e6:5.1f} GB/s", flush=True)
