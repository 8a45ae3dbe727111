"""An eager decode step with cpu_matvec's packed form called through its custom op (dar::packed_linear) against
called directly (what MatvecLinear does eagerly), the two interleaved in one process: pythia-70m shape, random
weights, float32, every weight packed (bench.py's pick on the CPUs that measured it faster), W=256, r=16.

    python dev/packed_call_ab.py [--batches=1,8] [--regimes=full,dar,local] [--context=32768] [--rounds=11]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import cpu_matvec  # noqa: E402
from model import GPT, GPTConfig, regime_settings  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument('--batches', default='1,8')
parser.add_argument('--regimes', default='full,dar,local')
parser.add_argument('--context', type=int, default=32768)
parser.add_argument('--rounds', type=int, default=11)
parser.add_argument('--steps', type=int, default=10)
args = parser.parse_args()

CALLS = {'through the op': cpu_matvec.packed_op, 'directly': cpu_matvec.packed_linear}
print(f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}; context "
      f"{args.context}; ms a step, median (range) of {args.rounds} rounds x {args.steps} steps, the calls in turn")
with torch.no_grad():
    for regime in args.regimes.split(','):
        torch.manual_seed(0)
        window, rank = regime_settings(regime, window=256, rank=16)
        model = GPT(GPTConfig.from_preset('pythia-70m', dar_window=window, dar_rank=rank)).eval()
        cpu_matvec.use_matvec(model, {tuple(m.weight.shape): 'packed' for m in model.modules()
                                      if isinstance(m, torch.nn.Linear)})
        for batch in map(int, args.batches.split(',')):
            token = torch.zeros(batch, 1, dtype=torch.long)
            cache = model.new_cache(batch, args.context + 1 + args.steps)
            ms = {call: [] for call in CALLS}
            for _ in range(args.rounds):
                for call, fn in CALLS.items():
                    cpu_matvec.FORMS['packed'] = fn
                    cache.reset(length=args.context)
                    model(token, cache=cache)
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        model(token, cache=cache)
                    ms[call].append(1e3 * (time.perf_counter() - t0) / args.steps)
            print(f"{regime:5s} batch {batch}: " + ', '.join(
                f"{call} {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" for call, t in ms.items()), flush=True)
            del cache
