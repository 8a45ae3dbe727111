"""Where an eager CPU decode step's time goes: pythia-70m shape, random weights, float32, every weight in cpu_matvec's
packed form, W=256, r=16, at a long context. Per regime and batch: ms a step, the minor page faults and system
time a step takes (getrusage: a fresh buffer the allocator maps anew each step shows there), and the ops with the
most self time under torch.profiler (which slows the step: read the shares, not the times).

    python dev/decode_profile.py [--batches=1,8] [--regimes=full,dar] [--context=32768] [--top=8]
"""
import resource
import statistics
import time

import torch

from decode_setup import cases, header, parse_args

args = parse_args(regimes='full,dar', rounds=5, steps=8, top=8)
print(header(args, 'ms a step'))
for regime, batch, model, token, cache in cases(args):
    def steps():
        cache.reset(length=args.context)
        for _ in range(args.steps):
            model(token, cache=cache)

    steps()  # warm-up: the allocator's pools, oneDNN's primitives
    ms, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        steps()
        ms.append(1e3 * (time.perf_counter() - t0) / args.steps)
    after, n = resource.getrusage(resource.RUSAGE_SELF), args.rounds * args.steps
    print(f"\n{regime} batch {batch}: {statistics.median(ms):.1f} ms a step ({min(ms):.1f}-{max(ms):.1f}), "
          f"{(after.ru_minflt - before.ru_minflt) / n:.0f} minor page faults and "
          f"{1e3 * (after.ru_stime - before.ru_stime) / n:.1f} ms of system time a step", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    for e in ops[:args.top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.count // args.steps:4d} a step  {e.key}")
