"""What the eager decode step's softmax costs on this CPU, pass by pass: the scores of one step at the pythia-70m shape
(6 layers x batch x 8 heads x n keys, float32), as model.decode_attention runs them (max, subtract, exponential, sum,
each in place or reduced), with exp against exp2 (the base decode_attention uses) and torch.softmax beside them.
Full attention and DAR both take one score per cached token, so this is work the two share at long context.

    python dev/softmax_passes.py [--batch=8] [--keys=32513]
"""
import argparse
import os
import statistics
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument('--batch', type=int, default=8)
parser.add_argument('--keys', type=int, default=32513)  # the distant tokens of a 32k context at W = 256
parser.add_argument('--repeats', type=int, default=21)
args = parser.parse_args()
LAYERS, HEADS = 6, 8

scores = [torch.randn(args.batch, HEADS, 1, args.keys).clamp_(max=0) for _ in range(LAYERS)]  # after the max
scratch = [s.clone() for s in scores]


def ms(op):
    """Median ms of op over the six layers' scores, each pass on a fresh copy (in-place ops change them)."""
    times = []
    for _ in range(args.repeats):
        for s, fresh in zip(scratch, scores):
            s.copy_(fresh)
        t0 = time.perf_counter()
        for s in scratch:
            op(s)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


PASSES = {'amax': lambda s: s.amax(-1, keepdim=True), 'sub_': lambda s: s.sub_(1.0), 'exp_': torch.Tensor.exp_,
          'exp2_': torch.Tensor.exp2_, 'sum': lambda s: s.sum(-1, keepdim=True),
          'four passes, exp': lambda s: s.sub_(s.amax(-1, keepdim=True)).exp_().sum(-1),
          'four passes, exp2': lambda s: s.sub_(s.amax(-1, keepdim=True)).exp2_().sum(-1),
          'torch.softmax': lambda s: torch.softmax(s, -1)}

with torch.no_grad():
    print(f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; {LAYERS} layers x {args.batch} x {HEADS} heads x {args.keys} "
          f"scores, float32; ms for all layers, median of {args.repeats}, two rounds")
    for round_ in range(2):
        print('  '.join(f"{name} {ms(op):.2f}" for name, op in PASSES.items()))
