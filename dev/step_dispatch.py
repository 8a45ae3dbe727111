"""What an eager decode step costs on this CPU apart from the bytes it reads: the pythia-70m step's ops (its layers,
heads, window and each regime's code path) on a model 8 dims a head wide, with a 512-token vocabulary, at a short
context, so that every tensor stays in the CPU's caches and the step is the dispatch of its ops. Per regime, the
median ms a step over rounds that take the regimes in turn, and the ops a step dispatches (gpu_check.OpCounter).
--matvec=packed computes every nn.Linear in cpu_matvec's packed form (bench.py's pick for every weight on some CPUs).

    python dev/step_dispatch.py [--matvec=none] [--context=300] [--rounds=7]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from cpu_matvec import use_matvec  # noqa: E402
from gpu_check import OpCounter  # noqa: E402
from model import GPT, GPTConfig, regime_settings  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument('--matvec', choices=('none', 'packed'), default='none')
parser.add_argument('--context', type=int, default=300)  # past the window: DAR reads latents
parser.add_argument('--rounds', type=int, default=7)
parser.add_argument('--steps', type=int, default=50)
args = parser.parse_args()

torch.manual_seed(0)
steps, preset = {}, GPTConfig.from_preset('pythia-70m')
with torch.no_grad():
    for regime in ('full', 'dar', 'local'):
        window, rank = regime_settings(regime, window=256, rank=2)
        model = GPT(GPTConfig.from_preset('pythia-70m', n_embd=8 * preset.n_head, vocab_size=512, dar_window=window,
                                          dar_rank=rank)).eval()
        if args.matvec == 'packed':
            use_matvec(model, {tuple(m.weight.shape): 'packed' for m in model.modules()
                               if isinstance(m, torch.nn.Linear)})
        cache = model.new_cache(1, args.context + args.steps + 1)
        steps[regime] = model, cache
    token, times = torch.zeros(1, 1, dtype=torch.long), {regime: [] for regime in steps}
    for _ in range(args.rounds):
        for regime, (model, cache) in steps.items():
            cache.reset(length=args.context)
            model(token, cache=cache)
            t0 = time.perf_counter()
            for _ in range(args.steps - 1):
                model(token, cache=cache)
            times[regime].append((time.perf_counter() - t0) / (args.steps - 1))
    print(f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}; "
          f"pythia-70m's step at 8 dims a head, context {args.context}, matvec {args.matvec}; median (range) of "
          f"{args.rounds} rounds x {args.steps - 1} steps")
    for regime, (model, cache) in steps.items():
        cache.reset(length=args.context)
        with OpCounter() as counter:
            model(token, cache=cache)
        ms = [1e3 * t for t in times[regime]]
        print(f"{regime:6s} {statistics.median(ms):.3f} ms ({min(ms):.3f}-{max(ms):.3f}), {counter.ops} ops, "
              f"{1e3 * statistics.median(ms) / counter.ops:.2f} us an op")
