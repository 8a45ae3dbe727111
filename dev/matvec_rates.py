"""How fast this CPU reads a weight for one input row: F.linear against cpu_matvec's blocked product, at the
pythia-70m decode step's weight shapes (use_matvec makes the same comparison per shape and keeps the faster).

    python dev/matvec_rates.py
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from cpu_matvec import blocked_linear, median_seconds  # noqa: E402

SHAPES = {'qkv': (1536, 512), 'attention out': (512, 512), 'MLP up': (2048, 512), 'MLP down': (512, 2048),
          'head': (50304, 512)}

with torch.no_grad():
    print(f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}, float32, "
          f"one row; GB/s of the weight read, median of 15")
    for name, (out_features, in_features) in SHAPES.items():
        weight, x = torch.randn(out_features, in_features), torch.randn(1, in_features)
        linear = median_seconds(lambda: F.linear(x, weight))
        blocked = median_seconds(lambda: blocked_linear(x, weight, None, math.gcd(out_features, 8)))
        rate = lambda seconds: weight.nbytes / seconds / 1e9
        print(f"{name:14s} {out_features:6d} x {in_features:4d}: F.linear {rate(linear):5.1f}, blocked {rate(blocked):5.1f}")
