"""How fast this CPU reads a weight for one and for MATVEC_ROWS input rows: F.linear against cpu_matvec's forms,
at the pythia-70m decode step's weight shapes (use_matvec makes the same comparison per shape and keeps the fastest).

    python dev/matvec_rates.py
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from cpu_matvec import FORMS, MATVEC_ROWS, fastest_form, median_seconds  # noqa: E402

SHAPES = {'qkv': (1536, 512), 'attention out': (512, 512), 'MLP up': (2048, 512), 'MLP down': (512, 2048),
          'head': (50304, 512)}

with torch.no_grad():
    print(f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}, float32; "
          f"GB/s of the weight read for 1 / {MATVEC_ROWS} rows, median of 15")
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features)
        rates = {form: ' / '.join(f"{weight.nbytes / median_seconds(lambda: fn(x, weight, None)) / 1e9:5.1f}"
                                  for x in (torch.randn(rows, in_features) for rows in (1, MATVEC_ROWS)))
                 for form, fn in {'F.linear': F.linear, **FORMS}.items()}
        print(f"{name:14s} {out_features:6d} x {in_features:4d}: " + ', '.join(f"{k} {v}" for k, v in rates.items())
              + f"; use_matvec: {fastest_form(out_features, in_features) or 'F.linear'}")
