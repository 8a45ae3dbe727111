"""An eager decode step with cpu_matvec's packed form called through its custom op (dar::packed_linear) against
called directly (what MatvecLinear does eagerly), the two interleaved in one process: pythia-70m shape, random
weights, float32, every weight packed (bench.py's pick on the CPUs that measured it faster), W=256, r=16.

    python dev/packed_call_ab.py [--batches=1,8] [--regimes=full,dar,local] [--context=32768] [--rounds=11]
"""
import statistics
import time

from decode_setup import cases, cpu_matvec, header, parse_args

args = parse_args(regimes='full,dar,local', rounds=11, steps=10)
CALLS = {'through the op': cpu_matvec.packed_op, 'directly': cpu_matvec.packed_linear}
print(header(args, 'ms a step') + ', the calls in turn')
for regime, batch, model, token, cache in cases(args):
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
