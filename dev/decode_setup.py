"""What the dev scripts that time a CPU decode step at a long context share: command line, model and cases."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import cpu_matvec  # noqa: E402
from model import GPT, GPTConfig, regime_settings  # noqa: E402


def parse_args(regimes, rounds, steps, **more):
    """--batches, --regimes, --context, --rounds, --steps, and more as --name=default (its type the default's)."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--batches', default='1,8')
    parser.add_argument('--regimes', default=regimes)
    parser.add_argument('--context', type=int, default=32768)
    parser.add_argument('--rounds', type=int, default=rounds)
    parser.add_argument('--steps', type=int, default=steps)
    for name, default in more.items():
        parser.add_argument(f'--{name}', type=type(default), default=default)
    return parser.parse_args()


def packed_model(regime):
    """pythia-70m shape in regime (W=256, r=16), random weights, every nn.Linear in cpu_matvec's packed form (bench.py's
    pick for every weight on the CPUs that measured it faster)."""
    torch.manual_seed(0)
    window, rank = regime_settings(regime, window=256, rank=16)
    model = GPT(GPTConfig.from_preset('pythia-70m', dar_window=window, dar_rank=rank)).eval()
    cpu_matvec.use_matvec(model, {tuple(m.weight.shape): 'packed' for m in model.modules()
                                  if isinstance(m, torch.nn.Linear)})
    return model


def header(args, what):
    return (f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}; context "
            f"{args.context}; {what}, median (range) of {args.rounds} rounds x {args.steps} steps")


def cases(args):
    """(regime, batch, model, a batch of one-token inputs, an empty cache with room for the steps) for each of args'
    regimes and batches, in no_grad."""
    with torch.no_grad():
        for regime in args.regimes.split(','):
            model = packed_model(regime)
            for batch in map(int, args.batches.split(',')):
                yield regime, batch, model, torch.zeros(batch, 1, dtype=torch.long), model.new_cache(
                    batch, args.context + 1 + args.steps)
